import {
  AbortMultipartUploadCommand, CompleteMultipartUploadCommand, CopyObjectCommand, CreateMultipartUploadCommand, HeadObjectCommand,
  UploadPartCopyCommand, type HeadObjectCommandOutput, type S3Client,
} from '@aws-sdk/client-s3';
import { inLanes } from '../storage/lanes.js';
import { MAX_PARTS, MIN_PART_SIZE } from './s3-upload.js';

const MiB = 1024 * 1024;
/** The largest source CopyObject takes; bigger objects are copied part by part (UploadPartCopy). */
export const MAX_COPY_OBJECT = 5 * 1024 * MiB;

export interface CopyTarget {
  client: S3Client;
  bucket: string;
  queueSize: number;
  conditionalWrites: boolean;
  /** Sources larger than this are copied with UploadPartCopy. */
  maxCopyObject: number;
  /** Bytes per part of a multipart copy. */
  copyPartSize: number;
}

/**
 * Server-side: CopyObject keeps metadata and content type (MetadataDirective COPY). A source over
 * 5 GiB, which CopyObject refuses, is copied as a multipart upload of UploadPartCopy ranges. The
 * destination conditions (If-None-Match, If-Match) go with the request that makes it visible.
 */
export async function copyObject(t: CopyTarget, src: string, dst: string, opts: { ifAbsent: boolean; ifMatch?: string | undefined }): Promise<void> {
  const head = await t.client.send(new HeadObjectCommand({ Bucket: t.bucket, Key: src }));
  const copySource = `${t.bucket}/${src.split('/').map(encodeURIComponent).join('/')}`;
  const conditions = {
    IfNoneMatch: opts.ifAbsent && t.conditionalWrites ? '*' : undefined,
    IfMatch: t.conditionalWrites ? opts.ifMatch : undefined,
  };
  if ((head.ContentLength ?? 0) <= t.maxCopyObject) {
    await t.client.send(new CopyObjectCommand({
      Bucket: t.bucket, Key: dst, CopySource: copySource, MetadataDirective: 'COPY', ...conditions,
    }));
  } else {
    await copyInParts(t, head, copySource, dst, conditions);
  }
}

/**
 * Every part is copied only if the source still has the ETag read before the first one
 * (x-amz-copy-source-if-match): a source replaced mid-copy fails the copy instead of leaving a
 * mix of two versions. Metadata, with the digest, is the source's, set when the upload starts.
 */
async function copyInParts(t: CopyTarget, head: HeadObjectCommandOutput, copySource: string, dst: string,
  conditions: { IfNoneMatch: string | undefined; IfMatch: string | undefined }): Promise<void> {
  const size = head.ContentLength ?? 0;
  const partSize = Math.max(MIN_PART_SIZE, t.copyPartSize, Math.ceil(size / MAX_PARTS));
  const { UploadId } = await t.client.send(new CreateMultipartUploadCommand({
    Bucket: t.bucket, Key: dst, ContentType: head.ContentType, Metadata: head.Metadata,
  }));
  try {
    const count = Math.ceil(size / partSize);
    const etags: string[] = [];
    let next = 0;
    await inLanes(t.queueSize, async () => {
      if (next === count) return undefined;
      const i = next++;
      return async () => {
        const start = i * partSize;
        const res = await t.client.send(new UploadPartCopyCommand({
          Bucket: t.bucket, Key: dst, UploadId, PartNumber: i + 1, CopySource: copySource,
          CopySourceRange: `bytes=${start}-${Math.min(size, start + partSize) - 1}`, CopySourceIfMatch: head.ETag,
        }));
        etags[i] = res.CopyPartResult?.ETag ?? '';
      };
    });
    await t.client.send(new CompleteMultipartUploadCommand({
      Bucket: t.bucket, Key: dst, UploadId, ...conditions,
      MultipartUpload: { Parts: etags.map((ETag, i) => ({ ETag, PartNumber: i + 1 })) },
    }));
  } catch (err) {
    await t.client.send(new AbortMultipartUploadCommand({ Bucket: t.bucket, Key: dst, UploadId })).catch(() => {});
    throw err;
  }
}
