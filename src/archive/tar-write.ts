import type { Header, Pack } from 'tar-stream';
import { ErrorCode, StorageError } from '../errors.js';
import type { EntryType } from './entry-check.js';

/**
 * One entry's header as a transform shows it and writes it: tar-stream's decoded header with the
 * PAX records that override header fields (`uid`, `gid`, `uname`, `gname`, `mtime`) applied, and
 * the other PAX records (`atime`, `ctime`, `SCHILY.xattr.*`, comments, ...) in `pax`.
 */
export interface TarHeader {
  /** The name exactly as the archive spells it (`./a/b`, a directory's trailing `/`). */
  name: string;
  type: EntryType;
  /** Data bytes; 0 for everything but files. */
  size: number;
  /** Permission bits, setuid / setgid / sticky included. */
  mode: number;
  uid: number;
  gid: number;
  uname: string;
  gname: string;
  mtime: Date;
  /** Symlink target, or a hard link's target path. */
  linkname?: string;
  /** PAX records carried as they are; `path`, `linkpath` and `size` are always derived from the fields above. */
  pax?: Record<string, string>;
}

/** The largest value of an octal field of `digits` digits (ustar leaves one byte for the terminator). */
const octalMax = (digits: number): number => 8 ** digits - 1;
const DERIVED = new Set(['path', 'linkpath', 'size']);

/** The header of an entry tar-stream read, PAX overrides applied. */
export function fromStreamHeader(h: Header, type: EntryType): TarHeader {
  const pax = (h.pax ?? undefined) as Record<string, string> | undefined;
  const out: TarHeader = {
    name: h.name,
    type,
    size: type === 'file' || type === 'contiguous-file' ? h.size : 0,
    mode: h.mode ?? 0,
    uid: numberOr(pax?.uid, h.uid ?? 0),
    gid: numberOr(pax?.gid, h.gid ?? 0),
    uname: pax?.uname ?? h.uname ?? '',
    gname: pax?.gname ?? h.gname ?? '',
    mtime: pax?.mtime !== undefined && Number.isFinite(Number(pax.mtime)) ? new Date(Math.floor(Number(pax.mtime) * 1000)) : headerTime(h.mtime),
  };
  if (h.linkname) out.linkname = h.linkname;
  if (pax) {
    const rest = Object.fromEntries(Object.entries(pax).filter(([k]) => !DERIVED.has(k)));
    if (Object.keys(rest).length > 0) out.pax = rest;
  }
  return out;
}

/**
 * A negative header mtime can only come from a base-256 field (GNU tar's encoding of dates
 * before 1970), which tar-stream 3.2 decodes one too high: it negates the ones' complement
 * instead of the two's. Python's tarfile and GNU tar read it one second earlier, and so does this.
 */
function headerTime(mtime: Date): Date {
  return mtime.getTime() < 0 ? new Date(mtime.getTime() - 1000) : mtime;
}

function numberOr(text: string | undefined, fallback: number): number {
  const n = text === undefined ? NaN : Number(text);
  return Number.isSafeInteger(n) && n >= 0 ? n : fallback;
}

/**
 * The header tar-stream's pack is given for `h`. tar-stream writes ustar when every field fits
 * and PAX otherwise (non-ASCII or long names and link targets), so GNU long-name entries come out
 * as ustar prefix + name or PAX `path` / `linkpath`, and the ustar name of a PAX entry is
 * `PaxHeader`. What tar-stream would get wrong is fixed here: a PAX record that disagrees with
 * its header field (a replaced entry's new mtime or owner) is dropped, fields outside ustar's
 * octal range (uid/gid over 0o7777777, mtime before 1970 or after 2242) and names over 31 bytes
 * go to PAX records with a clamped ustar field, and mode 0 is kept (tar-stream turns a falsy mode
 * into 0644).
 */
