import { Readable } from 'node:stream';
import {
  BlobServiceClient,
  type BlockBlobClient,
  type ContainerClient,
  type StoragePipelineOptions,
} from '@azure/storage-blob';
import { ErrorCode, StorageError, codeForHttpStatus } from '../errors.js';
import { emptyObjectRange } from './empty-range.js';
import { backendUrl } from './url-params.js';
import { SHA256_META } from '../storage/driver.js';
import type {
  ByteRange, Driver, DriverDeleteOptions, DriverGetResult, DriverPutOptions, DriverSpliceOptions, ListPage, ObjectInfo, PutBody, SplicePiece,
} from '../storage/driver.js';
import { canAuthoriseSource, planBlocks, spliceBlob, stageFromUrl } from './azure-splice.js';

/** The environment the Azure driver reads, passed in by the composition root (never `process.env` here). */
export interface AzureEnv {
  /** Account-key or SAS connection string, as the Azure SDKs and CLI read it. */
  AZURE_STORAGE_CONNECTION_STRING?: string | undefined;
}

export interface AzureDriverOptions {
  /** Container name: 3-63 characters of lower-case letters, digits and single hyphens. */
  container: string;
  /** Account-key or SAS connection string (the value of `AZURE_STORAGE_CONNECTION_STRING`). */
  connectionString: string;
  /**
   * Blob service URL that replaces the connection string's, e.g. `http://127.0.0.1:10000/devstoreaccount1`
   * for azurite. A SAS from the connection string is kept.
   * @defaultValue the connection string's endpoint
   */
  endpoint?: string | undefined;
  /** Block size of uploads; a body larger than this is staged as several blocks. @defaultValue 8 MiB */
  blockSize?: number | undefined;
  /** Blocks buffered per upload, about three quarters of them in flight; memory is blockSize × this. @defaultValue 4 */
  concurrency?: number | undefined;
  /** Attempts per HTTP request, the first included. @defaultValue 4 */
  maxTries?: number | undefined;
  /** Per-attempt timeout, sent to the service as its `timeout` parameter. @defaultValue 60_000 */
  tryTimeoutInMs?: number | undefined;
  /** First delay of the exponential backoff between attempts. @defaultValue 1_000 */
  retryDelayInMs?: number | undefined;
  /** Times a download that breaks midway resumes from where it stopped (pinned to the same ETag). @defaultValue 3 */
  downloadRetries?: number | undefined;
  /** Interval between polls of a server-side copy the service runs asynchronously. @defaultValue 1_000 */
  copyPollIntervalInMs?: number | undefined;
  /**
   * Edits of seekable session archives are spliced inside the store (Put Block From URL of the
   * unchanged ranges, Put Block List) instead of uploading the whole new archive. A store that
   * answers NotImplemented is remembered and written the ordinary way; `false` never tries.
   * @defaultValue true
   */
  splice?: boolean | undefined;
}

const CONTAINER = /^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$/;
// The service accepts at most 5000 results per List Blobs call.
const MAX_PAGE = 5000;

/**
 * `azblob://container/prefix?endpoint=...`. The Bucket applies the prefix; credentials come only from
 * `env`, and a URL that carries any is refused so that it cannot end up in logs or payloads.
 */
export function azureDriverFromUrl(url: URL, env: AzureEnv = {}): AzureDriver {
  const { bad: invalid, bool, unknown } = backendUrl(url, 'azblob:', 'AZURE_STORAGE_CONNECTION_STRING');
  let splice: boolean | undefined;
  for (const [name, v] of url.searchParams) {
    if (name === 'splice') splice = bool(name, v);
    else if (name !== 'endpoint') unknown(name);
  }
  const connectionString = env.AZURE_STORAGE_CONNECTION_STRING;
  if (!connectionString) throw invalid('AZURE_STORAGE_CONNECTION_STRING is not set');
  return new AzureDriver({ container: url.hostname, connectionString, endpoint: url.searchParams.get('endpoint') ?? undefined, splice });
}

