import { createWriteStream } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createHash, randomUUID } from 'node:crypto';
import { ErrorCode, StorageError, classifyCommon } from '../errors.js';
import { SourceBody, hashOpen, openFile, type BodySource } from './body.js';

// Jobs hash staged files with the same code a put uses.
export { hashFile } from './body.js';
import type { ByteRange, CheckedRange, Driver, ObjectInfo, SplicePiece } from './driver.js';
import { SHA256_META } from './driver.js';
import { CHUNK, HashingStream, type Digest } from './hashing.js';
import { validateContentType, validateKey, validateMetadata, validatePrefix, validateSha256 } from './keys.js';

/** What every backend reports for an object stored without a content type (decision 4). */
export const DEFAULT_CONTENT_TYPE = 'application/octet-stream';

function isFileSource(source: PutSource): source is FileSource {
  return !(source instanceof Readable) && !(source instanceof Uint8Array);
}

/** Concurrent stats when a listing must be completed with digests (S3 listings carry none). */
const LIST_STAT_LANES = 16;

/** Bytes to store: a stream, bytes in memory, or a local file (read twice where a backend needs the digest first). */
export type PutSource = Readable | Uint8Array | FileSource;

export interface FileSource {
  path: string;
  /**
   * The caller gives the file up: it will not modify it afterwards and only removes its name once
   * the put is over. The filesystem backend may then link the file into place (its inode becomes
   * the object's) instead of copying it; other backends copy as without it.
   */
  consume?: boolean | undefined;
}

export interface PutOptions {
  contentType?: string | undefined;
  metadata?: Record<string, string> | undefined;
  /** Expected SHA-256 (hex): on a mismatch nothing is stored and put fails with ChecksumMismatch. */
  sha256?: string | undefined;
  /** Fail with PreconditionFailed when the key already exists. */
  ifAbsent?: boolean | undefined;
  /**
   * Replace only the version whose `etag` (from `stat`, `list` or a previous `put`) is this:
   * PreconditionFailed when the object moved on or is gone. Atomic where `atomicIfMatch` is.
   */
  ifMatch?: string | undefined;
  signal?: AbortSignal | undefined;
  /** Called with the bytes sent so far, after each chunk. */
  progress?: ((bytes: number) => void) | undefined;
  /**
   * Exact size of a stream source, when the caller knows it (a copy knows the source's): checked
   * at the end like the digest, and lets digest-first stores size their upload (one PutObject with
   * a buffer of that size, not a part-sized one). Ignored for files and bytes, which are measured.
   */
  size?: number | undefined;
}

export interface SpliceOptions {
  /** The version replaced, whose ranges the `copy` pieces name (an etag from `stat` or `get`). */
  ifMatch: string;
  /** The assembled object's SHA-256 (hex) and size: the caller hashed it in order before. */
  sha256: string;
  size: number;
  /** Ranges of that version the caller hashed, covering every `copy` piece (see DriverSpliceOptions). */
  checked: readonly CheckedRange[];
  contentType?: string | undefined;
  metadata?: Record<string, string> | undefined;
  signal?: AbortSignal | undefined;
  warn?: ((message: string, err: unknown) => void) | undefined;
}

export interface DeleteOptions {
  /** Delete only the version whose `etag` is this: PreconditionFailed when it moved on. A missing key still succeeds. */
  ifMatch?: string | undefined;
}

export interface CopyOptions {
  /** Fail with PreconditionFailed when the destination already exists. */
  ifAbsent?: boolean | undefined;
  /** Replace only the destination version whose `etag` is this (as put's `ifMatch`). */
  ifMatch?: string | undefined;
}

export interface ListOptions {
  pageSize?: number | undefined;
  /**
   * Every listed object carries its recorded `sha256` (undefined only when it has none). Free where
   * the listing has it (`listHasDigest`); on S3 it costs one HEAD per object.
   */
  digests?: boolean | undefined;
}

