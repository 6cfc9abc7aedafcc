import { Readable } from 'node:stream';
import {
  DeleteObjectCommand, GetObjectCommand, HeadBucketCommand, HeadObjectCommand, ListObjectsV2Command, S3Client, type S3ClientConfig,
} from '@aws-sdk/client-s3';
import { ErrorCode, StorageError, codeForHttpStatus } from '../errors.js';
import { emptyObjectRange } from './empty-range.js';
import { backendUrl } from './url-params.js';
import type { ByteRange, Driver, DriverDeleteOptions, DriverGetResult, DriverPutOptions, DriverSpliceOptions, ListPage, ObjectInfo, PutBody, SplicePiece } from '../storage/driver.js';
import { SHA256_META } from '../storage/driver.js';
import { MAX_COPY_OBJECT, copyObject } from './s3-copy.js';
import { planSplice, spliceObject, spliceOverhead } from './s3-splice.js';
import { MIN_PART_SIZE, uploadObject } from './s3-upload.js';

const MiB = 1024 * 1024;

export interface S3DriverOptions {
  bucket: string;
  /** Custom endpoint for S3-compatible stores (MinIO, R2, s3rver). @defaultValue AWS, from the region */
  endpoint?: string | undefined;
  /**
   * Region used for signing. @defaultValue the SDK's provider chain (AWS_REGION, ~/.aws/config);
   * `us-east-1` when `endpoint` is set, as S3-compatible stores ignore it
   */
  region?: string | undefined;
  /** Path-style URLs (`endpoint/bucket/key`), which most self-hosted stores need. @defaultValue false */
  forcePathStyle?: boolean | undefined;
  /**
   * When the SDK adds CRC checksums to requests and checks them on responses. `when_required`
   * suits S3-compatible stores that refuse the newer `x-amz-checksum-*` headers or multipart
   * checksum algorithms. @defaultValue 'when_supported'
   */
  checksums?: 'when_supported' | 'when_required' | undefined;
  /**
   * Send `If-None-Match: *` for `ifAbsent` writes and `If-Match` for `ifMatch` puts, copies and
   * deletes, so the store enforces them atomically (AWS S3, MinIO, R2). Turn off for stores that
   * ignore the headers (s3rver); the Bucket then checks with a stat first, which is not race-free.
   * @defaultValue true
   */
  conditionalWrites?: boolean | undefined;
  /** Bytes per part of a multipart upload; also the largest single-request upload. @defaultValue 8 MiB */
  partSize?: number | undefined;
  /** Parts uploaded at once; an upload holds `queueSize + 1` part buffers (one filling). @defaultValue 4 */
  queueSize?: number | undefined;
  /**
   * Largest body of known size uploaded as one PutObject, held whole in memory; such a body needs
   * no digest before it is read (it is hashed as it fills its buffer). At least partSize.
   * @defaultValue partSize x (queueSize + 1): no more memory than a multipart upload holds (40 MiB)
   */
  singlePutSize?: number | undefined;
  /**
   * Time for one request to get its response headers (a part upload included), and the longest a
   * response body may stall. @defaultValue 120000
   */
  requestTimeoutMs?: number | undefined;
  /**
   * Sources larger than this are copied with a multipart UploadPartCopy instead of one CopyObject
   * (S3 refuses CopyObject above 5 GiB). Only tests lower it. @defaultValue 5 GiB
   */
  maxCopyObject?: number | undefined;
  /** Bytes per part of a multipart copy, all server-side. @defaultValue 512 MiB */
  copyPartSize?: number | undefined;
  /**
   * Edits of seekable session archives are spliced inside the store (UploadPartCopy of the
   * unchanged ranges) instead of uploading the whole new archive. A store that answers
   * NotImplemented is remembered and written the ordinary way; `false` never tries.
   * @defaultValue true
   */
  splice?: boolean | undefined;
  /** Attempts per request, the SDK's own retry with backoff. @defaultValue 3 */
  maxAttempts?: number | undefined;
  /**
   * Explicit credentials for programmatic use and tests. Deployments leave this unset so the SDK's
   * provider chain (AWS_ACCESS_KEY_ID..., profiles, instance roles) applies; URLs never carry them.
   * @defaultValue the SDK's provider chain
   */
  credentials?: S3ClientConfig['credentials'];
}

