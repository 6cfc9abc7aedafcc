import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { Readable } from 'node:stream';
import type { PutBody } from './driver.js';
import { ErrorCode, StorageError } from '../errors.js';
import { chunkBuffer, hashedOnThread } from './hash-thread.js';
import { CHUNK, Hasher, HashingStream, type Digest, type Expectation } from './hashing.js';

/**
 * A file source is opened without following a symlink at its last component (ELOOP, which is
 * InvalidInput): a staged file the worker checked cannot be swapped for a link to a file outside
 * the staging area between the check and the read.
 */
const READ_NOFOLLOW = constants.O_RDONLY | constants.O_NOFOLLOW;

/**
 * An open file and its size, measured on this descriptor (fstat) when it was opened: a body reads
 * exactly `size` bytes from it, by position, so the size a driver announces (GCS's resumable
 * session, S3's ContentLength) and the bytes that flow are of one file even if its name is
 * replaced meanwhile; a file that grows past `size` fails (ChecksumMismatch) instead of sending
 * more. The opener closes it; a body never does.
 */
export interface OpenFile {
  file: FileHandle;
  size: number;
  /** For messages. */
  path: string;
}

/** Where a put's bytes come from once the Bucket has prepared them. */
export type BodySource = { bytes: Buffer } | { path: string } | { stream: Readable } | { open: OpenFile };

/** Opens a file source without following a symlink and measures it on the same descriptor. */
export async function openFile(path: string): Promise<OpenFile> {
  const file = await open(path, READ_NOFOLLOW);
  try {
    return { file, size: (await file.stat()).size, path };
  } catch (err) {
    await file.close().catch(() => {});
    throw err;
  }
}

/**
 * The bytes of one put as a driver receives them, hashed and checked on the way. A driver takes
 * them either as a stream (what the SDKs want) or pulls them into buffers of its own with `read`,
 * which spares a fresh buffer per chunk (for a 1 GiB file that is half the CPU of the copy). It uses
 * one of the two, once; `close` releases whatever was opened.
 */
export class SourceBody implements PutBody {
  private readonly hasher: Hasher;
  private mode: 'stream' | 'read' | undefined;
  private piped: HashingStream | undefined;
  /** A stream this body opened itself (file or bytes), closed with it. */
  private opened: Readable | undefined;
  private fh: FileHandle | undefined;
  private offset = 0;
  private iterator: AsyncIterator<unknown> | undefined;
  private rest: Buffer | undefined;
  private end: { error: unknown } | 'ok' | undefined;
  /** Per buffer read into, the hashing thread's pass over its last bytes (shared buffers only). */
  private readonly hashing = new Map<ArrayBufferLike, Promise<void>>();

  constructor(
    private readonly source: BodySource,
    readonly sha256: string | undefined,
    readonly size: number | undefined,
    expect: Expectation,
  ) {
    this.hasher = new Hasher(expect);
  }

  get stream(): Readable {
    if (this.piped) return this.piped;
    this.claim('stream');
    const s = this.source;
    const src = 'bytes' in s ? Readable.from([s.bytes])
      : 'path' in s ? Readable.from(fileChunks(s.path), { objectMode: false })
        : 'open' in s ? Readable.from(sizedChunks(s.open), { objectMode: false }) : s.stream;
    const hashing = new HashingStream(this.hasher);
    // A source error must reach the driver as an error of the body, never as a clean end.
    src.on('error', (err: Error) => hashing.destroy(err));
    // A small body can end (and fail its digest check) before the driver starts reading; the error
    // stays on the stream for the driver to meet, and must not crash the process first.
    hashing.on('error', () => {});
    src.pipe(hashing);
    this.piped = hashing;
    if (!('stream' in s)) this.opened = src;
    return hashing;
  }

  /**
   * Fills `buf` with the next bytes and hashes them. A `buf` in shared memory (a SharedArrayBuffer,
   * as the filesystem driver's put buffers are) is hashed on the hashing thread, beside the
   * caller's write of it: the next read into the same buffer waits until the thread is done with
   * it, so the caller needs only to hand each buffer back to `read` to reuse it.
   */
  async read(buf: Buffer): Promise<number> {
    this.claim('read');
    if (this.end === 'ok') return 0;
    if (this.end) throw this.end.error;
    try {
      // Only a shared buffer waits: the others take no extra turn (a log entry's put is two reads).
      const prior = this.hashing.get(buf.buffer);
      if (prior) await prior;
      const n = await this.fill(buf);
      if (n > 0) {
        const hashed = this.hasher.updateShared(buf.subarray(0, n));
        if (hashed) {
          this.hashing.set(buf.buffer, hashed);
          // Awaited at the next read of this buffer or at the end; a failure meanwhile is not unhandled.
          hashed.catch(() => {});
        }
        return n;
      }
      if (this.hashing.size > 0) {
        await Promise.all(this.hashing.values());
        await this.hasher.finishShared();
      } else {
        this.hasher.finish();
      }
      this.end = 'ok';
      return 0;
    } catch (err) {
      this.end = { error: err };
      this.hasher.drop();
      throw err;
    }
  }

