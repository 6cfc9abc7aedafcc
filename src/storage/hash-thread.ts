import { Worker } from 'node:worker_threads';

/**
 * A put's SHA-256 on a thread of its own, over chunks in shared memory (no copies), so the main
 * thread reads and writes while it hashes. Used only for large bodies (SHARED_FROM): the thread
 * costs a process about 10 MB once started.
 */
export const SHARED_FROM = 64 * 1024 * 1024;

const THREAD = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const streams = new Map();
parentPort.on('message', (m) => {
  if (m.op === 'update') {
    let h = streams.get(m.stream);
    if (!h) streams.set(m.stream, (h = createHash('sha256')));
    h.update(new Uint8Array(m.sab, m.offset, m.length));
    parentPort.postMessage({ id: m.id });
  } else if (m.op === 'digest') {
    const h = streams.get(m.stream) ?? createHash('sha256');
    streams.delete(m.stream);
    parentPort.postMessage({ id: m.id, sha256: h.digest('hex') });
  } else if (m.op === 'drop') {
    streams.delete(m.stream);
  }
});
`;

interface Reply { sha256?: string }
interface Waiting { resolve: (r: Reply) => void; reject: (err: Error) => void }

/** One hashing thread, started on first use, idle without keeping the process alive. */
class HashThread {
  private worker: Worker | undefined;
  /** Counts the workers started: a running hash lives on one, and is lost if it dies. */
  generation = 0;
  private readonly waiting = new Map<number, Waiting>();
  private nextId = 0;

  constructor(private readonly name: string) {}

  /** Sends one request; settles with its reply. */
  ask(message: object): Promise<Reply> {
    const t = this.started();
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      t.ref();
      t.postMessage({ ...message, id });
    });
  }

  /** Sends a message that has no reply (to a worker that is running). */
  tell(message: object): void {
    this.worker?.postMessage(message);
  }

  started(): Worker {
    if (this.worker) return this.worker;
    const t = new Worker(THREAD, { eval: true, name: this.name });
    t.on('message', (m: Reply & { id: number }) => {
      const w = this.waiting.get(m.id);
      if (!w) return;
      this.waiting.delete(m.id);
      if (this.waiting.size === 0) t.unref();
      w.resolve(m);
    });
    const fail = (err: Error): void => {
      if (this.worker === t) this.worker = undefined;
      for (const w of this.waiting.values()) w.reject(err);
      this.waiting.clear();
    };
    t.on('error', fail);
    t.on('exit', (code) => fail(new Error(`the hashing thread exited (${code})`)));
    t.unref();
    this.worker = t;
    this.generation++;
    return t;
  }
}

/** The one hashing thread: about 10 MB of a process's memory once started. */
const STREAMS = new HashThread('stevedore-sha256');

/** Chunks sent to the hashing thread in this process (tests check that large bodies go there). */
export const hashThreadStats = { updates: 0 };

/** True when a body of this many bytes is read into shared memory, to be hashed on the hashing thread. */
export const hashedOnThread = (bodySize: number | undefined): boolean => bodySize !== undefined && bodySize >= SHARED_FROM;

/** A chunk buffer for reading a body: shared memory when it is hashed on the hashing thread, plain otherwise. */
export function chunkBuffer(length: number, shared: boolean): Buffer {
  return shared ? Buffer.from(new SharedArrayBuffer(length)) : Buffer.allocUnsafeSlow(length);
}

let nextStream = 0;

/**
 * One running SHA-256 on the hashing thread, fed from shared memory: `update` sends where the
 * bytes are, not the bytes, so the caller may write them out meanwhile (both only read them), but
 * must not change them before its promise settles. Updates are hashed in the order they are sent.
 */
export class SharedHash {
  private readonly stream = nextStream++;
  private done = false;
  /** The thread this hash lives on, from its first update. */
  private on: number | undefined;

  update(view: Uint8Array): Promise<void> {
    if (!(view.buffer instanceof SharedArrayBuffer)) throw new TypeError('SharedHash.update takes views of a SharedArrayBuffer');
    hashThreadStats.updates++;
    return this.send({ op: 'update', stream: this.stream, sab: view.buffer, offset: view.byteOffset, length: view.byteLength }).then(() => {});
  }

  /** The digest (hex) of every update sent before it. */
  digest(): Promise<string> {
    this.done = true;
    return this.send({ op: 'digest', stream: this.stream }).then((r) => r.sha256!);
  }

  private send(message: object): Promise<Reply> {
    STREAMS.started();
    this.on ??= STREAMS.generation;
    // A thread that died took the updates with it: a digest from a new one would be of less.
    if (this.on !== STREAMS.generation) return Promise.reject(new Error('the hashing thread restarted during a hash'));
    return STREAMS.ask(message);
  }

  /** Forgets an unfinished hash (its body failed). */
  drop(): void {
    if (this.done) return;
    this.done = true;
    STREAMS.tell({ op: 'drop', stream: this.stream });
  }
}
