import type { PutBody } from '../../storage/driver.js';
import { fdatasyncFd, writeFully } from '../../storage/fd.js';
import { chunkBuffer, hashedOnThread } from '../../storage/hash-thread.js';

// The put's write loop: a reader and a writer side by side over reused buffers.

/** Bytes written between the fdatasync calls that start the disk early (see writeAll). */
const FLUSH_EVERY = 64 * 1024 * 1024;

/**
 * A put's chunks: 256 KiB (measured on a 1 GiB put when the hash ran on this thread: 1 MiB chunks
 * took 1.3x the time and CPU, 4 MiB chunks 1.8x; with the hash on the hashing thread no size was
 * clearly better), and 32 of them, so reading and hashing can run up to 8 MiB ahead of the
 * writes instead of waiting on each one. For a large body (hashedOnThread) in shared memory, so the
 * body hashes each on the hashing thread while this one writes it (SourceBody.read).
 */
const PUT_CHUNK = 256 * 1024;
const PUT_BUFFERS = 32;

/** Chunk buffers kept between puts, plain and shared: reusing them spares an allocation, and its page faults, per chunk. */
const spare = { plain: [] as Buffer[], shared: [] as Buffer[] };
const SPARE_MAX = 48;

/** A large body is read into shared memory, so it is hashed on the hashing thread (hashedOnThread, SourceBody.read). */
function takeBuffers(size: number | undefined): Buffer[] {
  const count = size === undefined ? PUT_BUFFERS : Math.min(PUT_BUFFERS, Math.ceil(size / PUT_CHUNK) + 1);
  const shared = hashedOnThread(size);
  const pool = shared ? spare.shared : spare.plain;
  return Array.from({ length: count }, () => pool.pop() ?? chunkBuffer(PUT_CHUNK, shared));
}

function giveBuffers(bufs: Buffer[]): void {
  for (const b of bufs) {
    const pool = b.buffer instanceof SharedArrayBuffer ? spare.shared : spare.plain;
    if (b.length === PUT_CHUNK && pool.length < SPARE_MAX) pool.push(b);
  }
}

/**
 * Pulls the body through reused buffers and writes each chunk, in order, at the handle's position;
 * the handle stays open for the fsync that follows. A reader (body.read: read and hash) and a
 * writer run side by side, handing buffers to each other, so neither waits for the other's every
 * chunk: on a 1 GiB put the write chain (the copy into fresh page-cache pages) and the read-and-hash
 * chain each take about as long as the whole put may, and run in lockstep they added up. With
 * `flush`, an fdatasync starts every FLUSH_EVERY bytes: the pages go to disk while we hash, not all
 * at the final fsync (the kernel's own writeback waits for 10% of RAM to be dirty, more than most
 * objects).
 */
export async function writeAll(fd: number, body: PutBody, signal: AbortSignal | undefined, flush: boolean): Promise<void> {
  if (body.size !== undefined && body.size < PUT_CHUNK) return writeSmall(fd, body, signal);
  const bufs = takeBuffers(body.size);
  const free = [...bufs];
  const full: { buf: Buffer; n: number }[] = [];
  let ended = false;
  let failed: { err: unknown } | undefined;
  // Each side waits on at most one thing at a time: a free buffer (reader), a full one (writer).
  let wakeReader: (() => void) | undefined;
  let wakeWriter: (() => void) | undefined;
  const poke = (which: 'reader' | 'writer') => {
    const w = which === 'reader' ? wakeReader : wakeWriter;
    if (which === 'reader') wakeReader = undefined;
    else wakeWriter = undefined;
    w?.();
  };
  const reader = async () => {
    try {
      for (;;) {
        while (!free.length && !failed) await new Promise<void>((r) => { wakeReader = r; });
        if (failed) return;
        const buf = free.pop()!;
        const n = await body.read(buf);
        if (n === 0) return;
        signal?.throwIfAborted();
        full.push({ buf, n });
        poke('writer');
      }
    } catch (err) {
      failed ??= { err };
    } finally {
      ended = true;
      poke('writer');
    }
  };
  const writer = async () => {
    let flushing: Promise<unknown> = Promise.resolve();
    let unflushed = 0;
    try {
      for (;;) {
        while (!full.length && !ended && !failed) await new Promise<void>((r) => { wakeWriter = r; });
        if (failed) return;
        const item = full.shift();
        if (!item) break;
        await writeFully(fd, item.buf, item.n);
        free.push(item.buf);
        poke('reader');
        unflushed += item.n;
        if (flush && unflushed >= FLUSH_EVERY) {
          await flushing;
          flushing = fdatasyncFd(fd);
          // A failure surfaces at the next await of it; until then it must not count as unhandled.
          flushing.catch(() => {});
          unflushed = 0;
        }
      }
      await flushing;
    } catch (err) {
      failed ??= { err };
      poke('reader');
    } finally {
      // Never leave a flush running on a handle about to be closed.
      await flushing.catch(() => {});
    }
  };
  try {
    // Each side ends only once its own read or write is over: no buffer or handle is still in use.
    await Promise.all([reader(), writer()]);
  } finally {
    giveBuffers(bufs);
  }
  if (failed) throw failed.err;
}

/**
 * A body announced smaller than one chunk (a log entry, a sidecar-sized object): read and written
 * in turn through one buffer a byte longer than announced, so the read that finds the end (or a
 * body longer than announced, which the hasher then refuses) needs no second buffer, and the
 * reader and writer of writeAll, which only pay on large bodies, are not set up.
 */
async function writeSmall(fd: number, body: PutBody, signal: AbortSignal | undefined): Promise<void> {
  const buf = Buffer.allocUnsafe(body.size! + 1);
  for (let n; (n = await body.read(buf)) > 0;) {
    signal?.throwIfAborted();
    await writeFully(fd, buf, n);
  }
}
