import { createHash, type Hash } from 'node:crypto';
import { Transform, type TransformCallback } from 'node:stream';
import { StorageError, ErrorCode } from '../errors.js';
import { SharedHash } from './hash-thread.js';

/** Chunk size for file streams: large chunks keep per-chunk overhead far below hashing cost. */
export const CHUNK = 1 << 20;

export interface Digest {
  sha256: string;
  size: number;
}

export interface Expectation {
  sha256?: string | undefined;
  size?: number | undefined;
  op: string;
  key: string;
  /** Called with the running byte count after each chunk. */
  onBytes?: ((bytes: number) => void) | undefined;
  /** False for bytes nobody needs a digest of (a ranged read): they are only counted. @defaultValue true */
  hash?: boolean | undefined;
}

/**
 * Hashes and counts bytes in order, and checks them against an expected digest and size at the
 * end. The one place a transfer's bytes are judged, whether they flow as a stream or are pulled
 * into a caller's buffers.
 */
export class Hasher {
  private readonly hash: Hash = createHash('sha256');
  /** Set by a first chunk in shared memory: every chunk is then hashed on the hashing thread. */
  private shared: SharedHash | undefined;
  private bytes = 0;
  private result: Digest | undefined;

  constructor(private readonly expect: Expectation) {}

  update(chunk: Uint8Array): void {
    if (this.shared) throw new Error('Hasher.update after updateShared');
    if (this.expect.hash !== false) this.hash.update(chunk);
    this.count(chunk.length);
  }

  /**
   * As `update`, but a first chunk in shared memory (a SharedArrayBuffer) puts this hasher on the
   * hashing thread (src/storage/hash-thread.ts), off the caller's: the promise settles once the
   * thread has hashed the chunk, and until then the caller may read the chunk (write it out) but
   * must not change it; every later chunk must be shared too. Any other first chunk keeps the
   * hashing here (undefined: done at once).
   */
  updateShared(chunk: Uint8Array): Promise<void> | undefined {
    if (this.expect.hash !== false && !this.shared && this.bytes === 0 && chunk.buffer instanceof SharedArrayBuffer && chunk.length > 0) this.shared = new SharedHash();
    if (!this.shared) {
      this.update(chunk);
      return undefined;
    }
    // A plain chunk after shared ones is refused (TypeError) before it is counted.
    const hashed = this.shared.update(chunk);
    this.count(chunk.length);
    return hashed;
  }

  private count(n: number): void {
    this.bytes += n;
    this.expect.onBytes?.(this.bytes);
  }

  /** Ends the count: the digest, or ChecksumMismatch when it differs from the expectation. */
  finish(): Digest {
    if (this.shared) throw new Error('Hasher.finish after updateShared: use finishShared');
    return this.judge(this.hash.digest('hex'));
  }

  /** `finish` for a hasher that may be on the hashing thread: once every update sent has been hashed. */
  async finishShared(): Promise<Digest> {
    return this.judge(this.shared ? await this.shared.digest() : this.hash.digest('hex'));
  }

  /** Forgets a hash on the hashing thread that will not be finished. */
  drop(): void {
    this.shared?.drop();
  }

  private judge(sha256: string): Digest {
    const { expect } = this;
    if (expect.size !== undefined && this.bytes !== expect.size) {
      throw new StorageError(ErrorCode.ChecksumMismatch, `size ${this.bytes} does not match the expected ${expect.size}`, { op: expect.op, key: expect.key });
    }
    if (expect.sha256 !== undefined && sha256 !== expect.sha256) {
      throw new StorageError(ErrorCode.ChecksumMismatch, `sha256 ${sha256} does not match the expected ${expect.sha256}`, { op: expect.op, key: expect.key });
    }
    this.result = { sha256, size: this.bytes };
    return this.result;
  }

  /** The digest of everything counted; only once `finish` succeeded. */
  digest(): Digest {
    if (this.expect.hash === false) throw new Error('digest() of bytes counted with hash: false');
    if (!this.result) throw new Error('digest() called before the bytes ended');
    return this.result;
  }
}

/**
 * Passes bytes through unchanged while hashing them. When an expected digest or size is given, the
 * stream errors with ChecksumMismatch at its end instead of ending, so whatever consumes it (an
 * upload, a file rename) never commits bytes that do not match.
 */
export class HashingStream extends Transform {
  private readonly hasher: Hasher;

  constructor(expect: Expectation | Hasher) {
    super();
    this.hasher = expect instanceof Hasher ? expect : new Hasher(expect);
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.hasher.update(chunk);
    cb(null, chunk);
  }

  override _flush(cb: TransformCallback): void {
    try {
      this.hasher.finish();
      cb();
    } catch (err) {
      cb(err as Error);
    }
  }

  /** The digest of everything that flowed; only once the stream has ended. */
  digest(): Digest {
    return this.hasher.digest();
  }
}
