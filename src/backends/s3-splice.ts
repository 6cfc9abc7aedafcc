import {
  AbortMultipartUploadCommand, CompleteMultipartUploadCommand, CreateMultipartUploadCommand, GetObjectCommand, UploadPartCommand,
  UploadPartCopyCommand,
} from '@aws-sdk/client-s3';
import { Readable } from 'node:stream';
import { ErrorCode, StorageError } from '../errors.js';
import type { DriverSpliceOptions, ObjectInfo, SplicePiece } from '../storage/driver.js';
import { SHA256_META } from '../storage/driver.js';
import { inLanes } from '../storage/lanes.js';
import { MAX_PARTS, MIN_PART_SIZE, type UploadTarget } from './s3-upload.js';

/** One part of a spliced upload: a range copied inside the store, or bytes sent (new ones and old ones read to pad them). */
export type SplicePart = { copy: { offset: number; length: number } } | { upload: SplicePiece[]; length: number };

/**
 * Copied runs go as parts of at most this, so the store copies a long run several parts at once
 * (queueSize) rather than in one request; S3's own limit is 5 GiB a part.
 */
const COPY_PART = 64 * 1024 * 1024;

const pieceLength = (p: SplicePiece): number => ('copy' in p ? p.copy.length : p.bytes.length);

/**
 * The parts S3's rules allow for `pieces`: every part but the last at least 5 MiB, a copied part
 * at most 64 MiB (COPY_PART). A copied run of 5 MiB or more becomes UploadPartCopy parts; new bytes are
 * padded up to 5 MiB with the old bytes that follow them (read and sent, never copied: a copy
 * cannot share a part with sent bytes), and a copied run too short to stand as a part is sent
 * with its neighbours. So each stretch of new bytes costs at most 5 MiB more than itself, plus
 * the tail of the run after it when that tail is under 5 MiB.
 */
export function planSplice(pieces: readonly SplicePiece[], partSize: number): SplicePart[] {
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
    let queue = pending;
    for (let i = 0; i < count; i++) {
      let want = Math.floor(pendingLen / count) + (i < pendingLen % count ? 1 : 0);
      const upload: SplicePiece[] = [];
      const length = want;
      while (want > 0) {
        const p = queue[0]!;
        const n = pieceLength(p);
        if (n <= want) {
          upload.push(p);
          queue = queue.slice(1);
          want -= n;
          continue;
        }
        if ('copy' in p) {
          upload.push({ copy: { offset: p.copy.offset, length: want } });
          queue = [{ copy: { offset: p.copy.offset + want, length: n - want } }, ...queue.slice(1)];
        } else {
          upload.push({ bytes: p.bytes.subarray(0, want) });
          queue = [{ bytes: p.bytes.subarray(want) }, ...queue.slice(1)];
        }
        want = 0;
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
  if (parts.length > MAX_PARTS) throw new StorageError(ErrorCode.InvalidInput, `a splice of ${parts.length} parts is over S3's ${MAX_PARTS}`, { op: 'splice' });
  return parts;
}

/** The store answered that it has no UploadPartCopy (s3rver: 501 NotImplemented). */
function notImplemented(err: unknown): boolean {
  const e = err as { name?: unknown; Code?: unknown; $metadata?: { httpStatusCode?: number } } | null;
  return e?.name === 'NotImplemented' || e?.Code === 'NotImplemented' || e?.$metadata?.httpStatusCode === 501;
}

const unquote = (etag: string | undefined): string => (etag ?? '').replace(/"/g, '');

/**
 * Replaces `key` by a multipart upload of the parts planSplice gives: copied parts are
 * UploadPartCopy of the current version's ranges, each conditional on its ETag; sent parts are
 * assembled from the new bytes and ranged GETs of that same version (If-Match, and the answer's
 * ETag compared, for stores that ignore the header). The upload starts with the caller's digest
 * in its metadata and completes with If-Match where the store enforces it. Undefined, the upload
 * aborted, when the store has no UploadPartCopy. A failed or aborted splice aborts its upload
 * (best effort: s3rver has no abort, and lifecycle rules reap what is left).
 */
export async function spliceObject(t: UploadTarget, key: string, pieces: readonly SplicePiece[], opts: DriverSpliceOptions): Promise<ObjectInfo | undefined> {
  const { client, bucket } = t;
  const signal = opts.signal;
  const parts = planSplice(pieces, t.partSize);
  const copySource = `${bucket}/${key.split('/').map(encodeURIComponent).join('/')}`;
  const replaced = (): StorageError => new StorageError(ErrorCode.PreconditionFailed, `object changed while it was spliced (expected etag ${opts.ifMatch})`, { op: 'splice', key });
  const { UploadId } = await client.send(new CreateMultipartUploadCommand({
    Bucket: bucket, Key: key, ContentType: opts.contentType, Metadata: { ...opts.metadata, [SHA256_META]: opts.sha256 },
  }), { abortSignal: signal });
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
        if ('bytes' in p) {
          at += p.bytes.copy(body, at);
          continue;
        }
        const res = await client.send(new GetObjectCommand({
          Bucket: bucket, Key: key, IfMatch: opts.ifMatch, Range: `bytes=${p.copy.offset}-${p.copy.offset + p.copy.length - 1}`,
        }), { abortSignal: signal });
        if (!(res.Body instanceof Readable)) throw new Error('S3 GetObject returned no Node stream');
        if (unquote(res.ETag) !== unquote(opts.ifMatch)) {
          res.Body.destroy();
          throw replaced();
        }
        const end = at + p.copy.length;
        for await (const chunk of res.Body as AsyncIterable<Buffer>) {
          if (at + chunk.length > end) throw new StorageError(ErrorCode.Transient, 'a ranged read returned more than its range', { op: 'splice', key });
          at += chunk.copy(body, at);
        }
        if (at !== end) throw new StorageError(ErrorCode.Transient, 'a ranged read ended early', { op: 'splice', key });
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
    etag = (await client.send(new CompleteMultipartUploadCommand({
      Bucket: bucket, Key: key, UploadId, IfMatch: t.conditionalWrites ? opts.ifMatch : undefined,
      MultipartUpload: { Parts: etags.map((ETag, i) => ({ ETag, PartNumber: i + 1 })) },
    }), { abortSignal: signal })).ETag;
  } catch (err) {
    const aborting = client.send(new AbortMultipartUploadCommand({ Bucket: bucket, Key: key, UploadId }), { abortSignal: AbortSignal.timeout(10_000) }).catch(() => {});
    if (!signal?.aborted) await aborting;
    if (notImplemented(err)) return undefined;
    throw err;
  }
  return {
    key, size: opts.size, sha256: opts.sha256, etag, contentType: opts.contentType, metadata: { ...opts.metadata }, modified: new Date(),
  };
}