  digest(): Digest {
    return this.hasher.digest();
  }

  /** Releases the source: a driver that failed early (precondition, auth) may have left it unread. */
  async close(): Promise<void> {
    if ('stream' in this.source) this.source.stream.destroy();
    this.opened?.destroy();
    await this.iterator?.return?.().catch(() => {});
    await this.fh?.close().catch(() => {});
  }

  private claim(mode: 'stream' | 'read'): void {
    if (this.mode !== undefined && this.mode !== mode) throw new Error('a PutBody is read either as a stream or with read(), not both');
    this.mode = mode;
  }

  private async fill(buf: Buffer): Promise<number> {
    const s = this.source;
    if ('bytes' in s) {
      const n = s.bytes.copy(buf, 0, this.offset);
      this.offset += n;
      return n;
    }
    if ('path' in s) {
      this.fh ??= await open(s.path, READ_NOFOLLOW);
      return (await this.fh.read(buf, 0, buf.length, null)).bytesRead;
    }
    if ('open' in s) {
      const want = Math.min(buf.length, s.open.size - this.offset);
      if (want === 0) {
        await assertNoMore(s.open);
        return 0;
      }
      const n = (await s.open.file.read(buf, 0, want, this.offset)).bytesRead;
      // Shorter than measured: the hasher's size check fails it at the end.
      this.offset += n;
      return n;
    }
    if (!this.rest?.length) {
      this.iterator ??= s.stream[Symbol.asyncIterator]();
      const next = await this.iterator.next();
      if (next.done) return 0;
      const v = next.value as Uint8Array | string;
      this.rest = typeof v === 'string' ? Buffer.from(v) : Buffer.from(v.buffer, v.byteOffset, v.byteLength);
    }
    const n = this.rest.copy(buf);
    this.rest = this.rest.subarray(n);
    return n;
  }
}

/** A file's bytes in CHUNK-sized pieces, opened without following a symlink; closed when done or abandoned. */
async function* fileChunks(path: string): AsyncGenerator<Buffer> {
  const fh = await open(path, READ_NOFOLLOW);
  try {
    for await (const chunk of fh.createReadStream({ highWaterMark: CHUNK, autoClose: false })) yield chunk as Buffer;
  } finally {
    await fh.close();
  }
}

/** Exactly `size` bytes of an open file, by position, in CHUNK-sized pieces; then checks it did not grow. */
async function* sizedChunks(f: OpenFile): AsyncGenerator<Buffer> {
  for (let at = 0; at < f.size;) {
    const buf = Buffer.allocUnsafe(Math.min(CHUNK, f.size - at));
    const { bytesRead } = await f.file.read(buf, 0, buf.length, at);
    // Shrunk: the hasher's size check fails the body at its end.
    if (bytesRead === 0) return;
    at += bytesRead;
    yield bytesRead === buf.length ? buf : buf.subarray(0, bytesRead);
  }
  await assertNoMore(f);
}

/** A file that grew past the size announced for it is being written still: its bytes are not the ones measured. */
async function assertNoMore(f: OpenFile): Promise<void> {
  const { bytesRead } = await f.file.read(Buffer.alloc(1), 0, 1, f.size);
  if (bytesRead > 0) throw new StorageError(ErrorCode.ChecksumMismatch, `${f.path} grew past its size of ${f.size} bytes while it was read`, { op: 'put' });
}

/** SHA-256 and size of a file, pulled through one reused buffer. */
export async function hashFile(path: string): Promise<Digest> {
  const open = await openFile(path);
  try {
    return await hashOpen(open);
  } finally {
    await open.file.close();
  }
}

/** Buffers a body is read through to hash it: the hashing thread hashes one while the next is read. */
const THROUGH_BUFFERS = 4;
const THROUGH_CHUNK = 256 * 1024;

/**
 * Reads a body to its end only to hash and check it. A large one (SHARED_FROM) goes through a few
 * buffers of shared memory in turn: each is hashed on the hashing thread while the next is read,
 * so reading and hashing take both cores.
 */
export async function readThrough(body: PutBody, signal?: AbortSignal): Promise<void> {
  const chunk = Math.min(THROUGH_CHUNK, Math.max(1, body.size ?? THROUGH_CHUNK));
  // Hashed here, one buffer does: nothing runs beside the read.
  const shared = hashedOnThread(body.size);
  const bufs = Array.from({ length: shared ? THROUGH_BUFFERS : 1 }, () => chunkBuffer(chunk, shared));
  for (let i = 0; (await body.read(bufs[i % bufs.length]!)) > 0; i++) signal?.throwIfAborted();
}

/** SHA-256 of exactly the `size` bytes of an open file (ChecksumMismatch if it grew or shrank). */
export async function hashOpen(open: OpenFile): Promise<Digest> {
  const body = new SourceBody({ open }, undefined, open.size, { size: open.size, op: 'hash', key: open.path });
  try {
    await readThrough(body);
    return body.digest();
  } finally {
    await body.close();
  }
}
