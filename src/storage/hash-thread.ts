import { createHash } from 'node:crypto';
import { Worker } from 'node:worker_threads';

/**
 * SHA-256 of buffers on a thread of its own, without copying them: each buffer's memory is
 * transferred to the thread and back (WebCrypto's `subtle.digest` copies its input on the calling
 * thread first, a fresh allocation per call: for a 200 MB archive's segments that copy, and the
 * garbage collections the allocations bring on, cost the main thread more than the hashing).
 */
const THREAD = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
parentPort.on('message', ({ id, buf }) => {
  const sha256 = createHash('sha256').update(new Uint8Array(buf)).digest('hex');
  parentPort.postMessage({ id, sha256, buf }, [buf]);
});
`;

/** Below this, a message's round trip costs more than hashing here. */
const ON_THREAD_FROM = 64 * 1024;

interface Waiting { resolve: (r: { sha256: string; buf: Buffer }) => void; reject: (err: Error) => void; length: number }

let thread: Worker | undefined;
const waiting = new Map<number, Waiting>();
let nextId = 0;

function hashThread(): Worker {
  if (thread) return thread;
  const t = new Worker(THREAD, { eval: true, name: 'stevedore-sha256' });
  t.on('message', ({ id, sha256, buf }: { id: number; sha256: string; buf: ArrayBuffer }) => {
    const w = waiting.get(id);
    if (!w) return;
    waiting.delete(id);
    // Idle, the thread must not keep the process alive.
    if (waiting.size === 0) t.unref();
    w.resolve({ sha256, buf: Buffer.from(buf, 0, w.length) });
  });
  const fail = (err: Error): void => {
    if (thread === t) thread = undefined;
    for (const w of waiting.values()) w.reject(err);
    waiting.clear();
  };
  t.on('error', fail);
  t.on('exit', (code) => fail(new Error(`the hashing thread exited (${code})`)));
  t.unref();
  thread = t;
  return t;
}

/**
 * The SHA-256 (hex) of `buf`, and its bytes back. A buffer that is the whole of its memory (as
 * `Buffer.allocUnsafe` gives past 4 KiB) and large enough is hashed on the hashing thread: `buf`
 * itself is then emptied (its memory moved there and back), so use only the buffer returned. Any
 * other is hashed here and returned as it is.
 */
export function sha256Moved(buf: Buffer): Promise<{ sha256: string; buf: Buffer }> {
  if (buf.length < ON_THREAD_FROM || buf.byteOffset !== 0 || buf.buffer.byteLength !== buf.length || !(buf.buffer instanceof ArrayBuffer)) {
    return Promise.resolve({ sha256: createHash('sha256').update(buf).digest('hex'), buf });
  }
  const memory = buf.buffer;
  const t = hashThread();
  const id = nextId++;
  return new Promise((resolve, reject) => {
    waiting.set(id, { resolve, reject, length: buf.length });
    t.ref();
    t.postMessage({ id, buf: memory }, [memory]);
  });
}