export interface GetOptions {
  range?: ByteRange | undefined;
  signal?: AbortSignal | undefined;
  /** Called with the bytes read so far, after each chunk. */
  progress?: ((bytes: number) => void) | undefined;
  /** Expected SHA-256 of the whole object, checked in the same pass as the recorded one (whole reads only). */
  sha256?: string | undefined;
  /**
   * The caller checks every byte it uses against digests of its own (a seekable session archive's
   * segments against its index): a whole read is then only counted, not hashed against the
   * recorded digest, which would be a second pass of SHA-256 over the same bytes (its size is
   * still checked). Bytes the caller does not check must not be used. Excludes `sha256`.
   * @defaultValue false
   */
  partsChecked?: boolean | undefined;
}

export interface GetResult {
  /**
   * The object's bytes. A full read is verified against the recorded digest (and `sha256` if
   * given), unless `partsChecked`: on a mismatch the stream errors with ChecksumMismatch at its end, so treat the bytes
   * as unverified until 'end'.
   */
  stream: Readable;
  info: ObjectInfo;
  /** Digest and size of what a whole read delivered, once `stream` has ended (not with `partsChecked`). */
  digest(): Digest;
}

export interface BucketOptions {
  /** Name for messages and logs, e.g. the backend's configured name. */
  name?: string;
  /** Folder inside the store: key `k` lives at `<prefix>/<k>`. @defaultValue '' */
  prefix?: string;
  /** Where a stream of unknown digest is spooled for backends that need the digest first. @defaultValue os.tmpdir() */
  spoolDir?: string;
  /** Page size used under `list`. @defaultValue 1000 */
  pageSize?: number;
}

/**
 * The portable bucket: one place for key validation, prefixing, hashing while streaming, digest
 * checks before an object becomes visible, verification of full reads, and error codes. Drivers
 * below it only move bytes.
 */
export class Bucket {
  readonly name: string;
  readonly prefix: string;
  private readonly spoolDir: string;
  private readonly pageSize: number;

  constructor(readonly driver: Driver, opts: BucketOptions = {}) {
    this.name = opts.name ?? driver.kind;
    this.prefix = opts.prefix ? `${validatePrefix(opts.prefix).replace(/\/+$/, '')}/` : '';
    this.spoolDir = opts.spoolDir ?? tmpdir();
    this.pageSize = opts.pageSize ?? 1000;
  }

  async put(key: string, source: PutSource, opts: PutOptions = {}): Promise<ObjectInfo> {
    validateKey(key, 'put');
    const metadata = validateMetadata(opts.metadata, SHA256_META);
    // Stored explicitly, so no store guesses one from the key's extension or answers its own default.
    const contentType = validateContentType(opts.contentType) ?? DEFAULT_CONTENT_TYPE;
    const expected = validateSha256(opts.sha256);
    const storeKey = this.prefix + key;
    if (opts.ifAbsent && opts.ifMatch !== undefined) {
      throw new StorageError(ErrorCode.InvalidInput, 'ifAbsent and ifMatch exclude each other', { op: 'put', key });
    }
    if (opts.size !== undefined && !(Number.isSafeInteger(opts.size) && opts.size >= 0)) {
      throw new StorageError(ErrorCode.InvalidInput, `invalid size ${String(opts.size)}`, { op: 'put', key });
    }
    return this.guard('put', key, async () => {
      if (opts.ifAbsent && !this.driver.atomicIfAbsent && (await this.exists(storeKey))) {
        throw new StorageError(ErrorCode.PreconditionFailed, 'object already exists', { op: 'put', key });
      }
      if (opts.ifMatch !== undefined && !this.driver.atomicIfMatch) await this.assertEtag('put', key, opts.ifMatch, false);
      const driverOpts = { contentType, metadata, ifAbsent: opts.ifAbsent ?? false, ifMatch: opts.ifMatch, signal: opts.signal };
      const prepared = await this.prepare(key, source, expected, opts.size);
      const body = new SourceBody(prepared.source, prepared.sha256, prepared.size, { sha256: prepared.sha256, size: prepared.size, op: 'put', key, onBytes: opts.progress });
      const consumable = isFileSource(source) && source.consume && 'open' in prepared.source ? prepared.source.open : undefined;
      try {
        const info = await this.driver.put(storeKey, body, consumable ? { ...driverOpts, consumable } : driverOpts).catch((err: unknown) => {
          // Without a caller's digest, a file whose bytes no longer match our own first pass (or
          // its measured size) was changed while we read it: nothing was stored, and a new
          // attempt reads it as it is then. Not the producer's wrong digest, so not permanent.
          if (expected === undefined && isFileSource(source) && this.codeOf(err) === ErrorCode.ChecksumMismatch) {
            throw new StorageError(ErrorCode.Transient, 'the source file changed while it was being stored', { op: 'put', key, cause: err });
          }
          throw err;
        });
        const digest = body.digest();
        return { ...this.outside(info), sha256: digest.sha256, size: digest.size };
      } finally {
        await body.close();
        await prepared.cleanup();
      }
    });
  }

