import { createHash, randomUUID, type Hash } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdir, open, rename, rm, type FileHandle } from 'node:fs/promises';
import type { IncomingHttpHeaders } from 'node:http';
import { join } from 'node:path';
import { Transform, type Readable, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { ErrorCode } from '../errors.js';
import { STAGING_INCOMING, STAGING_TMP, type Staging } from '../staging.js';
import { HttpError } from './errors.js';

/** A request body received whole into the staging area, on disk (fsynced) before it is visible. */
export interface Staged {
  /** Relative to the staging area: what a payload's `source.path` names. */
  rel: string;
  abs: string;
  size: number;
  /** Undefined only for a body received with `digest: false`. */
  sha256: string | undefined;
  remove(): Promise<void>;
}

export interface ReceiveOptions {
  /** Bytes past which the upload is refused with 413 (counted here: Fastify does not limit a streamed body). */
  limit: number;
  /** The request's Content-Length, when it sent one: over the limit is refused before a byte is read. */
  declared?: number | undefined;
  /** Expected SHA-256 (`X-Content-SHA256`): a mismatch is 422 and nothing is kept. */
  sha256?: string | undefined;
  /**
   * fsync the staged file (and its folder) before it is visible: when a job is enqueued and
   * answered 202, the file must outlive a crash. A caller that answers only once the job is over
   * (?wait, session writes) skips it: the job is given the received digest, so a file torn by a
   * crash fails its check rather than being stored, and the object's own fsync is the durable one.
   * @defaultValue true
   */
  durable?: boolean;
  /**
   * False: the body is not hashed as it arrives, for a consumer that reads and hashes the staged
   * file anyway (the store job, as it stores it). On a busy server the SHA-256 runs on the main
   * thread, serialised with receiving: it was a third of the upload's CPU (README, Speed). Ignored
   * when `sha256` is to be checked or the file is not `durable` (that job needs the digest).
   * @defaultValue true
   */
  digest?: boolean;
  /** @defaultValue UPLOAD_IDLE_MS */
  idleMs?: number;
  /** What the 413 and 422 answers are called under the session routes. */
  codes?: { tooLarge: string; mismatch: string };
}

/**
 * The request's `Content-Length`, parsed strictly: digits only (RFC 9110), a safe integer. Anything
 * else is 400 with `code` (`Number()` would turn `abc` into NaN, which no limit check refuses, and
 * `1e9` or ` 12` into numbers the client did not send). Node's own parser refuses most bad values
 * on a real socket already; this is the one place the server reads the header.
 */
export function declaredLength(headers: IncomingHttpHeaders, code: string = ErrorCode.InvalidInput): number | undefined {
  const v = headers['content-length'];
  if (v === undefined) return undefined;
  const n = /^\d+$/.test(v) ? Number(v) : NaN;
  if (!Number.isSafeInteger(n)) throw new HttpError(400, code, `InvalidInput: Content-Length: must be a number of bytes, got ${JSON.stringify(v.slice(0, 40))}`);
  return n;
}

export const tooLarge = (limit: number, code = ErrorCode.InvalidInput as string): HttpError =>
  new HttpError(413, code, `InvalidInput: the upload is over the limit of ${limit} bytes (STEVEDORE_MAX_UPLOAD_BYTES)`, { connection: 'close' });

/**
 * A body that sends nothing for this long is dropped (408): a client stalled mid-upload would
 * otherwise hold its request and its temp file until the staging sweep pulls the file from under
 * it. The server has no socket idle timeout of its own, since `?wait` answers sit silent for longer.
 */
export const UPLOAD_IDLE_MS = 120_000;

/**
 * Counts (and unless told not to, hashes) what flows; errors with 413 the moment the count passes
 * the limit, before that chunk is written, and with 408 when the body goes silent for `idleMs`.
 */
class Meter extends Transform {
  size = 0;
  private readonly hash: Hash | undefined;
  private idle: NodeJS.Timeout;
  constructor(private readonly limit: number, private readonly code: string, private readonly idleMs: number, hashing: boolean, private readonly flusher?: EarlyFlush) {
    super();
    this.hash = hashing ? createHash('sha256') : undefined;
    this.idle = this.arm();
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.idle.refresh();
    this.size += chunk.length;
    if (this.size > this.limit) return cb(tooLarge(this.limit, this.code));
    this.hash?.update(chunk);
    this.flusher?.received(chunk.length);
    cb(null, chunk);
  }

  override _flush(cb: TransformCallback): void {
    clearTimeout(this.idle);
    cb();
  }

  override _destroy(err: Error | null, cb: (err: Error | null) => void): void {
    clearTimeout(this.idle);
    cb(err);
  }

  digest(): string | undefined {
    return this.hash?.digest('hex');
  }

  private arm(): NodeJS.Timeout {
    const t = setTimeout(() => {
      this.destroy(new HttpError(408, ErrorCode.Transient, `Transient: the upload sent nothing for ${this.idleMs / 1000} s and was dropped; nothing was stored`, { connection: 'close' }));
    }, this.idleMs);
    t.unref();
    return t;
  }
}

/** Bytes received between the fdatasync calls that start a durable upload's disk writes early. */
const FLUSH_EVERY = 64 << 20;

/**
 * fdatasync of a durable upload's file every FLUSH_EVERY bytes received, one at a time, so its
 * pages go to disk while the body still arrives instead of all at the final fsync (the kernel's
 * own writeback waits for 10% of RAM to be dirty, more than most uploads): on a 1 GiB PUT that
 * final wait was as long as the receiving. A failed flush fails the upload at `finish` (an fsync
 * error is reported once: a later fsync must never be taken as its retry).
 */
class EarlyFlush {
  private pending: Promise<void> | undefined;
  private failed: { err: unknown } | undefined;
  private unflushed = 0;
  constructor(private readonly fh: FileHandle) {}

  received(n: number): void {
    this.unflushed += n;
    if (this.unflushed < FLUSH_EVERY || this.pending || this.failed) return;
    this.unflushed = 0;
    this.pending = this.fh.datasync().catch((err: unknown) => { this.failed = { err }; }).finally(() => { this.pending = undefined; });
  }

  /** Resolves once no flush is running (never rejects): the handle may be closed. */
  async settled(): Promise<void> {
    await this.pending;
  }

  /** The last flush (fsync: the size too), after any early one; throws if one of them failed. */
  async finish(): Promise<void> {
    await this.settled();
    if (this.failed) throw this.failed.err;
    await this.fh.sync();
  }
}

/**
 * Streams a request body into `incoming/` of the staging area under a temp name (which the staging
 * sweep removes if the server dies meanwhile), fsyncs it and renames it into place. A client that
 * disconnects, a body over the limit, a digest mismatch or a full disk leave nothing behind.
 */
export async function receiveToStaging(body: Readable, staging: Staging, opts: ReceiveOptions): Promise<Staged> {
  const codes = opts.codes ?? { tooLarge: ErrorCode.InvalidInput, mismatch: ErrorCode.ChecksumMismatch };
  if (opts.declared !== undefined && opts.declared > opts.limit) throw tooLarge(opts.limit, codes.tooLarge);
  const dir = join(staging.root, STAGING_INCOMING);
  await mkdir(dir, { recursive: true });
  const id = randomUUID();
  const tmp = join(dir, `${STAGING_TMP}http-${id}`);
  const rel = join(STAGING_INCOMING, `http-${id}`);
  const abs = join(staging.root, rel);
  const durable = opts.durable ?? true;
  const fh = await open(tmp, 'wx');
  const flush = durable ? new EarlyFlush(fh) : undefined;
  const meter = new Meter(opts.limit, codes.tooLarge, opts.idleMs ?? UPLOAD_IDLE_MS, opts.digest !== false || opts.sha256 !== undefined || !durable, flush);
  try {
    try {
      // By its descriptor: a stream made by fh.createWriteStream with autoClose off never lets fh.close() resolve (Node 20).
      await pipeline(body, meter, createWriteStream('', { fd: fh.fd, autoClose: false, highWaterMark: 1 << 20 }));
      // On disk before it is visible: a crash must not leave a short file for a job to store.
      if (flush) await flush.finish();
    } finally {
      await flush?.settled();
      await fh.close();
    }
    const sha256 = meter.digest();
    if (opts.sha256 !== undefined && opts.sha256.toLowerCase() !== sha256) {
      throw new HttpError(422, codes.mismatch, `ChecksumMismatch: the body's sha256 is ${sha256}, X-Content-SHA256 said ${opts.sha256}; nothing was stored`);
    }
    if (durable) await staging.commitFile(tmp, abs);
    else await rename(tmp, abs);
    return { rel, abs, size: meter.size, sha256, remove: () => rm(abs, { force: true }) };
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}
