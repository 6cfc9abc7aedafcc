import { createHash, webcrypto } from 'node:crypto';
import { deflateRawSync, inflateRawSync } from 'node:zlib';
import { z } from 'zod';
import { ErrorCode, StorageError } from '../errors.js';

/**
 * The seekable session archive, byte by byte (README "Seekable session archives"):
 *
 *   member 1   gzip header (10 bytes, no name, no time, OS 3)
 *              segment 0 | segment 1 | ... | segment n-1   each a raw deflate stream of its own
 *                                                          (fresh dictionary), ended by a full flush
 *              03 00                                       the final, empty deflate block
 *              CRC-32 (combined from the segments') and ISIZE
 *   members    empty gzip members whose extra field carries the index ('S','i'), deflated JSON
 *   member     an empty gzip member whose extra field is the fixed-size footer ('S','f')
 *
 * Every reader decodes the first member to the tar stream and the others to nothing; a reader
 * that stops after the first member (Python's `r|gz`) has every entry. Segments start at tar
 * entry boundaries (a large file's data may be cut inside it), so one inflates from its first
 * byte with raw inflate, and an edit can replace one without touching the others.
 */

export const GZIP_HEADER = Buffer.from([0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0x00, 0x03]);
/** The final deflate block: fixed Huffman, empty. */
export const FINAL_BLOCK = Buffer.from([0x03, 0x00]);
/** Uncompressed bytes a segment of small entries grows to before the next entry starts a new one. */
export const SEGMENT_TARGET = 256 * 1024;
/** A large entry's data is cut every this many bytes: its own segments, compressed in parallel. */
export const SEGMENT_MAX = 1024 * 1024;
const MAGIC = Buffer.from('STVSEEK1', 'latin1');
/** One extra field holds 65535 bytes, its subfield header 4 of them. */
const CHUNK = 65535 - 4;
const MEMBER_OVERHEAD = 10 + 2 + 4 + 2 + 8;
const FOOTER_PAYLOAD = 8 + 4 * 8 + 32 + 32;
export const FOOTER_BYTES = MEMBER_OVERHEAD + FOOTER_PAYLOAD;
/** The index, inflated, is refused past this (a hostile footer must not make a reader allocate the world). */
const MAX_INDEX_BYTES = 64 << 20;

export interface Segment {
  /** Compressed bytes' offset in the object, and their length. */
  cOff: number;
  cLen: number;
  /** Offset in the tar stream, and length. */
  uOff: number;
  uLen: number;
  crc: number;
  /** sha256 of the compressed bytes (hex): what a ranged read is checked against. */
  sha256: string;
}

export type IndexEntryType = 'file' | 'contiguous-file' | 'directory' | 'symlink' | 'link';

export interface IndexEntry {
  /** Normalised: segments joined by `/`, no `./`, no trailing `/`. */
  path: string;
  type: IndexEntryType;
  size: number;
  mode: number;
  /** Milliseconds since the epoch. */
  mtime: number;
  linkname?: string | undefined;
  /** Offset in the tar stream of the entry's first header block (PAX headers included). */
  start: number;
}

export interface SeekIndex {
  segments: Segment[];
  entries: IndexEntry[];
  /** Offset of the final deflate block: where the last segment ends. */
  dataEnd: number;
  /** The tar stream's length and CRC-32, as the trailer has them. */
  tarBytes: number;
  crc: number;
}

export interface Footer {
  indexOff: number;
  indexLen: number;
  digestOff: number;
  digestLen: number;
  indexSha256: string;
  digestSha256: string;
}

const Stored = z.strictObject({
  v: z.literal(1),
  seg: z.array(z.tuple([z.number().int().min(0), z.number().int().min(0), z.number().int().min(0).max(0xffffffff), z.string().regex(/^[0-9a-f]{64}$/)])),
  ent: z.array(z.tuple([z.string(), z.enum(['file', 'contiguous-file', 'directory', 'symlink', 'link']), z.number().int().min(0), z.number().int().min(0), z.number(), z.string().nullable(), z.number().int().min(0)])),
  crc: z.number().int().min(0).max(0xffffffff),
});