  async get(key: string, opts: GetOptions = {}): Promise<GetResult> {
    validateKey(key, 'get');
    const range = opts.range;
    if (range && (!Number.isSafeInteger(range.start) || range.start < 0 || (range.end !== undefined && (!Number.isSafeInteger(range.end) || range.end < range.start)))) {
      throw new StorageError(ErrorCode.InvalidInput, `invalid range ${JSON.stringify(range)}`, { op: 'get', key });
    }
    const expected = validateSha256(opts.sha256);
    if (expected !== undefined && range) {
      throw new StorageError(ErrorCode.InvalidInput, 'sha256 is the whole object\'s digest and cannot check a range', { op: 'get', key });
    }
    if (expected !== undefined && opts.partsChecked) {
      throw new StorageError(ErrorCode.InvalidInput, 'sha256 and partsChecked exclude each other', { op: 'get', key });
    }
    const { stream, info } = await this.guard('get', key, () => this.driver.get(this.prefix + key, range, opts.signal));
    // One rule for every store (decision 2): `{start: 0}` of an empty object is its zero bytes, a
    // start past the last byte is refused (some stores answer 416, some an empty 206).
    if (range && range.start > 0 && range.start >= info.size) {
      stream.destroy();
      throw new StorageError(ErrorCode.InvalidInput, `range starts at ${range.start}, past the end (size ${info.size})`, { op: 'get', key });
    }
    if (expected !== undefined && info.sha256 !== undefined && expected !== info.sha256) {
      stream.destroy();
      throw new StorageError(ErrorCode.ChecksumMismatch, `stored sha256 ${info.sha256} is not the expected ${expected}`, { op: 'get', key });
    }
    // Only a whole read can be checked against the whole object's digest; a range is only counted.
    const whole = !range || (range.start === 0 && (range.end === undefined || range.end >= info.size - 1));
    const hash = whole && !opts.partsChecked;
    const check = hash ? info.sha256 ?? expected : undefined;
    // The size is checked either way: free, and a short read is never taken for a whole one.
    const size = check !== undefined || (whole && opts.partsChecked) ? info.size : undefined;
    const out = new HashingStream({ sha256: check, size, hash, op: 'get', key, onBytes: opts.progress });
    stream.on('error', (err) => {
      const wrapped = this.wrap('get', key, err);
      // A precondition failing mid-read (Azure resumes a broken download only if the ETag still
      // matches) means the object was replaced while we read it: a new attempt reads the new one.
      out.destroy(wrapped.code !== ErrorCode.PreconditionFailed ? wrapped
        : new StorageError(ErrorCode.Transient, 'the object was replaced while it was being read', { op: 'get', key, cause: err }));
    });
    // As in put: the consumer may attach after a small object already failed its check.
    out.on('error', () => {});
    out.on('close', () => { if (!stream.destroyed) stream.destroy(); });
    stream.pipe(out);
    return { stream: out, info: withType(this.outside(info)), digest: () => out.digest() };
  }

  async stat(key: string): Promise<ObjectInfo> {
    validateKey(key, 'stat');
    return withType(this.outside(await this.guard('stat', key, () => this.driver.stat(this.prefix + key))));
  }

  async exists(storeKey: string): Promise<boolean> {
    try {
      await this.driver.stat(storeKey);
      return true;
    } catch (err) {
      if (this.codeOf(err) === ErrorCode.NotFound) return false;
      throw err;
    }
  }

  /**
   * True when a put of this many bytes (undefined: unknown) without a caller's digest makes the
   * Bucket work the digest out before the first byte: a first pass over a file, a spool of a
   * stream. False where the driver records the digest after the bytes (metadataAtEnd, or a size
   * within its digestAtEndUpTo).
   */
  digestFirst(size: number | undefined): boolean {
    return !this.driver.metadataAtEnd && !(size !== undefined && size <= (this.driver.digestAtEndUpTo ?? -1));
  }