export function toPackHeader(h: TarHeader): Parameters<Pack['entry']>[0] {
  const pax: Record<string, string> = {};
  const secs = Math.floor(h.mtime.getTime() / 1000);
  for (const [key, value] of Object.entries(h.pax ?? {})) {
    if (DERIVED.has(key)) continue;
    if (key === 'mtime' && Math.floor(Number(value) * 1000) !== h.mtime.getTime()) continue;
    if ((key === 'uid' && Number(value) !== h.uid) || (key === 'gid' && Number(value) !== h.gid)) continue;
    if ((key === 'uname' && value !== h.uname) || (key === 'gname' && value !== h.gname)) continue;
    pax[key] = value;
  }
  const fits = (n: number, digits: number): boolean => n >= 0 && n <= octalMax(digits);
  if (!fits(h.uid, 6)) pax.uid ??= String(h.uid);
  if (!fits(h.gid, 6)) pax.gid ??= String(h.gid);
  if (!fits(secs, 11)) pax.mtime ??= String(secs);
  const user = Buffer.byteLength(h.uname) > 31 ? ((pax.uname ??= h.uname), '') : h.uname;
  const group = Buffer.byteLength(h.gname) > 31 ? ((pax.gname ??= h.gname), '') : h.gname;
  const data = h.type === 'file' || h.type === 'contiguous-file';
  return {
    name: h.name,
    type: h.type,
    size: data ? h.size : 0,
    // A bit above the permission bits: tar-stream writes `mode & 0o7777`, but treats 0 as "unset".
    mode: h.mode & 0o7777 || 0o100000,
    uid: fits(h.uid, 6) ? h.uid : 0,
    gid: fits(h.gid, 6) ? h.gid : 0,
    uname: user,
    gname: group,
    mtime: fits(secs, 11) ? h.mtime : new Date(secs < 0 ? 0 : octalMax(11) * 1000),
    ...(h.linkname !== undefined ? { linkname: h.linkname } : {}),
    ...(Object.keys(pax).length > 0 ? { pax } : {}),
  };
}

/**
 * Writes one entry to `pack` and resolves once tar-stream took it whole, respecting its
 * back-pressure. `data` must yield exactly `header.size` bytes (checked: a short or long source
 * would corrupt every entry after it).
 */
export function writeEntry(pack: Pack, header: TarHeader, data: Buffer | AsyncIterable<Uint8Array> | undefined, op: string): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const packHeader = toPackHeader(header);
    const done = (err?: Error | null): void => (err ? reject(err) : resolve());
    // Directories and links carry no data: tar-stream finishes them on its own.
    if (header.type !== 'file' && header.type !== 'contiguous-file') return void pack.entry(packHeader, done);
    if (data === undefined || Buffer.isBuffer(data)) {
      const bytes = data ?? Buffer.alloc(0);
      if (bytes.length !== header.size) return reject(sizeError(header, bytes.length, op));
      return void pack.entry(packHeader, bytes, done);
    }
    const sink = pack.entry(packHeader, done);
    // Its errors reach us through `done`; destroyed with no listener it would throw.
    sink.on('error', () => {});
    pump(sink, data, header, op).catch((err: unknown) => {
      reject(err);
      sink.destroy(err as Error);
    });
  });
}

async function pump(sink: ReturnType<Pack['entry']>, data: AsyncIterable<Uint8Array>, header: TarHeader, op: string): Promise<void> {
  const { size } = header;
  let written = 0;
  for await (const chunk of data) {
    written += chunk.length;
    if (written > size) throw sizeError(header, written, op);
    if (chunk.length > 0 && !sink.write(chunk)) {
      await new Promise<void>((resolve, reject) => {
        const onDrain = (): void => { sink.off('close', onClose); resolve(); };
        const onClose = (): void => { sink.off('drain', onDrain); reject(new Error('tar entry closed while writing')); };
        sink.once('drain', onDrain).once('close', onClose);
      });
    }
  }
  if (written !== size) throw sizeError(header, written, op);
  sink.end(undefined);
}

function sizeError(h: TarHeader, got: number, op: string): StorageError {
  return new StorageError(ErrorCode.InvalidInput, `entry data of ${got}${got > h.size ? '+' : ''} bytes does not match its declared size ${h.size}`, { op, key: h.name });
}
