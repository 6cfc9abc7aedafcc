import { createHash } from 'node:crypto';
import { Writable } from 'node:stream';
import { promisify } from 'node:util';
import { constants as zc, crc32, deflateRaw } from 'node:zlib';
import { ErrorCode, StorageError } from '../errors.js';
import { crc32Combine } from './crc32.js';
import { GZIP_HEADER, SEGMENT_MAX, SEGMENT_TARGET, tail, type IndexEntry, type IndexEntryType, type SeekIndex, type Segment } from './seek-format.js';
import { BLOCK, isMetaType, isZeroBlock, numField, padded, paxRecords, typeFlag, ustarName } from './tar-blocks.js';

const deflate = promisify(deflateRaw) as (buf: Buffer, opts: object) => Promise<Buffer>;
/** Segments compressing at once: both cores busy, one more queued, memory a few MiB. */
const IN_FLIGHT = 4;

/**
 * Where small entries' segments end is decided by their content, not by a running count: after
 * an entry whose path hashes to 0 mod CUT_MODULUS once the segment holds SEGMENT_TARGET / 2, and
 * always past SEGMENT_TARGET * 2. An edit changes its own segment's length, not where the
 * segments after it are cut, so they come out byte for byte as before and are copied (reuse).
 */
const CUT_MODULUS = 32;
const cutAfter = (path: string): boolean => crc32(path) % CUT_MODULUS === 0;

/** Source segments a rewrite may copy instead of compressing: their tar bytes and compressed bytes. */
export interface SegmentSource {
  /** A segment of the source whose tar bytes are exactly `u`, or undefined. */
  match(u: Buffer, crc: number): { c: Buffer; sha256: string } | undefined;
}

/** A segment `copySegment` wrote: `length` bytes at output offset `at`, which are the source's at `from`. */
export interface CopiedSegment {
  at: number;
  from: number;
  length: number;
}

const TYPES: Record<string, IndexEntryType> = { '0': 'file', '\0': 'file', '7': 'contiguous-file', '5': 'directory', '2': 'symlink', '1': 'link' };

/**
 * Turns the tar stream a transform writes into the seekable gzip layout (seek-format.ts) on
 * `out`: it follows the stream's block structure to find entry boundaries, cuts segments there
 * (small entries grouped up to SEGMENT_TARGET, a large file's data in SEGMENT_MAX pieces of its
 * own), deflates each segment on its own on the libuv pool, several at once, and writes them in
 * order, then the trailer and the index. Memory: the segments in flight.
 */
export class SeekableWriter extends Writable {
  private readonly level: number;
  private seg: Buffer[] = [];
  private segLen = 0;
  private uOff = 0;
  /** Bytes of the header block (or PAX data) being assembled. */
  private hdr: Buffer[] = [];
  private hdrLen = 0;
  /** What the bytes coming next are. */
  private state: { kind: 'header' } | { kind: 'meta'; flag: number; left: number; size: number } | { kind: 'data'; left: number; big: boolean } | { kind: 'end' } = { kind: 'header' };
  private entryStart = -1;
  private pax: Record<string, string> = {};
  private longName: string | undefined;
  private lastBig = false;
  private lastCut = false;
  private readonly entries: IndexEntry[] = [];
  private readonly segments: Segment[] = [];
  private readonly inFlight: Promise<{ c: Buffer; uLen: number; crc: number; sha256?: string; from?: number }>[] = [];
  private cOff = GZIP_HEADER.length;
  private crc = 0;
  private started = false;

  /** Segments copied from the source, and compressed. */
  reused = 0;
  compressed = 0;
  private readonly source: SegmentSource | undefined;
  private readonly onCopy: ((copy: CopiedSegment) => void) | undefined;

  constructor(private readonly out: Writable, opts: { level: number; source?: SegmentSource | undefined; signal?: AbortSignal | undefined; onCopy?: ((copy: CopiedSegment) => void) | undefined }) {
    super({ highWaterMark: 1 << 20 });
    this.level = opts.level;
    this.source = opts.source;
    this.onCopy = opts.onCopy;
    // As a pipeline would: the output's failure is seen through send() and the consumer; destroying
    // it with ours must not surface as an unhandled error once its consumer has gone.
    out.on('error', () => {});
    this.on('error', () => {}); // likewise: the transform writing into it sees its failures
    // Aborted while waiting on an output nobody reads any more (the put gave up): stop, and stop it.
    const onAbort = (): void => { this.destroy(opts.signal?.reason instanceof Error ? opts.signal.reason : new StorageError(ErrorCode.Transient, 'aborted', { op: 'repack' })); };
    if (opts.signal?.aborted) onAbort();
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    this.once('close', () => opts.signal?.removeEventListener('abort', onAbort));
  }

