import { promisify } from 'node:util';
import { constants as zc, crc32, inflateRaw } from 'node:zlib';
import { ErrorCode, StorageError } from '../errors.js';
import type { Bucket } from '../storage/bucket.js';
import type { ObjectInfo } from '../storage/driver.js';
import { checkBlob, decodeIndex, segmentSha256, FOOTER_BYTES, parseFooter, readBlobMembers, type SeekIndex, type Segment } from './seek-format.js';

const inflate = promisify(inflateRaw) as (buf: Buffer, opts: object) => Promise<Buffer>;
/** The first read from the end: the footer and, for sessions of a few thousand files, the whole index. */
const TAIL_READ = 128 * 1024;

/** A seekable archive's index, and the version of the object it was read from. */
export interface SeekView {
  key: string;
  info: ObjectInfo;
  index: SeekIndex;
}

/** The archive changed between two ranged reads of one request: read it again from its index. */
export class ArchiveReplaced extends Error {}

async function readRange(bucket: Bucket, key: string, start: number, end: number, signal: AbortSignal | undefined): Promise<{ bytes: Buffer; info: ObjectInfo }> {
  const got = await bucket.get(key, { range: { start, end }, signal });
  const parts: Buffer[] = [];
  for await (const chunk of got.stream) parts.push(chunk as Buffer);
  const bytes = Buffer.concat(parts);
  if (bytes.length !== end - start + 1) throw new StorageError(ErrorCode.Transient, `ranged read returned ${bytes.length} bytes, not ${end - start + 1}`, { op: 'session', key });
  return { bytes, info: got.info };
}

const sameVersion = (a: ObjectInfo, b: ObjectInfo): boolean => a.size === b.size && (a.etag === undefined || b.etag === undefined || a.etag === b.etag);

/**
 * Reads a seekable archive's index with ranged reads from its end: the footer and usually the
 * index in one, the rest of a large index in a second. Undefined for an archive without one
 * (written by another tool): the caller streams it. NotFound passes through.
 */
export async function openSeekable(bucket: Bucket, key: string, signal: AbortSignal | undefined): Promise<SeekView | undefined> {
  const stat = await bucket.stat(key);
  const size = stat.size;
  if (size < FOOTER_BYTES + 20) return undefined;
  const tailStart = Math.max(0, size - TAIL_READ);
  const end = await readRange(bucket, key, tailStart, size - 1, signal);
  if (!sameVersion(stat, end.info)) throw new ArchiveReplaced();
  const footer = parseFooter(end.bytes, size);
  if (!footer) return undefined;
  let members: Buffer;
  if (footer.indexOff >= tailStart) {
    members = end.bytes.subarray(footer.indexOff - tailStart, footer.indexOff - tailStart + footer.indexLen);
  } else {
    const more = await readRange(bucket, key, footer.indexOff, tailStart - 1, signal);
    if (!sameVersion(end.info, more.info)) throw new ArchiveReplaced();
    members = Buffer.concat([more.bytes, end.bytes]).subarray(0, footer.indexLen);
  }
  const blob = checkBlob(readBlobMembers('i', members), footer.indexSha256, 'index', key);
  return { key, info: end.info, index: decodeIndex(blob, footer, key) };
}

/** The segment holding tar offset `u` (segments are sorted and contiguous). */
export function segmentAt(ix: SeekIndex, u: number): number {
  let lo = 0;
  let hi = ix.segments.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (ix.segments[mid]!.uOff <= u) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/**
 * Reads segments `first..last` in one ranged read and hands each one's tar bytes to `visit` in
 * order, once its compressed bytes matched the index's sha256 and its inflated bytes the
 * index's length and CRC-32: a lying index or a damaged object fails ChecksumMismatch, never
 * yields wrong bytes.
 */
export async function readSegments(bucket: Bucket, view: SeekView, first: number, last: number, signal: AbortSignal | undefined, visit: (seg: Segment, tar: Buffer) => Promise<void> | void): Promise<void> {
  const segs = view.index.segments.slice(first, last + 1);
  const start = segs[0]!.cOff;
  const got = await bucket.get(view.key, { range: { start, end: segs.at(-1)!.cOff + segs.at(-1)!.cLen - 1 }, signal });
  if (!sameVersion(view.info, got.info)) {
    got.stream.destroy();
    throw new ArchiveReplaced();
  }
  let i = 0;
  let pending: Buffer[] = [];
  let have = 0;
  const bad = (seg: Segment, why: string): StorageError => new StorageError(ErrorCode.ChecksumMismatch, `segment at ${seg.cOff} ${why}`, { op: 'session', key: view.key });
  const done = async (seg: Segment, c: Buffer): Promise<void> => {
    if ((await segmentSha256(c)) !== seg.sha256) throw bad(seg, 'does not match the index\'s sha256');
    let u: Buffer;
    try {
      u = await inflate(c, { finishFlush: zc.Z_SYNC_FLUSH, maxOutputLength: seg.uLen + 1 });
    } catch (err) {
      throw bad(seg, `does not inflate (${(err as Error).message})`);
    }
    if (u.length !== seg.uLen || crc32(u) !== seg.crc) throw bad(seg, 'inflates to other bytes than the index says');
    await visit(seg, u);
  };
  try {
    for await (const chunk of got.stream) {
      let b = chunk as Buffer;
      while (b.length > 0 && i < segs.length) {
        const seg = segs[i]!;
        const n = Math.min(seg.cLen - have, b.length);
        pending.push(b.subarray(0, n));
        have += n;
        b = b.subarray(n);
        if (have === seg.cLen) {
          const c = Buffer.concat(pending);
          pending = [];
          have = 0;
          i++;
          await done(seg, c);
        }
      }
    }
  } finally {
    got.stream.destroy();
  }
  if (i < segs.length) throw new StorageError(ErrorCode.Transient, 'ranged read ended early', { op: 'session', key: view.key });
}