/**
 * Options from `s3://bucket/prefix?endpoint=...&region=...&forcePathStyle=true&checksums=when_required`
 * (the prefix is the Bucket's business). Unknown parameters are refused so a typo cannot silently
 * fall back to a default.
 */
export function s3OptionsFromUrl(url: URL): S3DriverOptions {
  const { bad, int, bool, oneOf, unknown } = backendUrl(url, 's3:', 'the AWS environment');
  const opts: S3DriverOptions = { bucket: url.hostname };
  for (const [name, v] of url.searchParams) {
    switch (name) {
      case 'endpoint':
        if (!/^https?:\/\/[^/]/.test(v)) throw bad('endpoint must be an http(s) URL');
        opts.endpoint = v;
        break;
      case 'region': opts.region = v; break;
      case 'forcePathStyle': opts.forcePathStyle = bool(name, v); break;
      case 'conditionalWrites': opts.conditionalWrites = bool(name, v); break;
      case 'checksums': opts.checksums = oneOf(name, v, ['when_supported', 'when_required'] as const); break;
      case 'partSize': opts.partSize = int(name, v, MIN_PART_SIZE); break;
      case 'queueSize': opts.queueSize = int(name, v, 1); break;
      case 'singlePutSize': opts.singlePutSize = int(name, v, 0); break;
      case 'requestTimeoutMs': opts.requestTimeoutMs = int(name, v, 1); break;
      case 'maxAttempts': opts.maxAttempts = int(name, v, 1); break;
      case 'splice': opts.splice = bool(name, v); break;
      default: unknown(name);
    }
  }
  return opts;
}

export function s3DriverFromUrl(url: URL): Driver {
  return new S3Driver(s3OptionsFromUrl(url));
}

/** Amazon S3 and S3-compatible stores, through the AWS SDK v3. */
export class S3Driver implements Driver {
  readonly kind = 's3';
  /** Object metadata is fixed when the upload starts, so the Bucket must know the digest first. */
  readonly metadataAtEnd = false;
  readonly atomicIfAbsent: boolean;
  readonly atomicIfMatch: boolean;
  /** ListObjectsV2 carries no user metadata: a digest costs a HEAD per object. */
  readonly listHasDigest = false;
  readonly bucket: string;
  readonly partSize: number;
  readonly client: S3Client;
  readonly conditionalWrites: boolean;
  readonly queueSize: number;
  readonly singlePutSize: number;
  readonly maxCopyObject: number;
  readonly copyPartSize: number;
  private readonly spliceOn: boolean;
  /** Set once the store answered NotImplemented to UploadPartCopy. */
  private spliceRefused = false;

  constructor(opts: S3DriverOptions) {
    this.bucket = opts.bucket;
    this.conditionalWrites = opts.conditionalWrites ?? true;
    this.atomicIfAbsent = this.conditionalWrites;
    this.atomicIfMatch = this.conditionalWrites;
    this.partSize = opts.partSize ?? 8 * MiB;
    if (this.partSize < MIN_PART_SIZE) throw new StorageError(ErrorCode.InvalidInput, `partSize must be at least ${MIN_PART_SIZE}`, { op: 'config' });
    this.queueSize = opts.queueSize ?? 4;
    this.singlePutSize = Math.max(this.partSize, opts.singlePutSize ?? this.partSize * (this.queueSize + 1));
    this.maxCopyObject = opts.maxCopyObject ?? MAX_COPY_OBJECT;
    this.copyPartSize = Math.max(MIN_PART_SIZE, opts.copyPartSize ?? 512 * MiB);
    this.spliceOn = opts.splice ?? true;
    const checksums = opts.checksums === 'when_required' ? 'WHEN_REQUIRED' : 'WHEN_SUPPORTED';
    const timeout = opts.requestTimeoutMs ?? 120_000;
    this.client = new S3Client({
      endpoint: opts.endpoint,
      region: opts.region ?? (opts.endpoint ? 'us-east-1' : undefined),
      forcePathStyle: opts.forcePathStyle ?? false,
      credentials: opts.credentials,
      requestChecksumCalculation: checksums,
      responseChecksumValidation: checksums,
      maxAttempts: opts.maxAttempts ?? 3,
      // Without throwOnRequestTimeout the handler only logs a warning when requestTimeout passes.
      requestHandler: { connectionTimeout: 10_000, requestTimeout: timeout, socketTimeout: timeout, throwOnRequestTimeout: true },
    });
  }

