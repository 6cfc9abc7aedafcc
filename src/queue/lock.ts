import { randomBytes } from 'node:crypto';
import type { Redis } from 'ioredis';
import { ErrorCode, StorageError } from '../errors.js';
import type { GroupCommit, Lease, Locks } from '../payload.js';
import { RedisGroupCommit } from './group-commit.js';

/**
 * Renews only our own lock: a lock that expired and was taken by another holder is left alone.
 * KEYS[2..] are keys the holder keeps alive with it (ARGV[3]: their TTL).
 */
const RENEW = `if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #KEYS do redis.call('pexpire', KEYS[i], ARGV[3]) end
return redis.call('pexpire', KEYS[1], ARGV[2])`;
/** Releases only our own lock. */
const RELEASE = `if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end`;

/** The commands the locks use; a cluster client has them too. */
export type LockRedis = Pick<Redis, 'set' | 'eval'>;

export interface RedisLocksOptions {
  /** BullMQ key prefix (`bull`, `{stevedore}`): lock keys share it, and so a cluster slot with the queue. */
  prefix: string;
  queue: string;
  /**
   * How long a lock outlives its holder's last renewal; it is renewed at a third of this. A holder
   * paused longer than this (GC, a frozen VM) loses the lock: on a store without conditional
   * writes that is the window in which two edits could race.
   * @defaultValue 30000
   */
  ttlMs?: number;
  /** How long `acquire` waits for a busy lock before failing Transient (the job is retried). @defaultValue 60000 */
  waitMs?: number;
  /** Bound on one Redis call; a call that hangs (Redis away) counts as failed. @defaultValue a third of `ttlMs`, at most 5000 */
  callTimeoutMs?: number;
}

/**
 * Named locks in Redis, one key each (`<prefix>:<queue>:lock:<name>`), the single-instance
 * Redlock shape: `SET NX PX` with a random token, renewed by a compare-and-pexpire while held,
 * released by a compare-and-del. A lease's signal aborts once the holder can no longer be sure it
 * holds the lock (a renewal found another token, or no renewal succeeded for a whole TTL), so a
 * job stops before it commits. The token is the fencing check; stores with conditional writes add
 * the real fence (the commit's ifMatch).
 */
export class RedisLocks implements Locks {
  private readonly ttlMs: number;
  private readonly waitMs: number;
  private readonly callTimeoutMs: number;
  /** Work queued for a lock's holder by the jobs waiting for it (src/queue/group-commit.ts). */
  readonly group: GroupCommit;

  constructor(private readonly redis: LockRedis, private readonly opts: RedisLocksOptions) {
    this.ttlMs = opts.ttlMs ?? 30_000;
    this.waitMs = opts.waitMs ?? 60_000;
    this.callTimeoutMs = opts.callTimeoutMs ?? Math.min(5_000, Math.max(50, Math.floor(this.ttlMs / 3)));
    this.group = new RedisGroupCommit(redis, this, { prefix: opts.prefix, queue: opts.queue, waitMs: this.waitMs, ttlMs: this.ttlMs, call: (p) => this.call(p) });
  }

  /** The Redis key of lock `name`. */
  key(name: string): string {
    return `${this.opts.prefix}:${this.opts.queue}:lock:${name}`;
  }

  async acquire(name: string, signal: AbortSignal): Promise<Lease> {
    const token = randomBytes(16).toString('hex');
    const deadline = Date.now() + this.waitMs;
    for (let delay = 20; ; delay = Math.min(delay * 2, 500)) {
      if (signal.aborted) throw new StorageError(ErrorCode.Transient, `waiting for lock ${name} aborted`, { op: 'lock', cause: signal.reason });
      const got = await this.tryAcquire(name, token);
      if (got) return got.lease;
      const left = deadline - Date.now();
      if (left <= 0) throw new StorageError(ErrorCode.Transient, `lock ${name} still busy after ${this.waitMs} ms`, { op: 'lock' });
      // Full jitter, so waiters do not retry in step.
      await sleep(Math.min(left, Math.max(5, Math.random() * delay)), signal);
    }
  }

  /**
   * One try: the lease and its token (what Redis holds under the key) when the lock was free, else
   * undefined. `keep`: keys (in the lock's slot) whose TTL each renewal refreshes while the lock is ours.
   */
  async tryAcquire(name: string, token = randomBytes(16).toString('hex'), keep?: { keys: string[]; ttlMs: number }): Promise<{ lease: Lease; token: string } | undefined> {
    const key = this.key(name);
    const got = await this.call(this.redis.set(key, token, 'PX', this.ttlMs, 'NX')).catch(() => null);
    return got === 'OK' ? { lease: this.lease(name, key, token, keep), token } : undefined;
  }

  private lease(name: string, key: string, token: string, keep?: { keys: string[]; ttlMs: number }): Lease {
    const lost = new AbortController();
    let lastOk = Date.now();
    let released = false;
    const lose = (why: string): void => {
      clearInterval(timer);
      if (!lost.signal.aborted) lost.abort(new StorageError(ErrorCode.Transient, `lock ${JSON.stringify(name)} lost: ${why}`));
    };
    const every = Math.max(50, Math.floor(this.ttlMs / 3));
    let inFlight = false;
    const renew = async (): Promise<void> => {
      // Give up while the lock is surely still ours: before the next tick could find it expired.
      if (Date.now() - lastOk + every >= this.ttlMs) return lose(`not renewed for ${Date.now() - lastOk} ms`);
      if (inFlight) return;
      inFlight = true;
      const started = Date.now();
      try {
        const also = keep?.keys ?? [];
        const n = await this.call(this.redis.eval(RENEW, 1 + also.length, key, ...also, token, String(this.ttlMs), String(keep?.ttlMs ?? 0)));
        if (released) return;
        if (Number(n) === 1) lastOk = started;
        else lose('another holder has it (it expired)');
      } catch {
        // Redis away: the lock may still be ours until a TTL after the last renewal that landed.
      } finally {
        inFlight = false;
      }
    };
    const timer = setInterval(() => { void renew(); }, every);
    timer.unref();
    return {
      signal: lost.signal,
      release: async () => {
        if (released) return;
        released = true;
        clearInterval(timer);
        // Best effort: a release that fails leaves the lock to expire.
        await this.call(this.redis.eval(RELEASE, 1, key, token)).catch(() => {});
      },
    };
  }

  /** A Redis call bounded by `callTimeoutMs`. */
  call<T>(p: Promise<T>): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`redis call over ${this.callTimeoutMs} ms`)), this.callTimeoutMs);
    });
    return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
  }
}

export function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => { clearTimeout(timer); signal.removeEventListener('abort', done); resolve(); };
    const timer = setTimeout(done, ms);
    signal.addEventListener('abort', done, { once: true });
  });
}
