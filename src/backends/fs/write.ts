import type { PutBody } from '../../storage/driver.js';
import { fdatasyncFd, writeFully } from '../../storage/fd.js';
import { CHUNK } from '../../storage/hashing.js';

// The put's write loop, moved here verbatim from fs.ts (only `export` added to writeAll).

/** Bytes written between the fdatasync calls that start the disk early (see writeAll). */
const FLUSH_EVERY = 64 * 1024 * 1024;

/** Chunk buffers kept between puts: reusing them spares an allocation, and its page faults, per chunk. */
const spare: Buffer[] = [];
const SPARE_MAX = 12;

/**
 * Three buffers: while one is being written, the next is read and hashed, and the last written
 * one waits for the write before it to finish. A body smaller than a chunk gets buffers its size.
 */
function takeBuffers(size: number | undefined): Buffer[] {
  if (size !== undefined && size < CHUNK) return [0, 1, 2].map(() => Buffer.allocUnsafe(Math.max(1, size)));
  return [0, 1, 2].map(() => spare.pop() ?? Buffer.allocUnsafeSlow(CHUNK));
}

function giveBuffers(bufs: Buffer[]): void {
  for (const b of bufs) if (b.length === CHUNK && spare.length < SPARE_MAX) spare.push(b);
}

/**
 * Pulls the body through three reused buffers and writes each chunk at the handle's position; the
 * handle stays open for the fsync that follows. Reading (and hashing) the next chunk overlaps the
 * write of this one, so the disk and the hash work at once. With `flush`, an fdatasync starts every
 * FLUSH_EVERY bytes: the pages go to disk while we hash, not all at the final fsync (the kernel's
 * own writeback waits for 10% of RAM to be dirty, more than most objects).
 */
export async function writeAll(fd: number, body: PutBody, signal: AbortSignal | undefined, flush: boolean): Promise<void> {
  const bufs = takeBuffers(body.size);
  let reading: Promise<number> = Promise.resolve(0);
  let writing: Promise<unknown> = Promise.resolve();
  let flushing: Promise<unknown> = Promise.resolve();
  let unflushed = 0;
  // A failure surfaces at the next await of the promise; until then it must not count as unhandled.
  const track = <T>(p: Promise<T>) => { p.catch(() => {}); return p; };
  try {
    reading = track(body.read(bufs[0]!));
    for (let i = 0; ; i++) {
      const n = await reading;
      if (n === 0) break;
      signal?.throwIfAborted();
      // Buffer i+1 is free: its last write (chunk i-2) finished before chunk i-1's write began.
      reading = track(body.read(bufs[(i + 1) % 3]!));
      await writing;
      writing = track(writeFully(fd, bufs[i % 3]!, n));
      unflushed += n;
      if (flush && unflushed >= FLUSH_EVERY) {
        await writing;
        await flushing;
        flushing = track(fdatasyncFd(fd));
        unflushed = 0;
      }
    }
    await writing;
    await flushing;
  } finally {
    // Never leave a read, write or flush running on a buffer or handle about to be reused or closed.
    await Promise.allSettled([reading, writing, flushing]);
    giveBuffers(bufs);
  }
}
