import {
  AbortMultipartUploadCommand, CompleteMultipartUploadCommand, CreateMultipartUploadCommand, PutObjectCommand, UploadPartCommand,
  type PutObjectCommandInput, type PutObjectCommandOutput, type S3Client,
} from '@aws-sdk/client-s3';
// Types only (erased): the middleware signature of the SDK's own dependency.
import type { BuildMiddleware } from '@smithy/types';
import { ErrorCode, StorageError } from '../errors.js';
import type { DriverPutOptions, ObjectInfo, PutBody } from '../storage/driver.js';
import { SHA256_META } from '../storage/driver.js';
import { inLanes } from '../storage/lanes.js';

/** S3 refuses parts below 5 MiB (except the last) and uploads of more than 10,000 parts. */
export const MIN_PART_SIZE = 5 * 1024 * 1024;
export const MAX_PARTS = 10_000;

export interface UploadTarget {
  client: S3Client;
  bucket: string;
  partSize: number;
  /** Largest body of known size sent as one PutObject (held whole); at least partSize. */
  singlePutSize: number;
  /** Parts uploaded at once. */
  queueSize: number;
  /** Send If-None-Match / If-Match; false for stores that ignore them (the Bucket then checks first). */
  conditionalWrites: boolean;
}

/**
 * One PutObject for a body of known size up to `singlePutSize` (at least a part), else a
 * multipart upload. A single PutObject is one request where a multipart upload of the same
 * bytes is at least three, and the store need not concatenate parts; its buffer is no larger than
 * the part buffers a multipart upload holds (the default singlePutSize is partSize x (queueSize +
 * 1)). Such a body may come without its digest: it is hashed as it fills the buffer, and the
 * digest goes into the metadata of the PutObject sent after. The bytes are pulled
 * into at most `queueSize + 1` part buffers, reused from part to part: one filling (and hashing)
 * while up to `queueSize` upload. lib-storage's Upload copies every part into a fresh buffer
 * (Buffer.concat), 4 GiB of allocation for a 2 GiB object, and its memory grew with the size.
 * The object becomes visible only after the body has ended and passed its digest check: the
 * single PutObject is sent once a read saw the end (its buffer is one byte longer than the known
 * size), and CompleteMultipartUpload once the last part's read did. A file that grows or changes
 * while it is read fails that check, so no request ever commits bytes other than the digest's.
 */