  /** True when `put`/`delete` with `ifMatch` are atomic in this store; otherwise a stat guards them, not race-free. */
  get atomicIfMatch(): boolean {
    return this.driver.atomicIfMatch;
  }

  /** True when `splice` can be tried: the driver has it, it is not turned off, and the store has not refused it. */
  get canSplice(): boolean {
    return this.driver.splice !== undefined && this.driver.spliceable !== false;
  }

  /**
   * The most old bytes `splice` uploads beside the new ones, when old bytes follow `stretches`
   * stretches of new bytes (S3: (2 x stretches + 1) x 5 MiB; Azure: 0); Infinity where the driver has no splice.
   */
  spliceOverhead(stretches: number): number {
    return this.driver.spliceOverhead?.(stretches) ?? Infinity;
  }

  /**
   * Replaces `key` with pieces: ranges of the version `ifMatch` names, copied inside the store,
   * and new bytes (see Driver.splice). The recorded digest is the caller's, who hashed the
   * assembled bytes in order (ranges read from that same version); every copy is conditional on
   * it, so a replaced or deleted source fails PreconditionFailed, never mixes versions.
   * Undefined, with nothing written, when the store cannot splice: write the object another way,
   * which loses nothing. Pieces that do not make `size` bytes, or a range that is not one, fail
   * InvalidInput before any request.
   */
  async splice(key: string, pieces: readonly SplicePiece[], opts: SpliceOptions): Promise<ObjectInfo | undefined> {
    validateKey(key, 'splice');
    const metadata = validateMetadata(opts.metadata, SHA256_META);
    const contentType = validateContentType(opts.contentType) ?? DEFAULT_CONTENT_TYPE;
    const sha256 = validateSha256(opts.sha256)!;
    const range = (r: { offset: number; length: number }): boolean => Number.isSafeInteger(r.offset) && r.offset >= 0 && Number.isSafeInteger(r.length) && r.length > 0;
    const invalid = (why: string): StorageError => new StorageError(ErrorCode.InvalidInput, why, { op: 'splice', key });
    if (pieces.some((p) => 'copy' in p && !range(p.copy))) throw invalid('a copied piece is not a range of the object');
    if (!opts.checked.every(range)) throw invalid('a checked range is not a range of the object');
    const total = pieces.reduce((n, p) => n + ('copy' in p ? p.copy.length : p.bytes.length), 0);
    if (total !== opts.size) throw invalid(`the pieces make ${total} bytes, not ${opts.size}`);
    if (!this.canSplice) return undefined;
    return this.guard('splice', key, async () => {
      // No stat first where ifMatch is not atomic: the driver checks the version right before its commit.
      const info = await this.driver.splice!(this.prefix + key, pieces, {
        ifMatch: opts.ifMatch, sha256, size: opts.size, checked: opts.checked, contentType, metadata, signal: opts.signal, warn: opts.warn,
      }).catch((err: unknown) => {
        // Deleted meanwhile (a 404 to a copy, a read or the stat before the commit): for the caller another version, to read again.
        if (this.codeOf(err) === ErrorCode.NotFound) throw new StorageError(ErrorCode.PreconditionFailed, `object is gone (expected etag ${opts.ifMatch})`, { op: 'splice', key, cause: err });
        throw err;
      });
      return info && this.outside(info);
    });
  }

  /** True when `put` with `ifAbsent` is atomic in this store. */
  get atomicIfAbsent(): boolean {
    return this.driver.atomicIfAbsent;
  }

  /**
   * Objects whose key starts with `prefix`, in UTF-8 byte order of key; pages are fetched lazily.
   * Each carries its etag (or generation), size and modification time; `sha256` where the listing
   * has it, or on every object with `digests`.
   */
  async *list(prefix = '', opts: ListOptions = {}): AsyncGenerator<ObjectInfo> {
    validatePrefix(prefix);
    let token: string | undefined;
    do {
      const page = await this.guard('list', prefix, () => this.driver.list(this.prefix + prefix, token, opts.pageSize ?? this.pageSize));
      const objects = opts.digests && !this.driver.listHasDigest ? await this.withDigests(page.objects) : page.objects;
      for (const o of objects) yield this.outside(o);
      token = page.next;
    } while (token !== undefined);
  }

