import { Readable } from 'node:stream';
import { ErrorCode, StorageError } from '../errors.js';
import type { ByteRange, Driver, DriverDeleteOptions, DriverGetResult, DriverPutOptions, ListPage, ObjectInfo, PutBody } from '../storage/driver.js';

interface Entry {
  bytes: Buffer;
  info: ObjectInfo;
}

/** An in-process store for fast tests of the code above the storage layer. Holds whole objects in memory. */
export class MemoryDriver implements Driver {
  readonly kind = 'memory';
  readonly metadataAtEnd = true;
  readonly atomicIfAbsent = true;
  /** Checks and commits run with no await between them: atomic in one process. */
  readonly atomicIfMatch = true;
  readonly listHasDigest = true;
  private readonly objects = new Map<string, Entry>();
  private version = 0;

  async put(key: string, body: PutBody, opts: DriverPutOptions): Promise<ObjectInfo> {
    const chunks: Buffer[] = [];
    for await (const chunk of body.stream) chunks.push(chunk as Buffer);
    // Checked after the bytes arrived and before the commit, which is synchronous: atomic here.
    if (opts.ifAbsent && this.objects.has(key)) throw notFoundOr(ErrorCode.PreconditionFailed, 'put', key);
    this.checkMatch(key, opts.ifMatch, 'put', false);
    const { sha256, size } = body.digest();
    const info: ObjectInfo = {
      key, size, sha256, etag: String(++this.version), contentType: opts.contentType,
      metadata: { ...opts.metadata }, modified: new Date(),
    };
    this.objects.set(key, { bytes: Buffer.concat(chunks), info });
    return { ...info };
  }

  async get(key: string, range: ByteRange | undefined): Promise<DriverGetResult> {
    const e = this.entry(key, 'get');
    let bytes = e.bytes;
    if (range) {
      // A range past the end is refused by the Bucket, for every driver.
      bytes = e.bytes.subarray(range.start, range.end === undefined ? undefined : range.end + 1);
    }
    return { stream: Readable.from([bytes]), info: { ...e.info } };
  }

  async stat(key: string): Promise<ObjectInfo> {
    return { ...this.entry(key, 'stat').info };
  }

  async list(prefix: string, pageToken: string | undefined, pageSize: number): Promise<ListPage> {
    const keys = [...this.objects.keys()]
      .filter((k) => k.startsWith(prefix) && (pageToken === undefined || Buffer.compare(Buffer.from(k), Buffer.from(pageToken)) > 0))
      .sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
    const page = keys.slice(0, pageSize);
    return {
      objects: page.map((k) => ({ ...this.objects.get(k)!.info })),
      next: keys.length > pageSize ? page[page.length - 1] : undefined,
    };
  }

  async delete(key: string, opts: DriverDeleteOptions = {}): Promise<void> {
    this.checkMatch(key, opts.ifMatch, 'delete', true);
    this.objects.delete(key);
  }

  async copy(src: string, dst: string, opts: { ifAbsent: boolean; ifMatch?: string | undefined }): Promise<ObjectInfo> {
    const e = this.entry(src, 'copy');
    if (opts.ifAbsent && this.objects.has(dst)) throw notFoundOr(ErrorCode.PreconditionFailed, 'copy', dst);
    this.checkMatch(dst, opts.ifMatch, 'copy', false);
    const info = { ...e.info, key: dst, etag: String(++this.version), modified: new Date() };
    this.objects.set(dst, { bytes: e.bytes, info });
    return { ...info };
  }

  async health(): Promise<void> {}

  classify(): undefined {
    return undefined;
  }

  async close(): Promise<void> {}

  /** Test hook: replaces an object's bytes but keeps its recorded digest, like bit rot on a disk. */
  corrupt(key: string, bytes: Buffer): void {
    const e = this.entry(key, 'corrupt');
    this.objects.set(key, { bytes, info: { ...e.info, size: bytes.length } });
  }

  /** Test hook: drops an object's recorded digest, like an object written by another tool. */
  forgetDigest(key: string): void {
    const e = this.entry(key, 'forget');
    this.objects.set(key, { bytes: e.bytes, info: { ...e.info, sha256: undefined } });
  }

  /** PreconditionFailed unless `key` holds the version `etag` (a missing key passes when `missingOk`). */
  private checkMatch(key: string, etag: string | undefined, op: string, missingOk: boolean): void {
    if (etag === undefined) return;
    const e = this.objects.get(key);
    if (!e ? !missingOk : e.info.etag !== etag) {
      throw new StorageError(ErrorCode.PreconditionFailed, e ? `etag is ${e.info.etag ?? 'none'}, not ${etag}` : 'no such object', { op, key });
    }
  }

  private entry(key: string, op: string): Entry {
    const e = this.objects.get(key);
    if (!e) throw notFoundOr(ErrorCode.NotFound, op, key);
    return e;
  }
}

function notFoundOr(code: ErrorCode, op: string, key: string, detail?: string): StorageError {
  const text = detail ?? (code === ErrorCode.NotFound ? 'no such object' : 'object already exists');
  return new StorageError(code, text, { op, key });
}