  /** Bodies sent as one PutObject (up to singlePutSize) are hashed before it is sent (see uploadObject). */
  get digestAtEndUpTo(): number {
    return this.singlePutSize;
  }

  /** See uploadObject: part buffers reused, nothing visible before the body passed its digest check. */
  async put(key: string, body: PutBody, opts: DriverPutOptions): Promise<ObjectInfo> {
    return uploadObject(this, key, body, opts);
  }

  async get(key: string, range: ByteRange | undefined, signal: AbortSignal | undefined): Promise<DriverGetResult> {
    const asked = range ? `bytes=${range.start}-${range.end ?? ''}` : undefined;
    let res;
    try {
      res = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: key, Range: asked }), { abortSignal: signal });
    } catch (err) {
      return emptyObjectRange(this, key, range, signal, err);
    }
    // In Node the SDK's body is the response stream itself (or a checksum-checking Readable over it).
    if (!(res.Body instanceof Readable)) throw new Error('S3 GetObject returned no Node stream');
    const stream = res.Body;
    // A ranged response's ContentLength is the range's; the object's size follows the slash.
    const m = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(res.ContentRange ?? '');
    const size = m ? Number(m[3]) : res.ContentLength ?? 0;
    // A store or proxy that ignores or misreads Range must not pass other bytes off as the range.
    const served = m ? [Number(m[1]), Number(m[2])] : [0, size - 1];
    if (range && (served[0] !== range.start || served[1] !== Math.min(range.end ?? Infinity, size - 1))) {
      stream.destroy();
      throw new Error(`asked for ${asked}, the store answered ${res.ContentRange ?? 'with the whole object'}`);
    }
    return { stream, info: this.info(key, { ...res, ContentLength: size }) };
  }

  async stat(key: string): Promise<ObjectInfo> {
    return this.info(key, await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: key })));
  }

  /**
   * One ListObjectsV2 page. Listings carry no user metadata, so `sha256`, `contentType` and
   * `metadata` are empty here; `stat` an object for them (a HEAD per entry would make listing cost
   * one request per object).
   */
  async list(prefix: string, pageToken: string | undefined, pageSize: number): Promise<ListPage> {
    const res = await this.client.send(new ListObjectsV2Command({
      Bucket: this.bucket, Prefix: prefix || undefined, ContinuationToken: pageToken, MaxKeys: pageSize,
    }));
    return {
      objects: (res.Contents ?? []).map((o) => ({
        key: o.Key ?? '', size: o.Size ?? 0, sha256: undefined, etag: o.ETag, contentType: undefined,
        metadata: {}, modified: o.LastModified ?? new Date(0),
      })),
      next: res.IsTruncated ? res.NextContinuationToken : undefined,
    };
  }

  /** DeleteObject with If-Match where the store honours it (conditionalWrites). */
  async delete(key: string, opts: DriverDeleteOptions = {}): Promise<void> {
    const ifMatch = this.conditionalWrites ? opts.ifMatch : undefined;
    try {
      await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: key, IfMatch: ifMatch }));
    } catch (err) {
      // S3 answers a conditional delete of a missing key 404 (an unconditional one 204): still a success.
      if (ifMatch !== undefined && this.classify(err) === ErrorCode.NotFound) return;
      throw err;
    }
  }

  /** Server-side, metadata and digest included (see copyObject). */
  async copy(src: string, dst: string, opts: { ifAbsent: boolean; ifMatch?: string | undefined }): Promise<ObjectInfo> {
    await copyObject(this, src, dst, opts);
    return this.stat(dst);
  }

  get spliceable(): boolean {
    return this.spliceOn && !this.spliceRefused;
  }

  /** (2 x stretches + 1) x 5 MiB: see spliceOverhead. */
  spliceOverhead(stretches: number): number {
    return spliceOverhead(stretches);
  }

  /** See spliceObject: UploadPartCopy of the unchanged ranges, the new bytes padded to S3's part floor. */
  async splice(key: string, pieces: readonly SplicePiece[], opts: DriverSpliceOptions): Promise<ObjectInfo | undefined> {
    const parts = planSplice(pieces, this.partSize);
    if (!parts) return undefined;
    const info = await spliceObject(this, key, parts, opts);
    if (!info) this.spliceRefused = true;
    return info;
  }

  async health(): Promise<void> {
    await this.client.send(new HeadBucketCommand({ Bucket: this.bucket }));
  }

  classify(err: unknown): ErrorCode | undefined {
    if (typeof err !== 'object' || err === null) return undefined;
    const e = err as { name?: unknown; Code?: unknown; $metadata?: { httpStatusCode?: number } };
    const name = typeof e.Code === 'string' ? e.Code : typeof e.name === 'string' ? e.name : '';
    const byName = S3_CODES.get(name);
    if (byName) return byName;
    // Only service responses carry a status; anything else (sockets, aborts) is the common mapping's.
    const status = e.$metadata?.httpStatusCode;
    return status === undefined ? undefined : codeForHttpStatus(status);
  }

  async close(): Promise<void> {
    this.client.destroy();
  }

  private info(key: string, r: {
    ContentLength?: number | undefined; ETag?: string | undefined; ContentType?: string | undefined;
    LastModified?: Date | undefined; Metadata?: Record<string, string> | undefined;
  }): ObjectInfo {
    const metadata: Record<string, string> = {};
    let sha256: string | undefined;
    // S3 returns metadata names in lower case; stores that echo the sender's case are folded here.
    for (const [name, value] of Object.entries(r.Metadata ?? {})) {
      if (name.toLowerCase() === SHA256_META) sha256 = value;
      else metadata[name.toLowerCase()] = value;
    }
    return {
      key, size: r.ContentLength ?? 0, sha256, etag: r.ETag, contentType: r.ContentType, metadata,
      modified: r.LastModified ?? new Date(0),
    };
  }
}

