import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { Readable } from 'node:stream';
import type { PutBody } from './driver.js';
import { CHUNK, Hasher, HashingStream, type Digest, type Expectation } from './hashing.js';

/**
 * A file source is opened without following a symlink at its last component (ELOOP, which is
 * InvalidInput): a staged file the worker checked cannot be swapped for a link to a file outside
 * the staging area between the check and the read.
 */
const READ_NOFOLLOW = constants.O_RDONLY | constants.O_NOFOLLOW;

/** Where a put's bytes come from once the Bucket has prepared them. */
export type BodySource = { bytes: Buffer } | { path: string } | { stream: Readable };

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
    const src = 'bytes' in s ? Readable.from([s.bytes]) : 'path' in s ? Readable.from(fileChunks(s.path), { objectMode: false }) : s.stream;
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

  async read(buf: Buffer): Promise<number> {
    this.claim('read');
    if (this.end === 'ok') return 0;
    if (this.end) throw this.end.error;
    try {
      const n = await this.fill(buf);
      if (n > 0) {
        this.hasher.update(buf.subarray(0, n));
        return n;
      }
      this.hasher.finish();
      this.end = 'ok';
      return 0;
    } catch (err) {
      this.end = { error: err };
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
