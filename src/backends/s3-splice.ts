import {
  AbortMultipartUploadCommand, CompleteMultipartUploadCommand, CreateMultipartUploadCommand, GetObjectCommand, HeadObjectCommand,
  UploadPartCommand, UploadPartCopyCommand,
} from '@aws-sdk/client-s3';
import { createHash } from 'node:crypto';
import { Readable } from 'node:stream';
import { ErrorCode, StorageError } from '../errors.js';
import type { CheckedRange, DriverSpliceOptions, ObjectInfo, SplicePiece } from '../storage/driver.js';
import { SHA256_META } from '../storage/driver.js';
import { inLanes } from '../storage/lanes.js';
import { MAX_PARTS, MIN_PART_SIZE, type UploadTarget } from './s3-upload.js';

/** One part of a spliced upload: a range copied inside the store, or bytes sent (new ones and old ones read to pad them). */
export type SplicePart = { copy: { offset: number; length: number } } | { upload: SplicePiece[]; length: number };

/**
 * Copied runs go as parts of at most this, so the store copies a long run several parts at once
 * (queueSize) rather than in one request; S3's own limit is 5 GiB a part.
 */
export const COPY_PART = 64 * 1024 * 1024;

const pieceLength = (p: SplicePiece): number => ('copy' in p ? p.copy.length : p.bytes.length);
/** `length` bytes of `p` from `from` on. */
const slice = (p: SplicePiece, from: number, length: number): SplicePiece =>
  ('copy' in p ? { copy: { offset: p.copy.offset + from, length } } : { bytes: p.bytes.subarray(from, from + length) });

/**
 * planSplice's bound on the old bytes a splice sends beside the new ones, when old bytes follow
 * `stretches` stretches of new bytes: up to 5 MiB of padding and a run's short tail after each,
 * and a short run at the start (a stretch at the object's end costs nothing).
 */
export const spliceOverhead = (stretches: number): number => (2 * stretches + 1) * MIN_PART_SIZE;

/**
 * The parts S3's rules allow for `pieces`: every part but the last at least 5 MiB, a copied part
 * at most 64 MiB (COPY_PART). A copied run of 5 MiB or more becomes UploadPartCopy parts; new bytes are
 * padded up to 5 MiB with the old bytes that follow them (read and sent, never copied: a copy
 * cannot share a part with sent bytes), and a copied run too short to stand as a part is sent
 * with its neighbours. So each stretch of new bytes costs at most 5 MiB more than itself, plus
 * the tail of the run after it when that tail is under 5 MiB. Undefined when that takes more
 * than S3's 10,000 parts: such an object is written whole.
 */
export function planSplice(pieces: readonly SplicePiece[], partSize: number): SplicePart[] | undefined {
  const parts: SplicePart[] = [];
  let pending: SplicePiece[] = [];
  let pendingLen = 0;
  const take = (p: SplicePiece): void => {
    const last = pending.at(-1);
    // Neighbouring old ranges read as one GET.
    if (last && 'copy' in last && 'copy' in p && last.copy.offset + last.copy.length === p.copy.offset) last.copy = { offset: last.copy.offset, length: last.copy.length + p.copy.length };
    else pending.push('copy' in p ? { copy: { ...p.copy } } : p);
    pendingLen += pieceLength(p);
  };
  // Sent bytes go as parts of about partSize, each at least 5 MiB (only the object's last part may be less).
  const flush = (): void => {
    if (pendingLen === 0) return;
    const count = Math.max(1, Math.min(Math.ceil(pendingLen / partSize), Math.floor(pendingLen / MIN_PART_SIZE)));
    // pending[q], or what is left of it once a part took its start.
    let q = 0;
    let rest = pending[0];
    for (let i = 0; i < count; i++) {
      const length = Math.floor(pendingLen / count) + (i < pendingLen % count ? 1 : 0);
      const upload: SplicePiece[] = [];
      for (let want = length; want > 0;) {
        const p = rest!;
        const n = pieceLength(p);
        if (n > want) {
          upload.push(slice(p, 0, want));
          rest = slice(p, want, n - want);
          break;
        }
        upload.push(p);
        want -= n;
        rest = pending[++q];
      }
      parts.push({ upload, length });
    }
    pending = [];
    pendingLen = 0;
  };
  for (const p of pieces) {
    if ('bytes' in p) {
      if (p.bytes.length > 0) take(p);
      continue;
    }
    let { offset, length } = p.copy;
    if (pendingLen > 0 && pendingLen < MIN_PART_SIZE) {
      const pad = Math.min(length, MIN_PART_SIZE - pendingLen);
      take({ copy: { offset, length: pad } });
      offset += pad;
      length -= pad;
    }
    if (length === 0) continue;
    if (length < MIN_PART_SIZE) {
      take({ copy: { offset, length } });
      continue;
    }
    flush();
    const count = Math.ceil(length / COPY_PART);
    for (let i = 0, at = offset; i < count; i++) {
      const n = Math.floor(length / count) + (i < length % count ? 1 : 0);
      parts.push({ copy: { offset: at, length: n } });
      at += n;
    }
  }
  flush();
  return parts.length > MAX_PARTS ? undefined : parts;
}