export async function uploadObject(t: UploadTarget, key: string, body: PutBody, opts: DriverPutOptions): Promise<ObjectInfo> {
  const single = body.size !== undefined && body.size <= t.singlePutSize;
  if (body.sha256 === undefined && !single) throw new Error('S3Driver.put needs the digest before a multipart upload (see digestAtEndUpTo)');
  const { client, bucket } = t;
  const signal = opts.signal;
  // A known size may need bigger parts to stay within S3's part count.
  const partSize = body.size === undefined ? t.partSize : Math.max(t.partSize, Math.ceil(body.size / MAX_PARTS));
  const target = (sha256: string) => ({
    Bucket: bucket, Key: key, ContentType: opts.contentType,
    Metadata: { ...opts.metadata, [SHA256_META]: sha256 },
  });
  // Sent on PutObject and CompleteMultipartUpload: the object appears only if the key is free
  // (If-None-Match) or still holds the version the caller read (If-Match).
  const conditions = {
    IfNoneMatch: opts.ifAbsent && t.conditionalWrites ? '*' : undefined,
    IfMatch: t.conditionalWrites ? opts.ifMatch : undefined,
  };
  const free: Buffer[] = [];
  // A body sent whole gets a buffer one byte longer than its size, so one read sees its end.
  const take = () => free.pop() ?? Buffer.allocUnsafeSlow(single ? body.size! + 1 : partSize);

  const first = take();
  const firstLength = await fillPart(body, first, signal);
  const second = firstLength === first.length ? take() : undefined;
  const secondLength = second ? await fillPart(body, second, signal) : 0;
  let etag: string | undefined;
  if (secondLength === 0) {
    // The body ended, so its digest is known and checked (the caller's, or computed as it filled the buffer).
    const sha256 = body.sha256 ?? body.digest().sha256;
    const put = new PutObjectCommand({ ...target(sha256), ...conditions, Body: first.subarray(0, firstLength), ContentLength: firstLength });
    put.middlewareStack.add(contentSha256(sha256), CONTENT_SHA256_STEP);
    etag = (await client.send(put, { abortSignal: signal })).ETag;
  } else if (body.sha256 === undefined) {
    // Longer than its size, so it would fail its check at its end anyway: nothing was sent.
    throw new StorageError(ErrorCode.ChecksumMismatch, `size: more than the expected ${body.size!} bytes`, { op: 'put', key });
  } else {
    const { UploadId } = await client.send(new CreateMultipartUploadCommand(target(body.sha256)), { abortSignal: signal });
    try {
      const etags: string[] = [];
      const filled = [{ buf: first, n: firstLength }, { buf: second!, n: secondLength }];
      let part = 0;
      await inLanes(t.queueSize, async () => {
        let next = filled.shift();
        if (!next) {
          const buf = take();
          next = { buf, n: await fillPart(body, buf, signal) };
          if (next.n === 0) return undefined;
        }
        const { buf, n } = next;
        const number = ++part;
        return async () => {
          try {
            const res = await client.send(new UploadPartCommand({
              Bucket: bucket, Key: key, UploadId, PartNumber: number, Body: buf.subarray(0, n), ContentLength: n,
            }), { abortSignal: signal });
            etags[number - 1] = res.ETag ?? '';
          } finally {
            // Settled, retries included: the SDK holds the buffer no longer.
            free.push(buf);
          }
        };
      });
      etag = (await client.send(new CompleteMultipartUploadCommand({
        Bucket: bucket, Key: key, UploadId, ...conditions,
        MultipartUpload: { Parts: etags.map((ETag, i) => ({ ETag, PartNumber: i + 1 })) },
      }), { abortSignal: signal })).ETag;
    } catch (err) {
      // Best effort: parts left behind are invisible, and a bucket lifecycle rule
      // (AbortIncompleteMultipartUpload) reaps those a crash or a failed abort leaves.
      const aborting = client.send(new AbortMultipartUploadCommand({ Bucket: bucket, Key: key, UploadId }), { abortSignal: AbortSignal.timeout(10_000) }).catch(() => {});
      // A cancelled put (a worker stopping) must not wait on a store that may not answer.
      if (!signal?.aborted) await aborting;
      throw err;
    }
  }
  return {
    key, size: body.digest().size, sha256: body.digest().sha256, etag, contentType: opts.contentType,
    metadata: { ...opts.metadata },
    // Neither PutObject nor CompleteMultipartUpload report LastModified; a HEAD would cost a
    // request and could see a later writer's object.
    modified: new Date(),
  };
}

const CONTENT_SHA256_STEP = { step: 'build', name: 'stevedoreContentSha256' } as const;

/**
 * SigV4 signs a request's payload by its SHA-256 (`x-amz-content-sha256`), which the SDK computes
 * over the whole body unless the request carries the header (@smithy/signature-v4 getPayloadHash
 * takes it as it is): a second SHA-256 of every byte uploaded, for a digest the put already holds,
 * checked against the body. Sent here, the signature covers our digest and the store checks the
 * payload against it (S3 answers XAmzContentSHA256Mismatch otherwise): the same check, one hash.
 */
function contentSha256(sha256: string): BuildMiddleware<PutObjectCommandInput, PutObjectCommandOutput> {
  return (next) => (args) => {
    const req = args.request as { headers?: Record<string, string> };
    if (req.headers) req.headers['x-amz-content-sha256'] = sha256;
    return next(args);
  };
}

/** Reads the body into `buf` until it is full or the body ends (its digest then checked); returns the bytes read. */
async function fillPart(body: PutBody, buf: Buffer, signal: AbortSignal | undefined): Promise<number> {
  let n = 0;
  while (n < buf.length) {
    signal?.throwIfAborted();
    const got = await body.read(buf.subarray(n));
    if (got === 0) break;
    n += got;
  }
  return n;
}