  /** Deleting a missing key succeeds. */
  async delete(key: string, opts: DeleteOptions = {}): Promise<void> {
    validateKey(key, 'delete');
    await this.guard('delete', key, async () => {
      if (opts.ifMatch !== undefined && !this.driver.atomicIfMatch) {
        // A key already gone is no error, as for an unconditional delete.
        if (!(await this.assertEtag('delete', key, opts.ifMatch, true))) return;
      }
      await this.driver.delete(this.prefix + key, { ifMatch: opts.ifMatch });
    });
  }

  /**
   * Server-side copy within this bucket; the digest and metadata travel with the bytes. A copy of
   * a key onto itself changes nothing and returns the object as it is (decision 9: some stores
   * refuse a self-copy that changes no metadata). For a copy between any two Buckets, verified,
   * see copyObject (copy.ts).
   */
  async copy(src: string, dst: string, opts: CopyOptions = {}): Promise<ObjectInfo> {
    return this.copyFrom(this, src, dst, opts);
  }

  /** Server-side copy of `srcKey` of `source`, a Bucket on this same driver (another prefix, perhaps), to `dst` here. */
  async copyFrom(source: Bucket, srcKey: string, dst: string, opts: CopyOptions = {}): Promise<ObjectInfo> {
    validateKey(srcKey, 'copy');
    validateKey(dst, 'copy');
    if (source.driver !== this.driver) throw new Error('copyFrom needs a Bucket on the same driver; use copyObject');
    if (opts.ifAbsent && opts.ifMatch !== undefined) {
      throw new StorageError(ErrorCode.InvalidInput, 'ifAbsent and ifMatch exclude each other', { op: 'copy', key: srcKey });
    }
    const from = source.prefix + srcKey;
    const to = this.prefix + dst;
    return this.guard('copy', srcKey, async () => {
      const self = from === to;
      if (opts.ifAbsent && (self || !this.driver.atomicIfAbsent) && (await this.exists(to))) {
        throw new StorageError(ErrorCode.PreconditionFailed, `destination ${JSON.stringify(dst)} already exists`, { op: 'copy', key: srcKey });
      }
      if (opts.ifMatch !== undefined && (self || !this.driver.atomicIfMatch)) await this.assertEtag('copy', dst, opts.ifMatch, false);
      if (self) return withType(this.outside(await this.driver.stat(to)));
      return this.outside(await this.driver.copy(from, to, { ifAbsent: opts.ifAbsent ?? false, ifMatch: opts.ifMatch }));
    });
  }

  async health(): Promise<void> {
    await this.guard('health', undefined, () => this.driver.health());
  }

  async close(): Promise<void> {
    await this.driver.close();
  }

  /** The contract code of any error this bucket or its driver raised. */
  codeOf(err: unknown): ErrorCode {
    return this.driver.classify(err) ?? classifyCommon(err) ?? ErrorCode.Unknown;
  }

  private wrap(op: string, key: string | undefined, err: unknown): StorageError {
    if (err instanceof StorageError) {
      // Drivers speak in store keys (prefix included); callers should see their own key.
      return err.key === key ? err : new StorageError(err.code, err.detail, { op: err.op ?? op, key, cause: err.cause ?? err });
    }
    // Some SDK paths reject with plain objects ({ code, message }), not Errors.
    const message = (err as { message?: unknown } | null)?.message;
    let detail = typeof message === 'string' && message ? message : err instanceof Error ? err.name : String(err);
    // Node's fs errors end with the absolute path (`ENOENT: ..., open '/srv/objects/k'`): the key
    // already says which object, and a failed reason or an HTTP answer must not show the server's
    // layout. The path stays on the cause, for logs.
    const syscall = (err as { syscall?: unknown } | null)?.syscall;
    if (typeof syscall === 'string') detail = detail.replace(new RegExp(`, ${syscall} '.*'$`), ` (${syscall})`);
    return new StorageError(this.codeOf(err), `${this.name}: ${detail}`, { op, key, cause: err });
  }