/** The store answered that it has no UploadPartCopy (s3rver: 501 NotImplemented). */
function notImplemented(err: unknown): boolean {
  const e = err as { name?: unknown; Code?: unknown; $metadata?: { httpStatusCode?: number } } | null;
  return e?.name === 'NotImplemented' || e?.Code === 'NotImplemented' || e?.$metadata?.httpStatusCode === 501;
}

const unquote = (etag: string | undefined): string => (etag ?? '').replace(/"/g, '');

/**
 * The checked ranges that together cover `[offset, offset + length)`, in order: a padding read
 * fetches them whole so each is checked against the digest the first read checked.
 */
function covering(checked: readonly CheckedRange[], offset: number, length: number): CheckedRange[] | undefined {
  let lo = 0;
  for (let hi = checked.length; lo < hi;) {
    const mid = (lo + hi) >> 1;
    if (checked[mid]!.offset + checked[mid]!.length <= offset) lo = mid + 1;
    else hi = mid;
  }
  const out: CheckedRange[] = [];
  for (let at = offset, i = lo; at < offset + length; i++) {
    const r = checked[i];
    if (!r || r.offset > at) return undefined;
    out.push(r);
    at = r.offset + r.length;
  }
  return out;
}

/**
 * Replaces `key` by a multipart upload of `parts` (planSplice): copied parts are UploadPartCopy
 * of the current version's ranges, each conditional on its ETag; sent parts are assembled from
 * the new bytes and ranged GETs of that same version (If-Match, and the answer's ETag compared,
 * for stores that ignore the header), each GET widened to whole `checked` ranges and each of
 * those checked against its digest, so the old bytes sent are those the caller hashed. The
 * upload starts with the caller's digest in its metadata and completes with If-Match where the
 * store enforces it, else after a stat (the parts make `size` bytes: Bucket.splice checked the
 * pieces, whose bytes planSplice keeps). Undefined, the upload aborted, when the store has no
 * UploadPartCopy. A source replaced meanwhile fails PreconditionFailed (one deleted fails
 * NotFound, which Bucket.splice makes PreconditionFailed). A failed splice aborts its upload
 * (best effort: s3rver has no abort, and lifecycle rules reap what is left; a failed abort is
 * told to `opts.warn`).
 */
export async function spliceObject(t: UploadTarget, key: string, parts: readonly SplicePart[], opts: DriverSpliceOptions): Promise<ObjectInfo | undefined> {
  const { client, bucket } = t;
  const signal = opts.signal;
  const copySource = `${bucket}/${key.split('/').map(encodeURIComponent).join('/')}`;
  const replaced = (cause?: unknown): StorageError => new StorageError(ErrorCode.PreconditionFailed, `object changed while it was spliced (expected etag ${opts.ifMatch})`, { op: 'splice', key, cause });
  /** Old bytes `[offset, offset + length)` into `body` at `at`, read as whole checked ranges and checked. */
  const readOld = async (offset: number, length: number, body: Buffer, at: number): Promise<void> => {
    const ranges = covering(opts.checked, offset, length);
    if (!ranges) throw new StorageError(ErrorCode.Unknown, `old bytes ${offset}+${length} to send have no digest to check them by`, { op: 'splice', key });
    const first = ranges[0]!.offset;
    const last = ranges.at(-1)!;
    const res = await client.send(new GetObjectCommand({
      Bucket: bucket, Key: key, IfMatch: opts.ifMatch, Range: `bytes=${first}-${last.offset + last.length - 1}`,
    }), { abortSignal: signal });
    if (!(res.Body instanceof Readable)) throw new StorageError(ErrorCode.Unknown, 'S3 GetObject returned no Node stream', { op: 'splice', key });
    if (unquote(res.ETag) !== unquote(opts.ifMatch)) {
      res.Body.destroy();
      throw replaced();
    }
    let pos = first;
    let r = 0;
    let hash = createHash('sha256');
    for await (const chunk of res.Body as AsyncIterable<Buffer>) {
      for (let off = 0; off < chunk.length;) {
        const range = ranges[r];
        if (!range) throw new StorageError(ErrorCode.Transient, 'a ranged read returned more than its range', { op: 'splice', key });
        const n = Math.min(chunk.length - off, range.offset + range.length - pos);
        const piece = chunk.subarray(off, off + n);
        hash.update(piece);
        // The part of the piece inside the wanted bytes.
        const from = Math.max(pos, offset);
        const to = Math.min(pos + n, offset + length);
        if (from < to) piece.copy(body, at + from - offset, from - pos, to - pos);
        pos += n;
        off += n;
        if (pos === range.offset + range.length) {
          if (hash.digest('hex') !== range.sha256) {
            throw new StorageError(ErrorCode.ChecksumMismatch, `old bytes ${range.offset}+${range.length} read to pad a part differ from those hashed before`, { op: 'splice', key });
          }
          hash = createHash('sha256');
          r++;
        }
      }
    }
    if (r !== ranges.length) throw new StorageError(ErrorCode.Transient, 'a ranged read ended early', { op: 'splice', key });
  };
  const created = await client.send(new CreateMultipartUploadCommand({
    Bucket: bucket, Key: key, ContentType: opts.contentType, Metadata: { ...opts.metadata, [SHA256_META]: opts.sha256 },
  }), { abortSignal: signal }).catch((err: unknown) => {
    if (notImplemented(err)) return undefined;
    throw err;
  });
  if (!created) return undefined;
  const { UploadId } = created;
  let etag: string | undefined;
  try {
    const etags: string[] = [];
    let next = 0;
    await inLanes(t.queueSize, async () => {
      if (next === parts.length) return undefined;
      const number = ++next;
      const part = parts[number - 1]!;
      if ('copy' in part) {
        return async () => {
          const res = await client.send(new UploadPartCopyCommand({
            Bucket: bucket, Key: key, UploadId, PartNumber: number, CopySource: copySource,
            CopySourceRange: `bytes=${part.copy.offset}-${part.copy.offset + part.copy.length - 1}`, CopySourceIfMatch: opts.ifMatch,
          }), { abortSignal: signal });
          etags[number - 1] = res.CopyPartResult?.ETag ?? '';
        };
      }
      const body = Buffer.allocUnsafe(part.length);
      let at = 0;
      for (const p of part.upload) {
        if ('bytes' in p) at += p.bytes.copy(body, at);
        else {
          await readOld(p.copy.offset, p.copy.length, body, at);
          at += p.copy.length;
        }
      }
      return async () => {
        const res = await client.send(new UploadPartCommand({
          Bucket: bucket, Key: key, UploadId, PartNumber: number, Body: body, ContentLength: body.length,
        }), { abortSignal: signal });
        etags[number - 1] = res.ETag ?? '';
      };
    });
    // A job that lost its lock meanwhile must not commit.
    signal?.throwIfAborted();
    if (!t.conditionalWrites) {
      // The store would not condition the complete: the version is checked as late as it can be (not race-free).
      const head = await client.send(new HeadObjectCommand({ Bucket: bucket, Key: key }), { abortSignal: signal });
      if (unquote(head.ETag) !== unquote(opts.ifMatch)) throw replaced();
    }
    etag = (await client.send(new CompleteMultipartUploadCommand({
      Bucket: bucket, Key: key, UploadId, IfMatch: t.conditionalWrites ? opts.ifMatch : undefined,
      MultipartUpload: { Parts: etags.map((ETag, i) => ({ ETag, PartNumber: i + 1 })) },
    }), { abortSignal: signal })).ETag;
  } catch (err) {
    const aborting = client.send(new AbortMultipartUploadCommand({ Bucket: bucket, Key: key, UploadId }), { abortSignal: AbortSignal.timeout(10_000) })
      .catch((abortErr: unknown) => { if (!notImplemented(abortErr)) opts.warn?.('a failed splice could not abort its multipart upload (a lifecycle rule reaps its parts)', abortErr); });
    if (!signal?.aborted) await aborting;
    if (notImplemented(err)) return undefined;
    throw err;
  }
  return {
    key, size: opts.size, sha256: opts.sha256, etag, contentType: opts.contentType, metadata: { ...opts.metadata }, modified: new Date(),
  };
}
