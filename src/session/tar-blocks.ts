/**
 * The little of tar's block layout the seekable format needs to see in a tar stream it wrote
 * (tar-stream's pack: ustar headers, PAX `x` headers before them) or is about to serve: where an
 * entry's header blocks end and its data starts, and the name and size they declare. Everything
 * else about an entry comes from the transform that wrote it.
 */

export const BLOCK = 512;
export const padded = (n: number): number => Math.ceil(n / BLOCK) * BLOCK;

/** Header blocks that describe the next entry rather than being one. */
export const isMetaType = (flag: number): boolean => flag === 0x78 /* x */ || flag === 0x67 /* g */ || flag === 0x4c /* L */ || flag === 0x4b /* K */;

export const isZeroBlock = (b: Buffer): boolean => {
  for (let i = 0; i < BLOCK; i++) if (b[i] !== 0) return false;
  return true;
};

export const typeFlag = (b: Buffer): number => b[156]!;

/** A numeric field: octal text, or GNU base-256 (high bit set) for values past octal's reach. */
export function numField(b: Buffer, at: number, len: number): number {
  if (b[at]! & 0x80) {
    let v = b[at]! & 0x7f;
    for (let i = at + 1; i < at + len; i++) v = v * 256 + b[i]!;
    return v;
  }
  const s = b.toString('latin1', at, at + len).replace(/[\0 ].*$/s, '').trim();
  return s === '' ? 0 : parseInt(s, 8);
}

const cstr = (b: Buffer, at: number, len: number): string => {
  const end = b.indexOf(0, at);
  return b.toString('utf8', at, end === -1 || end > at + len ? at + len : end);
};

/** The path a ustar header spells (prefix/name), before any PAX or GNU long name. */
export const ustarName = (b: Buffer): string => {
  const name = cstr(b, 0, 100);
  const prefix = b.toString('latin1', 257, 262) === 'ustar' ? cstr(b, 345, 155) : '';
  return prefix ? `${prefix}/${name}` : name;
};

/** PAX records (`len key=value\n`), the ones a reader of this module needs. */
export function paxRecords(data: Buffer): Record<string, string> {
  const out: Record<string, string> = {};
  let at = 0;
  while (at < data.length) {
    const sp = data.indexOf(0x20, at);
    if (sp === -1) break;
    const len = parseInt(data.toString('latin1', at, sp), 10);
    if (!Number.isSafeInteger(len) || len <= sp - at || at + len > data.length) break;
    const rec = data.toString('utf8', sp + 1, at + len - 1);
    const eq = rec.indexOf('=');
    if (eq > 0) out[rec.slice(0, eq)] = rec.slice(eq + 1);
    at += len;
  }
  return out;
}

/** What the header blocks of one entry declare, read from the start of its first header block. */
export interface ParsedHeader {
  /** The entry's name as spelled (PAX path, GNU long name or ustar). */
  name: string;
  size: number;
  /** Bytes of header blocks before the data. */
  headerBytes: number;
}

/**
 * Parses the header blocks of the entry that starts at `buf[0]`; undefined when `buf` ends
 * before they do, or when they are not a tar entry.
 */
export function parseEntryHeader(buf: Buffer): ParsedHeader | undefined {
  let at = 0;
  let longName: string | undefined;
  let pax: Record<string, string> = {};
  for (let hops = 0; hops < 8; hops++) {
    if (buf.length < at + BLOCK) return undefined;
    const block = buf.subarray(at, at + BLOCK);
    if (isZeroBlock(block)) return undefined;
    const flag = typeFlag(block);
    const size = numField(block, 124, 12);
    if (!isMetaType(flag)) {
      const paxSize = pax.size !== undefined ? Number(pax.size) : undefined;
      return { name: pax.path ?? longName ?? ustarName(block), size: paxSize ?? size, headerBytes: at + BLOCK };
    }
    if (buf.length < at + BLOCK + size) return undefined;
    const data = buf.subarray(at + BLOCK, at + BLOCK + size);
    if (flag === 0x78) pax = { ...pax, ...paxRecords(data) };
    if (flag === 0x4c) longName = cstr(data, 0, data.length);
    at += BLOCK + padded(size);
  }
  return undefined;
}