  private async guard<T>(op: string, key: string | undefined, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      throw this.wrap(op, key, err);
    }
  }

  /** The stat-first check for stores without atomic `ifMatch`; false when the key is gone and `missingOk`. */
  private async assertEtag(op: string, key: string, etag: string, missingOk: boolean): Promise<boolean> {
    let info: ObjectInfo;
    try {
      info = await this.driver.stat(this.prefix + key);
    } catch (err) {
      if (this.codeOf(err) !== ErrorCode.NotFound) throw err;
      if (missingOk) return false;
      throw new StorageError(ErrorCode.PreconditionFailed, `object is gone (expected etag ${etag})`, { op, key, cause: err });
    }
    if (info.etag !== etag) throw new StorageError(ErrorCode.PreconditionFailed, `object changed (etag ${info.etag ?? 'none'}, expected ${etag})`, { op, key });
    return true;
  }

  /** Fills `sha256` by a stat of each object the listing left without one, a few at a time. */
  private async withDigests(objects: ObjectInfo[]): Promise<ObjectInfo[]> {
    const out = [...objects];
    let next = 0;
    const lane = async () => {
      for (let i = next++; i < out.length; i = next++) {
        const o = out[i]!;
        if (o.sha256 !== undefined) continue;
        // Deleted since the listing: keep what the listing said, the caller meets the NotFound on use.
        out[i] = await this.driver.stat(o.key).catch((err: unknown) => {
          if (this.codeOf(err) === ErrorCode.NotFound) return o;
          throw err;
        });
      }
    };
    await Promise.all(Array.from({ length: Math.min(LIST_STAT_LANES, out.length) }, lane));
    return out;
  }

  private outside(info: ObjectInfo): ObjectInfo {
    return this.prefix && info.key.startsWith(this.prefix) ? { ...info, key: info.key.slice(this.prefix.length) } : info;
  }

  /**
   * Turns a source into something the driver can read once, with the digest known up front when
   * the driver needs it there (S3 and GCS fix metadata before the first byte): a file is hashed in
   * a first pass (as rclone does for S3), a stream is spooled to a temp file while hashing.
   */
  private async prepare(key: string, source: PutSource, expected: string | undefined, streamSize?: number): Promise<Prepared> {
    const none = async () => {};
    if (source instanceof Uint8Array) {
      const bytes = Buffer.from(source.buffer, source.byteOffset, source.byteLength);
      const sha256 = expected ?? (this.driver.metadataAtEnd ? undefined : createHash('sha256').update(bytes).digest('hex'));
      return { sha256, size: bytes.length, source: { bytes }, cleanup: none };
    }
    if (!(source instanceof Readable)) {
      // Size measured on the descriptor the bytes are read from, and the digest (where the driver
      // needs it first) from a pass over that same descriptor: what a driver announces describes
      // the bytes it sends, even if the file is replaced, grows or shrinks meanwhile (the body then
      // fails its check before the driver can commit).
      const open = await openFile(source.path);
      const close = () => open.file.close().catch(() => {});
      try {
        const known = expected === undefined && this.digestFirst(open.size) ? await hashOpen(open) : undefined;
        return { sha256: expected ?? known?.sha256, size: open.size, source: { open }, cleanup: close };
      } catch (err) {
        await close();
        throw err;
      }
    }
    if (expected !== undefined || !this.digestFirst(streamSize)) {
      return { sha256: expected, size: streamSize, source: { stream: source }, cleanup: none };
    }
    const dir = await mkdtemp(join(this.spoolDir, 'stevedore-spool-'));
    const cleanup = () => rm(dir, { recursive: true, force: true });
    try {
      const path = join(dir, randomUUID());
      const hashing = new HashingStream({ op: 'put', key });
      await pipeline(source, hashing, createWriteStream(path, { highWaterMark: CHUNK }));
      const { sha256, size } = hashing.digest();
      return { sha256, size, source: { path }, cleanup };
    } catch (err) {
      await cleanup();
      throw err;
    }
  }
}

/** Stat and get report the default type for an object stored without one (written by another tool). */
function withType(info: ObjectInfo): ObjectInfo {
  return info.contentType ? info : { ...info, contentType: DEFAULT_CONTENT_TYPE };
}

interface Prepared {
  sha256: string | undefined;
  size: number | undefined;
  source: BodySource;
  cleanup(): Promise<void>;
}