  /** The index written, once the stream finished. */
  index: SeekIndex | undefined;

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    this.feed(chunk).then(() => cb(), cb);
  }

  override _final(cb: (err?: Error | null) => void): void {
    (async () => {
      if (this.state.kind !== 'end' || this.hdrLen > 0) throw new StorageError(ErrorCode.Unknown, 'the tar stream ended inside an entry', { op: 'repack' });
      this.cut();
      while (this.inFlight.length > 0) await this.emitOne();
      if (!this.started) await this.send(GZIP_HEADER);
      const ix: SeekIndex = { segments: this.segments, entries: this.entries, dataEnd: this.cOff, tarBytes: this.uOff, crc: this.crc };
      this.index = ix;
      await this.send(tail(ix));
      await new Promise<void>((resolve, reject) => this.out.end((err?: Error | null) => (err ? reject(err) : resolve())));
    })().then(() => cb(), cb);
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    // Never left open: an output neither ended nor destroyed would keep its reader waiting.
    if (!this.out.writableFinished && !this.out.destroyed) this.out.destroy(err ?? new StorageError(ErrorCode.Transient, 'the archive writer closed early', { op: 'repack' }));
    cb(err);
  }

  /**
   * Appends a segment of another seekable archive as it is (its compressed bytes, already
   * checked against its digest), with its entries (tar offsets as in that archive). Only between
   * entries: the segment being built is closed first, and the next entry starts a new one.
   */
  async copySegment(seg: Segment, c: Buffer, entries: readonly IndexEntry[]): Promise<void> {
    if (this.state.kind !== 'header' || this.hdrLen > 0 || this.entryStart >= 0) throw new StorageError(ErrorCode.Unknown, 'seekable writer: a segment copied inside an entry', { op: 'repack' });
    await this.cutAndWait();
    const shift = this.uOff - seg.uOff;
    for (const e of entries) this.entries.push({ ...e, start: e.start + shift });
    this.inFlight.push(Promise.resolve({ c, uLen: seg.uLen, crc: seg.crc, sha256: seg.sha256, from: seg.cOff }));
    this.uOff += seg.uLen;
    this.reused++;
    this.lastBig = true;
    while (this.inFlight.length >= IN_FLIGHT) await this.emitOne();
  }

  private async feed(chunk: Buffer): Promise<void> {
    let at = 0;
    while (at < chunk.length) {
      const s = this.state;
      if (s.kind === 'end') {
        this.take(chunk.subarray(at));
        return;
      }
      if (s.kind === 'data') {
        if (s.big && this.segLen >= SEGMENT_MAX) await this.cutAndWait();
        let n = Math.min(s.left, chunk.length - at);
        if (s.big) n = Math.min(n, SEGMENT_MAX - this.segLen);
        this.take(chunk.subarray(at, at + n));
        s.left -= n;
        at += n;
        if (s.left === 0) this.state = { kind: 'header' };
        continue;
      }
      // Header blocks and PAX data are gathered whole, then looked at.
      const want = s.kind === 'header' ? BLOCK : s.left;
      const n = Math.min(want - this.hdrLen, chunk.length - at);
      this.hdr.push(chunk.subarray(at, at + n));
      this.hdrLen += n;
      at += n;
      if (this.hdrLen < want) continue;
      const block = Buffer.concat(this.hdr);
      this.hdr = [];
      this.hdrLen = 0;
      await this.onBlock(block);
    }
  }

  private async onBlock(block: Buffer): Promise<void> {
    const s = this.state;
    if (s.kind === 'meta') {
      if (s.flag === 0x78) Object.assign(this.pax, paxRecords(block.subarray(0, s.size)));
      if (s.flag === 0x4c) this.longName = block.subarray(0, s.size).toString('utf8').replace(/\0.*$/s, '');
      this.take(block);
      this.state = { kind: 'header' };
      return;
    }
    if (this.entryStart < 0) {
      // A new entry begins here: the place to start a segment.
      if (isZeroBlock(block)) {
        await this.cutAndWait();
        this.state = { kind: 'end' };
        this.take(block);
        return;
      }
      if (this.lastBig || this.segLen >= SEGMENT_TARGET * 2 || (this.lastCut && this.segLen >= SEGMENT_TARGET / 2)) await this.cutAndWait();
      this.entryStart = this.uOff + this.segLen;
    }
    const flag = typeFlag(block);
    const size = numField(block, 124, 12);
    if (isMetaType(flag)) {
      this.take(block);
      if (size > 0) this.state = { kind: 'meta', flag, left: padded(size), size };
      return;
    }
    const dataSize = this.pax.size !== undefined ? Number(this.pax.size) : size;
    const type = TYPES[String.fromCharCode(flag)];
    if (type === undefined) throw new StorageError(ErrorCode.Unknown, `seekable writer: unexpected tar type ${flag}`, { op: 'repack' });
    const big = dataSize >= SEGMENT_TARGET;
    // A large file starts a segment of its own, even where its PAX headers had joined the last one.
    if (big && this.entryStart > this.uOff) await this.cutAt(this.entryStart);
    const name = this.pax.path ?? this.longName ?? ustarName(block);
    const linkname = this.pax.linkpath ?? (type === 'symlink' || type === 'link' ? block.toString('utf8', 157, 257).replace(/\0.*$/s, '') : undefined);
    const mtime = this.pax.mtime !== undefined && Number.isFinite(Number(this.pax.mtime)) ? Math.floor(Number(this.pax.mtime) * 1000) : numField(block, 136, 12) * 1000;
    this.entries.push({
      path: name.split('/').filter((p) => p !== '' && p !== '.').join('/'),
      type, size: type === 'file' || type === 'contiguous-file' ? dataSize : 0, mode: numField(block, 100, 8) & 0o7777, mtime,
      ...(linkname ? { linkname } : {}), start: this.entryStart,
    });
    this.take(block);
    this.pax = {};
    this.longName = undefined;
    this.entryStart = -1;
    this.lastBig = big;
    this.lastCut = cutAfter(name);
    if ((type === 'file' || type === 'contiguous-file') && dataSize > 0) this.state = { kind: 'data', left: padded(dataSize), big };
  }

  private take(b: Buffer): void {
    if (b.length === 0) return;
    this.seg.push(b);
    this.segLen += b.length;
  }

  /** Cuts the segment at tar offset `at` (inside the current one): the bytes after it start the next. */
  private async cutAt(at: number): Promise<void> {
    const all = Buffer.concat(this.seg);
    const keep = at - this.uOff;
    this.seg = [all.subarray(0, keep)];
    this.segLen = keep;
    await this.cutAndWait();
    this.take(all.subarray(keep));
  }

  private async cutAndWait(): Promise<void> {
    this.cut();
    while (this.inFlight.length >= IN_FLIGHT) await this.emitOne();
  }

  /** Sends the current segment to be compressed. */
  private cut(): void {
    if (this.segLen === 0) return;
    const u = this.seg.length === 1 ? this.seg[0]! : Buffer.concat(this.seg);
    this.seg = [];
    this.uOff += this.segLen;
    this.segLen = 0;
    const crc = crc32(u);
    const copy = this.source?.match(u, crc);
    if (copy) {
      this.reused++;
      this.inFlight.push(Promise.resolve({ ...copy, uLen: u.length, crc }));
      return;
    }
    this.compressed++;
    const p = deflate(u, { level: this.level, finishFlush: zc.Z_FULL_FLUSH }).then((c) => ({ c, uLen: u.length, crc }));
    p.catch(() => {}); // awaited in order by emitOne
    this.inFlight.push(p);
  }

  private async emitOne(): Promise<void> {
    const { c, uLen, crc, sha256, from } = await this.inFlight.shift()!;
    if (from !== undefined) this.onCopy?.({ at: this.cOff, from, length: c.length });
    const uOff = this.segments.length === 0 ? 0 : this.segments.at(-1)!.uOff + this.segments.at(-1)!.uLen;
    this.segments.push({ cOff: this.cOff, cLen: c.length, uOff, uLen, crc, sha256: sha256 ?? createHash('sha256').update(c).digest('hex') });
    this.crc = crc32Combine(this.crc, crc, uLen);
    this.cOff += c.length;
    if (!this.started) {
      this.started = true;
      await this.send(GZIP_HEADER);
    }
    await this.send(c);
  }

  private async send(b: Buffer): Promise<void> {
    if (this.out.destroyed) throw new StorageError(ErrorCode.Transient, 'the archive\'s output closed', { op: 'repack' });
    if (this.out.write(b)) return;
    await new Promise<void>((resolve, reject) => {
      const onDrain = (): void => { this.out.off('error', onError); this.out.off('close', onClose); resolve(); };
      const onError = (err: Error): void => { this.out.off('drain', onDrain); this.out.off('close', onClose); reject(err); };
      const onClose = (): void => { this.out.off('drain', onDrain); this.out.off('error', onError); reject(new StorageError(ErrorCode.Transient, 'the archive\'s output closed', { op: 'repack' })); };
      this.out.once('drain', onDrain).once('error', onError).once('close', onClose);
    });
  }
}
