import { Readable } from 'node:stream';
import { promisify } from 'node:util';
import { constants as zc, crc32, inflateRaw } from 'node:zlib';
import { ErrorCode, StorageError } from '../errors.js';
import { sha256Hex, type SeekIndex, type Segment } from './seek-format.js';
import type { SegmentSource } from './seek-writer.js';

const inflate = promisify(inflateRaw) as (buf: Buffer, opts: object) => Promise<Buffer>;
/** Segments inflating at once. */
const IN_FLIGHT = 4;
/**
 * Source segments kept for the writer to copy: it lags the reader by the streams' buffers
 * between them (a few MiB), so this bounds memory without missing segments it could reuse.
 */
const KEEP_BYTES = 24 << 20;

const EMPTY = Buffer.alloc(0);

interface Kept { u: Buffer; c: Buffer; sha256: string; crc: number }

/** The recent source segments, for the writer to copy those that come out unchanged (bounded by KEEP_BYTES). */
export class SegmentPool implements SegmentSource {
  private readonly kept: Kept[] = [];
  private readonly byKey = new Map<string, Kept[]>();
  private bytes = 0;

  keep(k: Kept): void {
    const id = `${k.u.length}:${k.crc}`;
    this.byKey.set(id, [...(this.byKey.get(id) ?? []), k]);
    this.kept.push(k);
    this.bytes += k.u.length + k.c.length;
    while (this.bytes > KEEP_BYTES && this.kept.length > 1) {
      const old = this.kept.shift()!;
      this.bytes -= old.u.length + old.c.length;
      const id2 = `${old.u.length}:${old.crc}`;
      const rest = this.byKey.get(id2)!.filter((x) => x !== old);
      if (rest.length) this.byKey.set(id2, rest);
      else this.byKey.delete(id2);
    }
  }

  match(u: Buffer, crc: number): { c: Buffer; sha256: string } | undefined {
    const hit = this.byKey.get(`${u.length}:${crc}`)?.find((k) => k.u.equals(u));
    return hit && { c: hit.c, sha256: hit.sha256 };
  }
}

/**
 * A stored seekable archive read whole, once, as its segments: each split out by the index,
 * checked against its sha256, length and CRC-32 and inflated on its own (several at once, on the
 * libuv pool), in order. A segment that fails its check fails the read InvalidInput (a corrupt
 * stored archive). Every byte used is checked so: `raw` may come from a get with `partsChecked`.
 * `onHead` hears the bytes before the first segment (the gzip header) once they are read.
 */
export async function* sourceSegments(raw: Readable, index: SeekIndex, key: string, inflateIt: (i: number) => boolean = () => true, onHead?: (head: Buffer) => void): AsyncGenerator<Kept & { i: number }> {
  const bad = (why: string): StorageError => new StorageError(ErrorCode.InvalidInput, `stored archive is corrupt: ${why}`, { op: 'repack', key });
  const it = raw[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  let buf: Buffer = Buffer.alloc(0);
  let done = false;
  /**
   * The next `n` bytes of the object, in a buffer of their own: a kept segment holds no more than
   * itself (not the read chunk around it).
   */
  const take = async (n: number): Promise<Buffer> => {
    const out = Buffer.allocUnsafe(n);
    let have = buf.copy(out, 0, 0, n);
    buf = buf.subarray(have);
    while (have < n && !done) {
      const r = await it.next();
      if (r.done) done = true;
      else {
        const c = r.value;
        const k = c.copy(out, have, 0, n - have);
        have += k;
        buf = c.subarray(k);
      }
    }
    if (have < n) throw bad('it ends before its index says');
    return out;
  };
  const open = async (seg: Segment, c: Buffer, i: number): Promise<Kept & { i: number }> => {
    // Here, on the buffer itself: WebCrypto's digest on the libuv pool copied every segment first,
    // and a hashing thread costs a process ~10 MB (README, What a repack hashes).
    const sha256 = sha256Hex(c);
    if (sha256 !== seg.sha256) throw bad(`segment at ${seg.cOff} does not match its sha256`);
    // A segment copied as it is needs only its digest checked: its bytes are never looked at.
    if (!inflateIt(i)) return { u: EMPTY, c, sha256, crc: seg.crc, i };
    const u = await inflate(c, { finishFlush: zc.Z_SYNC_FLUSH, maxOutputLength: seg.uLen + 1 }).catch(() => { throw bad(`segment at ${seg.cOff} does not inflate`); });
    if (u.length !== seg.uLen || crc32(u) !== seg.crc) throw bad(`segment at ${seg.cOff} inflates to other bytes than its index says`);
    return { u, c, sha256, crc: seg.crc, i };
  };
  const head = await take(index.segments[0]?.cOff ?? 10);
  if (head[0] !== 0x1f || head[1] !== 0x8b) throw bad('no gzip header');
  onHead?.(head);
  const queue: Promise<Kept & { i: number }>[] = [];
  // Reads stay in order (one stream); only the inflating overlaps.
  let next = 0;
  let reading: Promise<void> = Promise.resolve();
  const fill = (): void => {
    while (queue.length < IN_FLIGHT && next < index.segments.length) {
      const i = next++;
      const seg = index.segments[i]!;
      const bytes = reading.then(() => take(seg.cLen));
      reading = bytes.then(() => {}, () => {});
      const p = bytes.then((c) => open(seg, c, i));
      p.catch(() => {});
      queue.push(p);
    }
  };
  try {
    fill();
    while (queue.length > 0) {
      const k = await queue.shift()!;
      fill();
      yield k;
    }
    // The final block, the trailer and the index members: read to the end so the object's digest is checked.
    for (;;) {
      const r = await it.next();
      if (r.done) break;
    }
  } finally {
    if (!raw.readableEnded) raw.destroy();
  }
}

/** The source as a plain tar stream, its segments kept in a pool for the writer to copy. */
export function seekableSource(raw: Readable, index: SeekIndex, key: string): { tar: Readable; pool: SegmentPool } {
  const pool = new SegmentPool();
  const tar = Readable.from((async function* () {
    for await (const k of sourceSegments(raw, index, key)) {
      pool.keep(k);
      yield k.u;
    }
  })(), { objectMode: false, highWaterMark: 1 << 20 });
  // Its failure reaches the reader through the read itself; a late 'error' event must not be uncaught.
  tar.on('error', () => {});
  return { tar, pool };
}
