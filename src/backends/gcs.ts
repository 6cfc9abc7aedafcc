import { addAbortSignal, Readable, Transform, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { IdempotencyStrategy, Storage, type FileMetadata, type Bucket as GcsBucket } from '@google-cloud/storage';
import { backendUrl } from './url-params.js';
import { ErrorCode, StorageError, codeForHttpStatus } from '../errors.js';
import type { ByteRange, Driver, DriverDeleteOptions, DriverGetResult, DriverPutOptions, ListPage, ObjectInfo, PutBody } from '../storage/driver.js';
import { SHA256_META } from '../storage/driver.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** GCS persists resumable chunks in multiples of this; other chunk sizes waste a round trip. */
const CHUNK_QUANTUM = 256 * KiB;

export interface GcsDriverOptions {
  bucket: string;
  /**
   * JSON API endpoint, e.g. an emulator's `http://127.0.0.1:4443` or a Private Service Connect
   * host. @defaultValue `https://storage.googleapis.com`
   */
  endpoint?: string | undefined;
  /** Only needed for project-scoped calls, which this driver makes none of. @defaultValue from the credentials */
  projectId?: string | undefined;
  /**
   * Authenticate requests to a custom `endpoint` with the usual credentials
   * (GOOGLE_APPLICATION_CREDENTIALS, metadata server). Emulators take no credentials.
   * @defaultValue true for https endpoints, false for plain-http ones
   */
  authenticate?: boolean | undefined;
  /**
   * Uploads larger than this, or of unknown size, use a resumable session (chunks that survive a
   * dropped connection); smaller ones go in one multipart request. @defaultValue 8 MiB
   */
  resumableThreshold?: number | undefined;
  /**
   * Bytes per resumable-upload request, a multiple of 256 KiB. Each in-flight upload buffers one
   * chunk in memory, so it can resend it after a failure. @defaultValue 8 MiB
   */
  chunkSize?: number | undefined;
  /** Time for one HTTP request of the JSON API (a single-request upload included). @defaultValue 60000 */
  timeoutMs?: number | undefined;
  /**
   * Retries of one request by the SDK. Writes are retried only when idempotent (`ifAbsent` puts,
   * copies with a precondition), the SDK's RetryConditional strategy. @defaultValue 3
   */
  maxRetries?: number | undefined;
  /** Checksum the SDK computes on uploads and checks on whole downloads. @defaultValue 'crc32c' */
  validation?: 'crc32c' | 'md5' | undefined;
}

/**
 * Options from `gs://bucket/prefix?endpoint=...` (the prefix is the Bucket's business). Unknown
 * parameters are refused so a typo cannot silently fall back to a default. Credentials never come
 * from the URL.
 */
export function gcsOptionsFromUrl(url: URL): GcsDriverOptions {
  const { int, bool, oneOf, unknown } = backendUrl(url, 'gs:', 'GOOGLE_APPLICATION_CREDENTIALS');
  const opts: GcsDriverOptions = { bucket: url.hostname };
  for (const [name, v] of url.searchParams) {
    switch (name) {
      case 'endpoint': opts.endpoint = v; break;
      case 'projectId': opts.projectId = v; break;
      case 'authenticate': opts.authenticate = bool(name, v); break;
      case 'resumableThreshold': opts.resumableThreshold = int(name, v, 0); break;
      case 'chunkSize': opts.chunkSize = int(name, v, CHUNK_QUANTUM); break;
      case 'timeoutMs': opts.timeoutMs = int(name, v, 1); break;
      case 'maxRetries': opts.maxRetries = int(name, v, 0); break;
      case 'validation': opts.validation = oneOf(name, v, ['crc32c', 'md5'] as const); break;
      default: unknown(name);
    }
  }
  return opts;
}

export function gcsDriverFromUrl(url: URL): Driver {
  return new GcsDriver(gcsOptionsFromUrl(url));
}

/** Google Cloud Storage through `@google-cloud/storage` (JSON API). */
export class GcsDriver implements Driver {
  readonly kind = 'gs';
  /** Object metadata goes with the first request, so the Bucket must know the digest first. */
  readonly metadataAtEnd = false;
  /** `ifGenerationMatch: 0` makes GCS refuse the write when the name is taken. */
  readonly atomicIfAbsent = true;
  /** `ifGenerationMatch: <generation>` (the etag here) makes GCS refuse a write or delete of another version. */
  readonly atomicIfMatch = true;
  readonly listHasDigest = true;
  readonly bucketName: string;
  readonly resumableThreshold: number;
  readonly chunkSize: number;
  readonly storage: Storage;
  private readonly bucket: GcsBucket;
  private readonly timeoutMs: number;
  private readonly validation: 'crc32c' | 'md5';

  constructor(opts: GcsDriverOptions) {
    this.bucketName = opts.bucket;
    this.resumableThreshold = opts.resumableThreshold ?? 8 * MiB;
    this.chunkSize = opts.chunkSize ?? 8 * MiB;
    if (this.chunkSize < CHUNK_QUANTUM || this.chunkSize % CHUNK_QUANTUM !== 0) {
      throw new StorageError(ErrorCode.InvalidInput, `chunkSize must be a positive multiple of ${CHUNK_QUANTUM}`, { op: 'config' });
    }
    this.timeoutMs = opts.timeoutMs ?? 60_000;
    this.validation = opts.validation ?? 'crc32c';
    this.storage = new Storage({
      ...(opts.endpoint ? { apiEndpoint: opts.endpoint.replace(/\/+$/, '') } : {}),
      ...(opts.projectId ? { projectId: opts.projectId } : {}),
      // The SDK skips authentication for any custom endpoint unless told otherwise, which would
      // send a Private Service Connect endpoint unauthenticated requests.
      useAuthWithCustomEndpoint: opts.authenticate ?? !/^http:/i.test(opts.endpoint ?? 'https:'),
      // Without a number here the SDK sends its JSON API requests with no timeout at all.
      timeout: this.timeoutMs,
      retryOptions: {
        autoRetry: true,
        maxRetries: opts.maxRetries ?? 3,
        idempotencyStrategy: IdempotencyStrategy.RetryConditional,
      },
    });
    this.bucket = this.storage.bucket(opts.bucket);
  }

  async put(key: string, body: PutBody, opts: DriverPutOptions): Promise<ObjectInfo> {
    if (body.sha256 === undefined) throw new Error('GcsDriver.put needs the digest before the upload (metadataAtEnd is false)');
    const file = this.bucket.file(key);
    const resumable = body.size === undefined || body.size > this.resumableThreshold;
    const metadata: FileMetadata & { contentLength?: number } = {
      // Stated explicitly: otherwise the SDK guesses a type from the key's extension.
      contentType: opts.contentType ?? 'application/octet-stream',
      metadata: { ...opts.metadata, [SHA256_META]: body.sha256 },
    };
    // Lets GCS refuse a session whose bytes do not add up to the announced size.
    if (resumable && body.size !== undefined) metadata.contentLength = body.size;
    const ws = file.createWriteStream({
      resumable,
      // Always chunked: each chunk is sent only once its bytes are in hand, and the last one only
      // after the body ended cleanly, so a body that errors at its end (the Bucket's digest check)
      // never completes the session. The SDK's unchunked mode streams one request that the server
      // completes as soon as the announced byte count arrived, before the body's end is known.
      ...(resumable ? { chunkSize: this.chunkSize } : {}),
      metadata,
      validation: this.validation,
      timeout: this.timeoutMs,
      ...preconditions(opts.ifAbsent, opts.ifMatch),
    });
    try {
      const signal = opts.signal ? [{ signal: opts.signal }] : [];
      if (resumable) {
        // With a size announced, the session completes as soon as that many bytes arrived (the SDK
        // sends them as the final range once it sees anything after them), which can be before
        // the body's end and its digest check. So the last chunk is held back until the body
        // ended cleanly, and a body that runs past its size fails before the excess is passed on:
        // bytes that failed the check never complete the session.
        await pipeline(body.stream, holdLast(key, body.size), ws, ...signal);
      } else {
        // A single-request upload is held until the body ended cleanly: the SDK's multipart body
        // never aborts when its source errors, so a failed digest check would otherwise leave the
        // request hanging until the timeout. At most `resumableThreshold` bytes, the memory one
        // resumable chunk takes anyway.
        const held: Buffer[] = [];
        await pipeline(body.stream, new Writable({ write(c: Buffer, _e, cb) { held.push(c); cb(); } }), ...signal);
        await pipeline(Readable.from(held), ws, ...signal);
      }
    } catch (err) {
      body.stream.destroy();
      ws.destroy();
      throw asError(err);
    }
    const info = this.info(key, file.metadata);
    return { ...info, sha256: body.sha256, size: body.digest().size };
  }

  async get(key: string, range: ByteRange | undefined, signal: AbortSignal | undefined): Promise<DriverGetResult> {
    // The read is pinned to the generation just stat'ed, so bytes and info belong together; an
    // overwrite in between makes that generation vanish, and a fresh stat picks up the new one.
    for (let attempt = 1; ; attempt++) {
      const [meta] = await this.bucket.file(key).getMetadata();
      const info = this.info(key, meta);
      const file = this.bucket.file(key, { generation: meta.generation ?? undefined });
      // A range that covers everything is read whole, so the SDK can check the hash.
      const whole = !range || (range.start === 0 && (range.end === undefined || range.end >= info.size - 1));
      const stream = file.createReadStream(whole
        ? { validation: this.validation }
        : { start: range.start, ...(range.end !== undefined ? { end: range.end } : {}), validation: false });
      if (signal) addAbortSignal(signal, stream);
      try {
        await responded(stream);
        return { stream, info };
      } catch (err) {
        stream.destroy();
        if (attempt < 3 && this.classify(err) === ErrorCode.NotFound) continue;
        throw asError(err);
      }
    }
  }

  async stat(key: string): Promise<ObjectInfo> {
    const [meta] = await this.bucket.file(key).getMetadata();
    return this.info(key, meta);
  }

  /** One objects.list page; GCS lists in UTF-8 byte order, with full metadata per object. */
  async list(prefix: string, pageToken: string | undefined, pageSize: number): Promise<ListPage> {
    const [files, next] = await this.bucket.getFiles({
      autoPaginate: false, maxResults: pageSize, ...(prefix ? { prefix } : {}), ...(pageToken ? { pageToken } : {}),
    });
    const token = (next as { pageToken?: unknown } | null)?.pageToken;
    return {
      objects: files.map((f) => this.info(f.name, f.metadata)),
      next: typeof token === 'string' && token ? token : undefined,
    };
  }

  async delete(key: string, opts: DriverDeleteOptions = {}): Promise<void> {
    const generation = opts.ifMatch === undefined ? undefined : asGeneration(opts.ifMatch, 'delete', key);
    await this.bucket.file(key).delete({ ignoreNotFound: true, ...(generation === undefined ? {} : { ifGenerationMatch: generation }) });
  }

  /** A rewrite: metadata, content type and the digest travel with the bytes; preconditions apply to the destination. */
  async copy(src: string, dst: string, opts: { ifAbsent: boolean; ifMatch?: string | undefined }): Promise<ObjectInfo> {
    const [, resp] = await this.bucket.file(src).copy(this.bucket.file(dst), preconditions(opts.ifAbsent, opts.ifMatch, dst));
    const resource = (resp as { resource?: FileMetadata } | undefined)?.resource;
    return resource ? this.info(dst, resource) : this.stat(dst);
  }

  async health(): Promise<void> {
    await this.bucket.getMetadata();
  }

  classify(err: unknown): ErrorCode | undefined {
    if (typeof err !== 'object' || err === null) return undefined;
    const e = err as { code?: unknown; status?: unknown; message?: unknown };
    switch (e.code) {
      // The SDK's own hash check of a whole download: the stored bytes are not what was written.
      case 'CONTENT_DOWNLOAD_MISMATCH': return ErrorCode.ChecksumMismatch;
      // Upload hash check failed and the SDK deleted the object: bytes were damaged in flight.
      case 'FILE_NO_UPLOAD': return ErrorCode.Transient;
      case 'MD5_NOT_AVAILABLE': return ErrorCode.InvalidInput;
    }
    // ApiError and the resumable upload's errors carry the HTTP status as a numeric `code`; the
    // resumable session's own requests fail with a GaxiosError carrying `status`.
    if (typeof e.code === 'number') return codeForHttpStatus(e.code);
    if (typeof e.status === 'number') return codeForHttpStatus(e.status);
    // The resumable upload gives up with a plain Error once its own retries ran out.
    if (typeof e.message === 'string' && /^Retry (total time )?limit exceeded/.test(e.message)) return ErrorCode.Transient;
    return undefined;
  }

  async close(): Promise<void> {
    // The SDK holds no sockets of its own beyond Node's keep-alive agents.
  }

  private info(key: string, m: FileMetadata): ObjectInfo {
    const metadata: Record<string, string> = {};
    let sha256: string | undefined;
    for (const [name, value] of Object.entries(m.metadata ?? {})) {
      if (value === null || value === undefined) continue;
      if (name.toLowerCase() === SHA256_META) sha256 = String(value);
      else metadata[name.toLowerCase()] = String(value);
    }
    return {
      key: m.name ?? key,
      size: Number(m.size ?? 0),
      sha256,
      etag: m.generation === undefined ? undefined : String(m.generation),
      contentType: m.contentType,
      metadata,
      modified: new Date(m.updated ?? m.timeCreated ?? 0),
    };
  }
}

/**
 * Starts a lazy SDK read stream and waits for its response, so a missing object or a bad range
 * rejects here instead of surfacing mid-stream. `read(0)` makes the SDK send its request without
 * consuming any bytes.
 */
function responded(stream: Readable): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: unknown) => { stream.off('response', onResponse); reject(err); };
    // Error responses arrive here first; their 'error' follows once the body is read.
    const onResponse = (res: { statusCode?: number }) => {
      if ((res.statusCode ?? 0) >= 300) return;
      stream.off('error', onError);
      stream.off('response', onResponse);
      resolve();
    };
    stream.once('error', onError);
    stream.on('response', onResponse);
    stream.read(0);
  });
}