/**
 * The index as stored: deflated JSON, entry starts as deltas (they compress far better). Level 6,
 * not 9: on a 5,207-entry index (313 segments) level 9 took 50-200 ms of every write, level 6
 * 14-40 ms, for 7% more bytes (58 against 54 KB, still inside the tail a read takes first).
 */
export function encodeIndex(ix: SeekIndex): Buffer {
  let prev = 0;
  const stored: z.infer<typeof Stored> = {
    v: 1,
    seg: ix.segments.map((s) => [s.cLen, s.uLen, s.crc, s.sha256]),
    ent: ix.entries.map((e) => {
      const row: z.infer<typeof Stored>['ent'][number] = [e.path, e.type, e.size, e.mode, e.mtime, e.linkname ?? null, e.start - prev];
      prev = e.start;
      return row;
    }),
    crc: ix.crc,
  };
  return deflateRawSync(JSON.stringify(stored), { level: 6 });
}

const corrupt = (why: string, key?: string): StorageError => new StorageError(ErrorCode.InvalidInput, `seekable index: ${why}`, { op: 'session', ...(key ? { key } : {}) });

/** Decodes and checks an index against the object it came from: segments contiguous from the first member's data to the final block. */
export function decodeIndex(blob: Buffer, footer: Footer, key?: string): SeekIndex {
  let parsed: z.infer<typeof Stored>;
  try {
    parsed = Stored.parse(JSON.parse(inflateRawSync(blob, { maxOutputLength: MAX_INDEX_BYTES }).toString('utf8')));
  } catch (err) {
    throw corrupt(`unreadable (${(err as Error).message.slice(0, 200)})`, key);
  }
  const segments: Segment[] = [];
  let cOff = GZIP_HEADER.length;
  let uOff = 0;
  for (const [cLen, uLen, crc, sha256] of parsed.seg) {
    segments.push({ cOff, cLen, uOff, uLen, crc, sha256 });
    cOff += cLen;
    uOff += uLen;
  }
  const dataEnd = cOff;
  const firstTrailing = footer.digestLen > 0 ? footer.digestOff : footer.indexOff;
  if (dataEnd + FINAL_BLOCK.length + 8 !== firstTrailing) throw corrupt('segments do not end where the first member does', key);
  let start = 0;
  const entries: IndexEntry[] = parsed.ent.map(([path, type, size, mode, mtime, linkname, delta]) => {
    start += delta;
    if (start >= uOff) throw corrupt(`entry "${path}" starts past the tar stream`, key);
    return { path, type, size, mode, mtime, ...(linkname !== null ? { linkname } : {}), start };
  });
  return { segments, entries, dataEnd, tarBytes: uOff, crc: parsed.crc };
}

/** An empty gzip member carrying `payload` in one extra subfield `S<id>`. */
function extraMember(id: string, payload: Buffer): Buffer {
  const head = Buffer.from([0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0x00, 0x03, 0, 0, 0x53, id.charCodeAt(0), 0, 0]);
  head.writeUInt16LE(payload.length + 4, 10);
  head.writeUInt16LE(payload.length, 14);
  return Buffer.concat([head, payload, FINAL_BLOCK, Buffer.alloc(8)]);
}

/** `blob` spread over as many members as its size needs (64 KiB per extra field). */
export function blobMembers(id: 'i' | 'd', blob: Buffer): Buffer {
  const parts: Buffer[] = [];
  for (let at = 0; at < blob.length; at += CHUNK) parts.push(extraMember(id, blob.subarray(at, at + CHUNK)));
  return Buffer.concat(parts);
}