/** S3 error codes whose meaning the HTTP status alone gets wrong or too coarse. */
const S3_CODES = new Map<string, ErrorCode>(Object.entries({
  NoSuchKey: ErrorCode.NotFound,
  NotFound: ErrorCode.NotFound,
  NoSuchBucket: ErrorCode.NotFound,
  AccessDenied: ErrorCode.PermissionDenied,
  InvalidAccessKeyId: ErrorCode.PermissionDenied,
  SignatureDoesNotMatch: ErrorCode.PermissionDenied,
  AllAccessDisabled: ErrorCode.PermissionDenied,
  PreconditionFailed: ErrorCode.PreconditionFailed,
  // A conditional write raced another write to the key; AWS says to retry (the retry then meets
  // the key as it ended up: PreconditionFailed if the other writer created it).
  ConditionalRequestConflict: ErrorCode.Transient,
  InvalidRange: ErrorCode.InvalidInput,
  // 400s and 409s that heal by themselves: timeouts, rotated credentials, bytes damaged in flight.
  RequestTimeout: ErrorCode.Transient,
  ExpiredToken: ErrorCode.Transient,
  OperationAborted: ErrorCode.Transient,
  BadDigest: ErrorCode.Transient,
  XAmzContentSHA256Mismatch: ErrorCode.Transient,
  // The multipart upload vanished (aborted by a lifecycle rule); a fresh attempt starts a new one.
  NoSuchUpload: ErrorCode.Transient,
  SlowDown: ErrorCode.Transient,
  ServiceUnavailable: ErrorCode.Transient,
  InternalError: ErrorCode.Transient,
  Throttling: ErrorCode.Transient,
  ThrottlingException: ErrorCode.Transient,
  RequestThrottled: ErrorCode.Transient,
  TimeoutError: ErrorCode.Transient,
}));