/** The resumable upload rejects with the API's error body itself, a plain object. */
function asError(err: unknown): unknown {
  if (err instanceof Error || typeof err !== 'object' || err === null) return err;
  const e = err as { code?: unknown; message?: unknown };
  return Object.assign(new Error(typeof e.message === 'string' ? e.message : JSON.stringify(err)), err);
}

/** `ifAbsent` is generation 0 (no live object); `ifMatch` is the generation our etag reports. */
function preconditions(ifAbsent: boolean, ifMatch: string | undefined, key = ''): { preconditionOpts?: { ifGenerationMatch: number } } {
  if (ifAbsent) return { preconditionOpts: { ifGenerationMatch: 0 } };
  if (ifMatch !== undefined) return { preconditionOpts: { ifGenerationMatch: asGeneration(ifMatch, 'put', key) } };
  return {};
}

/** An etag that is no generation (from another backend, or made up) can match no version here. */
function asGeneration(etag: string, op: string, key: string): number {
  if (!/^[1-9]\d{0,18}$/.test(etag)) throw new StorageError(ErrorCode.PreconditionFailed, `etag ${JSON.stringify(etag)} is no generation of this object`, { op, key });
  return Number(etag);
}

/**
 * Passes chunks on one behind, and the last only once its input ended cleanly (see put); with a
 * known size, fails as soon as the input runs past it.
 */
function holdLast(key: string, size: number | undefined): Transform {
  let held: Buffer | undefined;
  let seen = 0;
  return new Transform({
    transform(chunk: Buffer, _enc, cb) {
      seen += chunk.length;
      if (size !== undefined && seen > size) {
        cb(new StorageError(ErrorCode.ChecksumMismatch, `the body ran past its announced size of ${size} bytes`, { op: 'put', key }));
        return;
      }
      const out = held;
      held = chunk;
      cb(null, out);
    },
    flush(cb) {
      cb(null, held);
    },
  });
}