/** Azure Blob Storage through `@azure/storage-blob`: block blobs in one container. */
export class AzureDriver implements Driver {
  readonly kind = 'azblob';
  readonly metadataAtEnd = true;
  readonly atomicIfAbsent = true;
  /** `If-Match` conditions on Put Blob, Put Block List, Delete Blob and the copy's destination. */
  readonly atomicIfMatch = true;
  readonly listHasDigest = true;
  readonly container: ContainerClient;
  readonly blockSize: number;
  private readonly concurrency: number;
  private readonly downloadRetries: number;
  private readonly copyPollIntervalInMs: number;
  /** Splicing is on, and the credential can authorise a copy source. */
  private readonly spliceOn: boolean;
  /** Set once the store answered NotImplemented to Put Block From URL. */
  private spliceRefused = false;

  constructor(opts: AzureDriverOptions) {
    if (!CONTAINER.test(opts.container)) {
      throw new StorageError(ErrorCode.InvalidInput, `invalid container name ${JSON.stringify(opts.container)}`, { op: 'config' });
    }
    this.blockSize = opts.blockSize ?? 8 * 1024 * 1024;
    this.concurrency = opts.concurrency ?? 4;
    this.downloadRetries = opts.downloadRetries ?? 3;
    this.copyPollIntervalInMs = opts.copyPollIntervalInMs ?? 1_000;
    const pipeline: StoragePipelineOptions = {
      retryOptions: {
        maxTries: opts.maxTries ?? 4,
        tryTimeoutInMs: opts.tryTimeoutInMs ?? 60_000,
        retryDelayInMs: opts.retryDelayInMs ?? 1_000,
        maxRetryDelayInMs: 30_000,
      },
    };
    let service = BlobServiceClient.fromConnectionString(opts.connectionString, pipeline);
    if (opts.endpoint) {
      const endpoint = new URL(opts.endpoint);
      // A SAS connection string puts its token in the service URL; it must survive the override.
      endpoint.search = new URL(service.url).search;
      service = new BlobServiceClient(endpoint.toString(), service.credential, pipeline);
    }
    this.container = service.getContainerClient(opts.container);
    // Any blob's client shows what the credential and the SDK allow.
    const probe = this.blob('probe');
    this.spliceOn = (opts.splice ?? true) && canAuthoriseSource(probe) && stageFromUrl(probe) !== undefined;
  }

