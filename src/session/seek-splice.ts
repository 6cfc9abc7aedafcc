import { createHash } from 'node:crypto';
import { Writable, type Readable } from 'node:stream';
import type { Bucket } from '../storage/bucket.js';
import type { CheckedRange, ObjectInfo, SplicePiece } from '../storage/driver.js';
import { CONTENT_TYPE, GZIP_LEVEL } from './archive.js';
import type { PlanOp } from './plan.js';
import { rewriteSegments } from './seek-edit.js';
import { GZIP_HEADER, sha256Hex, type SeekIndex } from './seek-format.js';
import type { CopiedSegment } from './seek-writer.js';

/** New bytes a splice holds in memory at most (the dirty segments and the puts' bodies); a larger edit streams. */
const SPLICE_MAX_NEW = 64 << 20;

/** The store refused to splice (remembered by its driver), or this splice cannot be done: the edit is written by the streaming put instead. */
export class SpliceUnsupported extends Error {}

/**
 * Whether an edit placed by `dirtySegments` should be spliced inside the store rather than
 * streamed to it: only when the most a splice can upload, the new bytes plus the old bytes the
 * store's part rules send beside them (Bucket.spliceOverhead, old bytes following each dirty
 * group; on S3 (2 x groups + 1) x 5 MiB, on Azure none), is less than the archive the streaming put would
 * upload. A larger margin would stream one-group edits of archives just over 15 MiB on S3, and
 * those would then upload more than the 3 x 5 MiB plus the file.
 */
export function shouldSplice(bucket: Bucket, current: ObjectInfo, ix: SeekIndex, ops: readonly PlanOp[], groups: Map<number, number>): boolean {
  if (!bucket.canSplice || current.etag === undefined) return false;
  let fresh = 0;
  for (const [first, last] of groups) for (let i = first; i <= last; i++) fresh += ix.segments[i]!.uLen;
  for (const o of ops) if (o.op === 'put') fresh += 'bytes' in o.body ? o.body.bytes.length : o.body.size;
  return fresh <= SPLICE_MAX_NEW && fresh + bucket.spliceOverhead(groups.size) < current.size;
}

/**
 * The new archive as it flows, hashed in order and recorded as pieces: the bytes the writer
 * copied from the source (told by its onCopy marks) as ranges of the source, merged where they
 * are contiguous there, the rest kept as new bytes.
 */
class PieceRecorder extends Writable {
  readonly pieces: SplicePiece[] = [];
  size = 0;
  private readonly hash = createHash('sha256');
  private readonly marks: CopiedSegment[] = [];
  private fresh: Buffer[] = [];

  constructor(private readonly progress: (bytes: number) => void) {
    super({ highWaterMark: 1 << 20 });
  }

  /** The next bytes at `copy.at` are the source's at `copy.from`; marks come in output order. */
  mark(copy: CopiedSegment): void {
    this.marks.push(copy);
  }

  get sha256(): string {
    return this.hash.copy().digest('hex');
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    this.hash.update(chunk);
    for (let off = 0; off < chunk.length;) {
      const m = this.marks[0];
      if (m && this.size >= m.at) {
        const n = Math.min(chunk.length - off, m.at + m.length - this.size);
        this.copied(m.from + (this.size - m.at), n);
        if (this.size + n === m.at + m.length) this.marks.shift();
        off += n;
        this.size += n;
      } else {
        const n = Math.min(chunk.length - off, m ? m.at - this.size : Infinity);
        this.fresh.push(chunk.subarray(off, off + n));
        off += n;
        this.size += n;
      }
    }
    this.progress(this.size);
    cb();
  }

  override _final(cb: (err?: Error | null) => void): void {
    this.endFresh();
    cb();
  }

  private copied(offset: number, length: number): void {
    this.endFresh();
    const last = this.pieces.at(-1);
    if (last && 'copy' in last && last.copy.offset + last.copy.length === offset) last.copy = { offset: last.copy.offset, length: last.copy.length + length };
    else this.pieces.push({ copy: { offset, length } });
  }

  private endFresh(): void {
    if (this.fresh.length === 0) return;
    this.pieces.push({ bytes: Buffer.concat(this.fresh) });
    this.fresh = [];
  }
}

/**
 * An edit `dirtySegments` placed, spliced inside the store: the stored archive is read once (its
 * whole digest and each segment's checked, as the streaming edit does) to hash the new archive
 * in order, which the store needs in the metadata before the first part; then the store
 * assembles it from its own unchanged ranges and the new segments (Bucket.splice). Only the new
 * bytes, and the old bytes the store's part rules need beside them, are uploaded. The source's
 * etag conditions every copied range, so a source replaced meanwhile fails PreconditionFailed.
 * Throws SpliceUnsupported, nothing written, when the store cannot splice.
 */
export async function spliceRewrite(bucket: Bucket, key: string, current: { stream: Readable; info: ObjectInfo }, ix: SeekIndex, ops: readonly PlanOp[], mtime: Date, groups: Map<number, number>,
  opts: { metadata: Record<string, string>; signal: AbortSignal; progress: (bytes: number) => void; warn: (message: string, err: unknown) => void; beforeCommit?: (() => Promise<void>) | undefined }): Promise<{ info: ObjectInfo; entries: number; reused: number; compressed: number }> {
  const etag = current.info.etag!;
  const recorder = new PieceRecorder(opts.progress);
  // The old bytes a splice may send: the segments, each checked against its digest as this read
  // copies it, and the gzip header, which rewriteSegments reports copied only when the source's
  // is the writer's GZIP_HEADER (ours always are).
  const checked: CheckedRange[] = ix.segments.map((g) => ({ offset: g.cOff, length: g.cLen, sha256: g.sha256 }));
  const rewrote = await rewriteSegments(current.stream, ix, key, ops, mtime, groups, recorder, GZIP_LEVEL, opts.signal, (c) => {
    if (c.from === 0) checked.unshift({ offset: 0, length: GZIP_HEADER.length, sha256: sha256Hex(GZIP_HEADER) });
    recorder.mark(c);
  });
  // Group commit seals its batch here: from now on the store may hold the new version.
  await opts.beforeCommit?.();
  const info = await bucket.splice(key, recorder.pieces, {
    ifMatch: etag, sha256: recorder.sha256, size: recorder.size, checked, contentType: CONTENT_TYPE, metadata: opts.metadata, signal: opts.signal, warn: opts.warn,
  });
  if (!info) throw new SpliceUnsupported('the store cannot splice this edit');
  return { info, ...rewrote };
}