/** Reassembles a blob from its members; undefined when the bytes are not such members. */
export function readBlobMembers(id: 'i' | 'd' | 'f', bytes: Buffer): Buffer | undefined {
  const parts: Buffer[] = [];
  let at = 0;
  while (at < bytes.length) {
    if (bytes.length < at + MEMBER_OVERHEAD) return undefined;
    if (bytes[at] !== 0x1f || bytes[at + 1] !== 0x8b || bytes[at + 2] !== 0x08 || bytes[at + 3] !== 0x04) return undefined;
    const xlen = bytes.readUInt16LE(at + 10);
    const len = bytes.readUInt16LE(at + 14);
    if (bytes[at + 12] !== 0x53 || bytes[at + 13] !== id.charCodeAt(0) || len + 4 !== xlen || bytes.length < at + MEMBER_OVERHEAD + len) return undefined;
    parts.push(bytes.subarray(at + 16, at + 16 + len));
    at += MEMBER_OVERHEAD + len;
  }
  return Buffer.concat(parts);
}

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/**
 * A segment's sha256 (hex), computed on the libuv pool (WebCrypto's digest is an async job), so
 * the segments in flight are checked on the other core while the main thread reads and writes.
 */
export async function segmentSha256(c: Buffer): Promise<string> {
  return Buffer.from(await webcrypto.subtle.digest('SHA-256', c)).toString('hex');
}

/** The trailer of the first member, then the digest and index members, then the footer. */
export function tail(ix: SeekIndex): Buffer {
  const trailer = Buffer.alloc(8);
  trailer.writeUInt32LE(ix.crc, 0);
  trailer.writeUInt32LE(ix.tarBytes % 2 ** 32, 4);
  const digestOff = ix.dataEnd + FINAL_BLOCK.length + 8;
  // The slot for a table of per-file digests stays empty: a digest per segment verifies reads,
  // and 32 bytes per file would cost more than the segments' own overhead (README).
  const dm = Buffer.alloc(0);
  const digests = dm;
  const blob = encodeIndex(ix);
  const im = blobMembers('i', blob);
  const f = Buffer.alloc(FOOTER_PAYLOAD);
  MAGIC.copy(f, 0);
  const put = (at: number, v: number): void => { f.writeUInt32LE(Math.floor(v / 2 ** 32), at); f.writeUInt32LE(v % 2 ** 32, at + 4); };
  put(8, digestOff + dm.length);
  put(16, im.length);
  put(24, digestOff);
  put(32, dm.length);
  Buffer.from(sha(blob), 'hex').copy(f, 40);
  Buffer.from(sha(digests), 'hex').copy(f, 72);
  return Buffer.concat([FINAL_BLOCK, trailer, dm, im, extraMember('f', f)]);
}

/** The footer at the end of `end` (the object's last bytes), or undefined for an archive that has none. */
export function parseFooter(end: Buffer, size: number): Footer | undefined {
  if (end.length < FOOTER_BYTES) return undefined;
  const m = readBlobMembers('f', end.subarray(end.length - FOOTER_BYTES));
  if (!m || m.length !== FOOTER_PAYLOAD || !m.subarray(0, 8).equals(MAGIC)) return undefined;
  const get = (at: number): number => m.readUInt32LE(at) * 2 ** 32 + m.readUInt32LE(at + 4);
  const footer: Footer = {
    indexOff: get(8), indexLen: get(16), digestOff: get(24), digestLen: get(32),
    indexSha256: m.subarray(40, 72).toString('hex'), digestSha256: m.subarray(72, 104).toString('hex'),
  };
  const end0 = size - FOOTER_BYTES;
  if (footer.indexOff + footer.indexLen !== end0 || footer.digestOff + footer.digestLen !== footer.indexOff || footer.digestOff < GZIP_HEADER.length + 10) {
    throw corrupt('footer offsets do not fit the object');
  }
  return footer;
}

/** Checks a blob read from the members against the footer's digest. */
export function checkBlob(blob: Buffer | undefined, want: string, what: string, key: string): Buffer {
  if (blob === undefined) throw corrupt(`${what} members are malformed`, key);
  if (sha(blob) !== want) throw new StorageError(ErrorCode.ChecksumMismatch, `seekable ${what} does not match the footer's digest`, { op: 'session', key });
  return blob;
}

export { sha as sha256Hex };