  async put(key: string, body: PutBody, opts: DriverPutOptions): Promise<ObjectInfo> {
    opts.signal?.throwIfAborted();
    const { stream } = body;
    const metadata: Record<string, string> = { ...opts.metadata };
    if (body.sha256 !== undefined) metadata[SHA256_META] = body.sha256;
    const options = {
      metadata,
      blobHTTPHeaders: opts.contentType === undefined ? {} : { blobContentType: opts.contentType },
      conditions: conditions(opts.ifAbsent, opts.ifMatch),
      abortSignal: opts.signal,
    };
    // The SDK passes the signal to the commit only; ending the body stops the staging too.
    const onAbort = () => stream.destroy(opts.signal?.reason as Error);
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    // The iterator, unlike 'data' events, rejects when the body errors or closes without ending,
    // so a failure can never look like an end (uploadStream alone would wait forever on the latter).
    const chunks = stream[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
    let staged: Readable | undefined;
    try {
      const head: Buffer[] = [];
      let headSize = 0;
      let ended = false;
      while (!ended && headSize <= this.blockSize) {
        const r = await chunks.next();
        if (r.done) ended = true;
        else { head.push(r.value); headSize += r.value.length; }
      }
      let res;
      if (ended) {
        // One block's worth is sent with a single Put Blob: one request, and no staged blocks that
        // a concurrent writer's commit could discard under us (see InvalidBlockList below).
        metadata[SHA256_META] = body.digest().sha256;
        res = await this.blob(key).upload(Buffer.concat(head, headSize), headSize, options);
      } else {
        // Why metadataAtEnd holds for block uploads: Azure takes the metadata with Put Block List,
        // which uploadStream builds only after its input has ended and every block is staged,
        // reading this same `metadata` object then. The generator records the digest as its last
        // step, before its stream can end; a body that errors never gets there, so nothing is
        // committed and the staged blocks are discarded by the service.
        staged = Readable.from((async function* () {
          while (head.length > 0) yield head.shift()!;
          for (let r = await chunks.next(); !r.done; r = await chunks.next()) yield r.value;
          metadata[SHA256_META] = body.digest().sha256;
        })(), { objectMode: false });
        res = await this.blob(key).uploadStream(staged, this.blockSize, this.concurrency, options);
      }
      const { sha256, size } = body.digest();
      return {
        key, size, sha256, etag: res.etag, contentType: opts.contentType,
        metadata: { ...opts.metadata }, modified: res.lastModified ?? new Date(),
      };
    } catch (err) {
      // The SDK only pauses its input on failure; destroying the body releases whatever feeds it.
      staged?.destroy();
      if (!stream.destroyed) stream.destroy();
      throw err;
    } finally {
      opts.signal?.removeEventListener('abort', onAbort);
    }
  }

  async get(key: string, range: ByteRange | undefined, signal: AbortSignal | undefined): Promise<DriverGetResult> {
    const offset = range?.start ?? 0;
    const count = range?.end === undefined ? undefined : range.end - offset + 1;
    let res;
    try {
      res = await this.blob(key).download(offset, count, { abortSignal: signal, maxRetryRequests: this.downloadRetries });
    } catch (err) {
      return emptyObjectRange(this, key, range, signal, err);
    }
    if (!res.readableStreamBody) throw new Error('download returned no body');
    // A ranged read's Content-Length is the range's; the whole size is after the slash of Content-Range.
    const total = /\/(\d+)$/.exec(res.contentRange ?? '')?.[1];
    const info = toInfo(key, total === undefined ? res.contentLength : Number(total), res);
    const stream = res.readableStreamBody as Readable;
    // A range past the end (Azure answers 416, azurite 206 with no bytes) is refused by the Bucket.
    return { stream, info };
  }

  async stat(key: string): Promise<ObjectInfo> {
    const p = await this.blob(key).getProperties();
    return toInfo(key, p.contentLength, p);
  }

  async list(prefix: string, pageToken: string | undefined, pageSize: number): Promise<ListPage> {
    const pages = this.container
      .listBlobsFlat({ prefix: prefix ? escapeKey(prefix) : undefined, includeMetadata: true })
      .byPage({ continuationToken: pageToken, maxPageSize: Math.max(1, Math.min(pageSize, MAX_PAGE)) });
    const page = await pages.next();
    if (page.done) return { objects: [], next: undefined };
    const value = page.value;
    return {
      objects: value.segment.blobItems.map((b) =>
        toInfo(unescapeKey(b.name), b.properties.contentLength, { ...b.properties, metadata: b.metadata })),
      next: value.continuationToken || undefined,
    };
  }

  async delete(key: string, opts: DriverDeleteOptions = {}): Promise<void> {
    try {
      await this.blob(key).deleteIfExists({ deleteSnapshots: 'include', conditions: conditions(false, opts.ifMatch) });
    } catch (err) {
      // A conditional delete of a blob that is gone is a delete of a missing key: a success.
      if (opts.ifMatch === undefined || this.classify(err) !== ErrorCode.PreconditionFailed) throw err;
      if (await this.blob(key).exists()) throw err;
    }
  }

  async copy(src: string, dst: string, opts: { ifAbsent: boolean; ifMatch?: string | undefined }): Promise<ObjectInfo> {
    // Within one account the destination's own credential authorises reading the source, so no
    // SAS is needed; with no metadata given, the service copies the source's (digest included).
    const poller = await this.blob(dst).beginCopyFromURL(this.blob(src).url, {
      conditions: conditions(opts.ifAbsent, opts.ifMatch),
      intervalInMs: this.copyPollIntervalInMs,
    });
    await poller.pollUntilDone();
    return this.stat(dst);
  }

  get spliceable(): boolean {
    return this.spliceOn && !this.spliceRefused;
  }

  /** None: every unchanged range is copied by the store, however short (Azure blocks have no minimum size). */
  spliceOverhead(): number {
    return 0;
  }

  /** See spliceBlob: Put Block From URL of the unchanged ranges, Put Block of the new bytes, one Put Block List. */
  async splice(key: string, pieces: readonly SplicePiece[], opts: DriverSpliceOptions): Promise<ObjectInfo | undefined> {
    const blocks = planBlocks(pieces);
    if (!blocks) return undefined;
    const blob = this.blob(key);
    const info = await spliceBlob(key, blob, stageFromUrl(blob)!, blocks, this.concurrency, opts);
    if (!info) this.spliceRefused = true;
    return info;
  }

  async health(): Promise<void> {
    await this.container.getProperties();
  }

  classify(err: unknown): ErrorCode | undefined {
    if (typeof err !== 'object' || err === null || (err as { name?: unknown }).name !== 'RestError') return undefined;
    const e = err as { code?: string; statusCode?: number; details?: { errorCode?: string } };
    const code = e.details?.errorCode ?? e.code;
    switch (code) {
      case 'BlobNotFound':
      case 'ContainerNotFound':
      case 'CannotVerifyCopySource':
        return e.statusCode === 404 || e.statusCode === undefined ? ErrorCode.NotFound : codeForHttpStatus(e.statusCode);
      case 'BlobAlreadyExists':
      case 'ConditionNotMet':
      case 'SourceConditionNotMet':
      case 'TargetConditionNotMet':
        return ErrorCode.PreconditionFailed;
      case 'AuthenticationFailed':
      case 'AuthorizationFailure':
      case 'AuthorizationPermissionMismatch':
      case 'AuthorizationProtocolMismatch':
      case 'InsufficientAccountPermissions':
        return ErrorCode.PermissionDenied;
      case 'ServerBusy':
      case 'OperationTimedOut':
      case 'InternalError':
        return ErrorCode.Transient;
      case 'InvalidRange':
        return ErrorCode.InvalidInput;
      case 'InvalidBlockList':
        // A commit discards every uncommitted block of the blob, so a concurrent multi-block write
        // of the same key can leave ours missing: a lost race that a retry of the whole put wins.
        return ErrorCode.Transient;
      case 'REQUEST_SEND_ERROR':
        // No response at all: connection refused or reset, DNS, TLS; worth another attempt later.
        return ErrorCode.Transient;
    }
    return e.statusCode === undefined ? undefined : codeForHttpStatus(e.statusCode);
  }

  async close(): Promise<void> {
    // The SDK keeps no per-client resources: its HTTP agent is shared and its sockets idle out.
  }

  private blob(key: string): BlockBlobClient {
    return this.container.getBlockBlobClient(escapeKey(key));
  }
}

/** The write conditions of `ifAbsent` and `ifMatch` (which exclude each other). */
function conditions(ifAbsent: boolean, ifMatch: string | undefined): { ifNoneMatch?: string; ifMatch?: string } {
  if (ifAbsent) return { ifNoneMatch: '*' };
  return ifMatch === undefined ? {} : { ifMatch };
}

interface AzureProps {
  etag?: string | undefined;
  contentType?: string | undefined;
  lastModified?: Date | undefined;
  metadata?: Record<string, string> | undefined;
}

/**
 * The service reads a backslash in a blob name as a slash (as go-cloud's azureblob driver found),
 * so `a\b` and `a/b` would be one blob: a backslash is stored as `__0x5c__`, and the `__0x` of a
 * key that already contains one as `__0x5f___0x`, so names map back one to one. A listing is in
 * byte order of the stored names, which differs from the keys' order only around backslashes.
 */
export function escapeKey(key: string): string {
  return key.replace(/\\|__0x/g, (m) => (m === '\\' ? '__0x5c__' : '__0x5f___0x'));
}

export function unescapeKey(name: string): string {
  return name.replace(/__0x([0-9a-f]{2})__/g, (_m, hex: string) => String.fromCharCode(parseInt(hex, 16)));
}

function toInfo(key: string, size: number | undefined, p: AzureProps): ObjectInfo {
  const { [SHA256_META]: sha256, ...metadata } = p.metadata ?? {};
  return {
    key,
    size: size ?? 0,
    sha256,
    // Listings give the ETag bare, responses' headers quoted: one form, so etags compare equal.
    etag: p.etag === undefined || p.etag.startsWith('"') ? p.etag : `"${p.etag}"`,
    contentType: p.contentType,
    metadata,
    modified: p.lastModified ?? new Date(0),
  };
}
