import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { mkdirSync, rmSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Redis } from 'ioredis';
import { pino } from 'pino';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { APPLIED_META, RepackPayload, repackSession, settleSealed, type RepackResult } from '../../jobs/repack-session.js';
import { FsDriver } from '../../src/backends/fs.js';
import { ErrorCode, StorageError } from '../../src/errors.js';
import { parsePayload, type GroupHolder, type JobDeps, type Lease } from '../../src/payload.js';
import { redisConnection } from '../../src/queue/connection.js';
import { StevedoreClient } from '../../src/queue/client.js';
import { RedisLocks } from '../../src/queue/lock.js';
import { sessionKey, sessionLockName } from '../../src/session/ids.js';
import { OpFailed, stagedFailed } from '../../src/session/plan.js';
import { listSession } from '../../src/session/read.js';
import { Bucket } from '../../src/storage/bucket.js';
import { run } from '../archive/corpus.js';
import { tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { printWorkersOnFailure, spawnWorker, stopAllWorkers, type WorkerProcess } from '../harness/worker-process.js';
import { catText, jobDeps, sessionEnv, type SessionEnv } from './helpers.js';

// Issue 9, slice 3: repacks waiting for a session's lock hand their ops to its holder, which
// applies them all in one rewrite. STEVEDORE_SOAK=1 runs the 30-way version across 3 processes.
const SOAK = process.env.STEVEDORE_SOAK === '1';
const sha = (b: string | Buffer): string => createHash('sha256').update(b).digest('hex');
const QUEUE = 'group-test';

async function until<T>(what: string, probe: () => Promise<T | undefined | false>, timeoutMs = 60_000, everyMs = 25): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe().catch(() => undefined);
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** While false, NeverHolds jobs never take the lock themselves: they can only be absorbed by another job's batch. */
const holds = { allowed: false };
class NeverHolds extends RedisLocks {
  override async tryAcquire(...args: Parameters<RedisLocks['tryAcquire']>): ReturnType<RedisLocks['tryAcquire']> {
    return holds.allowed ? super.tryAcquire(...args) : undefined;
  }
}

beforeEach(() => { holds.allowed = false; });

/** A worker's Redis that can die: from `kill()` on, every lock and group call fails (its process is gone, as far as Redis sees). */
function killable(c: Redis): { redis: Redis; kill(): void; readonly dead: boolean } {
  const state = { dead: false };
  const redis = wrapCalls(c, ['eval', 'set'], (call) => (state.dead ? Promise.reject(new Error('this worker is dead')) : call()));
  return { redis, kill: () => { state.dead = true; }, get dead() { return state.dead; } };
}

/** A Redis whose calls named in `names` go through `around(call, args)`; every other call is the connection's own. */
function wrapCalls(c: Redis, names: string[], around: (call: () => Promise<unknown>, args: unknown[]) => Promise<unknown>): Redis {
  return new Proxy(c, {
    get(t, k) {
      const v = Reflect.get(t, k) as unknown;
      if (typeof v !== 'function') return v;
      const f = v as (...a: unknown[]) => Promise<unknown>;
      if (typeof k !== 'string' || !names.includes(k)) return f.bind(t);
      return (...a: unknown[]) => around(() => f.apply(t, a), a);
    },
  });
}

/** A job logger that runs `fn` (synchronously, before the job goes on) when the job logs `msg`. */
const onLog = (msg: string, fn: () => void): JobDeps['log'] => pino({ level: 'info', hooks: { logMethod(args, method) { if ((args as unknown[]).includes(msg)) fn(); method.apply(this, args); } } }, { write() {} });

/** A bucket whose first put commits and then fails, as a put whose reply was lost does: the commit may or may not have happened, as far as the job knows. */
class ReplyLost extends Bucket {
  armed = true;
  override async put(...args: Parameters<Bucket['put']>): ReturnType<Bucket['put']> {
    const info = await super.put(...args);
    if (!this.armed) return info;
    this.armed = false;
    throw new StorageError(ErrorCode.Transient, 'injected: the put committed but its reply was lost', { op: 'put' });
  }
}

/** An id long enough that a few marks fill a batch's share of the archive's metadata (about 80 characters a mark). */
const long = (tag: string, i: number): string => `${tag}${String(i).padStart(2, '0')}-${'x'.repeat(60)}`;

describe('repack-session group commit (in-process, real Redis)', () => {
  let env: SessionEnv;
  let redis: TestRedis;
  let conn: Redis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let root: string;
  let staging: string;
  let bucket: Bucket;
  let n = 0;

  beforeAll(async () => {
    env = await sessionEnv('stevedore-group-');
    ({ redis, conn, tmp, root, staging } = env);
    bucket = new Bucket(new FsDriver({ root }), { name: 'default' });
  });
  afterAll(async () => {
    await env?.close();
  });

  const locks = () => new RedisLocks(conn, { prefix: 'bull', queue: QUEUE });
  /** Holds the session's lock (as a whole-session write would) so that jobs queue up behind it. */
  const block = (s: string): Promise<Lease> => locks().acquire(sessionLockName(s), new AbortController().signal);
  interface JobOpts { signal?: AbortSignal; neverHolds?: boolean; enqueuedAt?: number; id?: string; redis?: Redis; ttlMs?: number; log?: JobDeps['log']; bucket?: Bucket }
  const job = (s: string, ops: unknown[], opts: JobOpts = {}): { id: string; mark: string; enqueuedAt: number; done: Promise<RepackResult> } => {
    const id = opts.id ?? `g${++n}`;
    const enqueuedAt = opts.enqueuedAt ?? Date.parse('2026-12-02T09:00:00.000Z') + n;
    const d = { ...jobDeps(opts.bucket ?? bucket, conn, staging, { jobId: id, queue: QUEUE, enqueuedAt, ...(opts.signal ? { signal: opts.signal } : {}) }) };
    d.locks = new (opts.neverHolds ? NeverHolds : RedisLocks)(opts.redis ?? conn, { prefix: 'bull', queue: QUEUE, ...(opts.ttlMs ? { ttlMs: opts.ttlMs } : {}) });
    if (opts.log) d.log = opts.log;
    return { id, mark: `${id}@${enqueuedAt}`, enqueuedAt, done: repackSession(parsePayload(RepackPayload, { session: s, ops }), d) };
  };
  const groupKeys = (s: string) => conn.keys(`bull:${QUEUE}:group:session:${s}:*`);
  const gkey = (s: string, part: string) => `bull:${QUEUE}:group:session:${s}:default:${part}`;
  /** Resolves once `count` jobs are in the session's queue (they joined behind the blocker). */
  const queued = (s: string, count: number) => until(`${count} queued jobs`, async () => (await conn.zcard(gkey(s, 'queue'))) >= count);
  /** Resolves once every one of `jobs` is in the session's queue. */
  const inQueue = (s: string, jobs: Array<{ mark: string }>) => until('the jobs to queue', async () => {
    for (const j of jobs) if ((await conn.zscore(gkey(s, 'queue'), j.mark)) === null) return false;
    return true;
  });
  const fileText = (s: string, path: string): Promise<string> => catText(bucket, s, path);

  it('applies every queued edit in one rewrite, in enqueue order, each job with its own result', async () => {
    const s = `octo__repo__batch-${++n}`;
    await job(s, [{ op: 'put', path: 'keep.txt', text: 'keep\n' }, { op: 'put', path: 'old/a.txt', text: 'a' }]).done;
    const lease = await block(s);
    const N = 8;
    const jobs = Array.from({ length: N }, (_, i) => job(s, [
      { op: 'put', path: `edits/${i}.txt`, text: `edit ${i}\n` },
      // Job 3's delete finds what job 2 put: they apply one after the other.
      { op: 'delete', path: i === 3 ? 'edits/2.txt' : `never/${i}` },
      { op: 'put', path: 'last.txt', text: `job ${i}\n` },
    ]));
    await queued(s, N);
    await lease.release();
    const results = await Promise.all(jobs.map((j) => j.done));
    // One rewrite for all: the same archive in every result.
    expect(new Set(results.map((r) => r.sha256)).size).toBe(1);
    expect(results.every((r) => r.batched === N)).toBe(true);
    results.forEach((r, i) => expect(r.missing).toEqual(i === 3 ? [] : [`never/${i}`]));
    const listing = await listSession(bucket, s, { digests: true });
    const files = Object.fromEntries(listing.entries.filter((e) => e.type === 'file').map((e) => [e.path, e.sha256]));
    const expected: Record<string, string> = { 'keep.txt': sha('keep\n'), 'old/a.txt': sha('a'), 'last.txt': sha(`job ${N - 1}\n`) };
    for (let i = 0; i < N; i++) if (i !== 2) expected[`edits/${i}.txt`] = sha(`edit ${i}\n`);
    expect(files).toEqual(expected);
    // Every job's mark, for a redelivered one to find; and nothing left in Redis but outcomes with a TTL.
    const marks = (await bucket.stat(sessionKey(s))).metadata[APPLIED_META]!.split(' ');
    for (const j of jobs) expect(marks).toContain(j.mark);
    const left = await groupKeys(s);
    expect(left.every((k) => k.includes(':outcome:'))).toBe(true);
    for (const k of left) expect(await conn.pttl(k)).toBeGreaterThan(0);
    // A redelivery of a batched job, its outcome expired: its mark is found, nothing is written again.
    await conn.del(...left);
    const again = await job(s, [{ op: 'put', path: 'edits/5.txt', text: 'edit 5\n' }], { id: jobs[5]!.id, enqueuedAt: jobs[5]!.enqueuedAt }).done;
    expect(again).toMatchObject({ sha256: results[0]!.sha256, missing: [] });
    expect((await bucket.stat(sessionKey(s))).sha256).toBe(results[0]!.sha256);
  });

  it('leaves out of the metadata a mark that is no valid mark (control characters, a 485-character id); the others stay', async () => {
    const s = `octo__repo__marks-${++n}`;
    const first = job(s, [{ op: 'put', path: 'a.txt', text: 'a\n' }]);
    await first.done;
    const bell = job(s, [{ op: 'put', path: 'b.txt', text: 'b\n' }], { id: 'bell\u0007id' });
    await bell.done;
    const huge = job(s, [{ op: 'put', path: 'c.txt', text: 'c\n' }], { id: 'h'.repeat(485) });
    await huge.done;
    expect((await listSession(bucket, s)).entries.map((e) => e.path)).toEqual(['a.txt', 'b.txt', 'c.txt']);
    expect((await bucket.stat(sessionKey(s))).metadata[APPLIED_META]).toBe(first.mark);
  });

  it('fails only the job whose ifSha256 does not hold; the rest of its batch commits', async () => {
    const s = `octo__repo__cond-${++n}`;
    await job(s, [{ op: 'put', path: 'shared.txt', text: 'v1\n' }]).done;
    const lease = await block(s);
    const a = job(s, [{ op: 'put', path: 'a.txt', text: 'a\n' }]);
    // Holds for the archive as the jobs before it leave it: a's put does not touch shared.txt.
    const b = job(s, [{ op: 'put', path: 'b.txt', text: 'b\n' }, { op: 'put', path: 'shared.txt', text: 'v2\n', ifSha256: sha('v1\n') }]);
    const bad = job(s, [{ op: 'put', path: 'bad.txt', text: 'bad\n' }, { op: 'put', path: 'shared.txt', text: 'v3\n', ifSha256: sha('v1\n') }], { neverHolds: true });
    const c = job(s, [{ op: 'put', path: 'c.txt', text: 'c\n' }, { op: 'delete', path: 'a.txt' }]);
    await queued(s, 4);
    await lease.release();
    // The bad job comes after b, which changed shared.txt: its condition fails, with its own op's index.
    await expect(bad.done).rejects.toMatchObject({ code: 'PreconditionFailed', message: expect.stringContaining(`ops.1: "shared.txt" has sha256 ${sha('v2\n')}`) });
    const results = await Promise.all([a.done, b.done, c.done]);
    expect(new Set(results.map((r) => r.sha256)).size).toBe(1);
    expect(results.map((r) => [r.batched, r.missing])).toEqual([[3, []], [3, []], [3, []]]);
    const listing = await listSession(bucket, s, { digests: true });
    expect(Object.fromEntries(listing.entries.map((e) => [e.path, e.sha256]))).toEqual({ 'shared.txt': sha('v2\n'), 'b.txt': sha('b\n'), 'c.txt': sha('c\n') });
  });

  it('drops a queued job cancelled after its claim, before the seal; the others commit without it', async () => {
    const s = `octo__repo__cancel-${++n}`;
    await job(s, [{ op: 'put', path: 'base.txt', text: 'base\n' }]).done;
    const lease = await block(s);
    const stop = new AbortController();
    const cancelled = job(s, [{ op: 'put', path: 'cancelled.txt', text: 'no\n' }], { signal: stop.signal, neverHolds: true });
    // The holder's first call naming the cancelled job (its seal) waits until the job has withdrawn:
    // the cancel lands between claim and seal whatever the machine's speed.
    let gate = true;
    const gated = wrapCalls(conn, ['eval'], async (call, a) => {
      if (gate && a.includes(cancelled.mark)) {
        gate = false;
        await until('the cancelled job to withdraw', async () => (await conn.hexists(gkey(s, 'withdrawn'), cancelled.mark)) === 1);
      }
      return call();
    });
    const a = job(s, [{ op: 'put', path: 'a.txt', text: 'a\n' }], { redis: gated, log: onLog('applying a batch of queued repacks under the session lock', () => stop.abort(new Error('Cancelled: the job was cancelled by a request'))) });
    await queued(s, 2);
    const withdrew = expect(cancelled.done).rejects.toMatchObject({ code: 'Transient', message: expect.stringContaining('aborted') });
    await lease.release();
    await withdrew;
    const result = await a.done;
    expect(result.batched).toBeUndefined();
    expect((await listSession(bucket, s)).entries.map((e) => e.path).sort()).toEqual(['a.txt', 'base.txt']);
    expect(await groupKeys(s).then((ks) => ks.filter((k) => !k.includes(':outcome:')))).toEqual([]);
  });

  it('judges the jobs after a job that leaves before the seal again: one that failed because of it commits, one that needed it fails', async () => {
    const s = `octo__repo__rejudge-${++n}`;
    await job(s, [{ op: 'put', path: 'y.txt', text: 'y0\n' }]).done;
    const lease = await block(s);
    const stop = new AbortController();
    // a changes y.txt, puts x.txt and makes d a directory; it is cancelled once the holder has judged the others with it.
    const a = job(s, [{ op: 'put', path: 'y.txt', text: 'a\n' }, { op: 'put', path: 'x.txt', text: 'a\n' }, { op: 'put', path: 'd/f.txt', text: 'f\n' }], { signal: stop.signal, neverHolds: true });
    const needs = job(s, [{ op: 'put', path: 'x.txt', text: 'needs\n', ifSha256: sha('a\n') }], { neverHolds: true });
    const dir = job(s, [{ op: 'put', path: 'd', text: 'a file\n' }], { neverHolds: true });
    const cond = job(s, [{ op: 'put', path: 'y.txt', text: 'cond\n', ifSha256: sha('y0\n') }], { neverHolds: true });
    // The holder's first call naming a (its seal, after the passes that failed dir and cond) waits until a has withdrawn.
    let gate = true;
    const gated = wrapCalls(conn, ['eval'], async (call, args) => {
      if (gate && args.includes(a.mark)) {
        gate = false;
        await until('a to withdraw', async () => (await conn.hexists(gkey(s, 'withdrawn'), a.mark)) === 1);
      }
      return call();
    });
    const h = job(s, [{ op: 'put', path: 'h.txt', text: 'h\n' }], { redis: gated, log: onLog('applying a batch of queued repacks under the session lock', () => stop.abort(new Error('Cancelled: the job was cancelled by a request'))) });
    await queued(s, 5);
    const withdrew = expect(a.done).rejects.toMatchObject({ code: 'Transient', message: expect.stringContaining('aborted') });
    await lease.release();
    await withdrew;
    // Without a, x.txt is not there: the condition that held after a no longer does.
    await expect(needs.done).rejects.toMatchObject({ code: 'PreconditionFailed', message: expect.stringContaining('ops.0: "x.txt" is not a regular file in the session') });
    const results = await Promise.all([dir.done, cond.done, h.done]);
    expect(results.map((r) => r.batched)).toEqual([3, 3, 3]);
    expect(new Set(results.map((r) => r.sha256)).size).toBe(1);
    const listing = await listSession(bucket, s, { digests: true });
    expect(Object.fromEntries(listing.entries.map((e) => [e.path, e.sha256]))).toEqual({ 'y.txt': sha('cond\n'), d: sha('a file\n'), 'h.txt': sha('h\n') });
  });

  it('judges the jobs after a job that fails on its own in a later pass again (its staged file gone): one that failed because of it commits', async () => {
    const s = `octo__repo__rejudge-own-${++n}`;
    await job(s, [{ op: 'put', path: 'y.txt', text: 'y0\n' }]).done;
    await writeFile(join(staging, `a-${s}`), 'a staged\n');
    const lease = await block(s);
    // a's staged x.txt is read only once c, whose put of x.txt comes last, has left the batch.
    const a = job(s, [{ op: 'put', path: 'y.txt', text: 'a\n' }, { op: 'put', path: 'x.txt', source: { path: `a-${s}` } }], { neverHolds: true });
    const b = job(s, [{ op: 'put', path: 'y.txt', text: 'b\n', ifSha256: sha('y0\n') }], { neverHolds: true });
    const c = job(s, [{ op: 'put', path: 'x.txt', text: 'c\n' }, { op: 'put', path: 'z.txt', text: 'c\n', ifSha256: sha('no such content') }], { neverHolds: true });
    await queued(s, 3);
    const h = job(s, [{ op: 'put', path: 'h.txt', text: 'h\n' }], { log: onLog('applying a batch of queued repacks under the session lock', () => rmSync(join(staging, `a-${s}`))) });
    await queued(s, 4);
    await lease.release();
    await Promise.all([
      expect(a.done).rejects.toMatchObject({ code: 'NotFound', message: expect.stringContaining('ops.1: its staged file cannot be read (ENOENT)') }),
      expect(c.done).rejects.toMatchObject({ code: 'PreconditionFailed', message: expect.stringContaining('ops.1: "z.txt" is not a regular file in the session') }),
    ]);
    const results = await Promise.all([b.done, h.done]);
    expect(results.map((r) => r.batched)).toEqual([2, 2]);
    const listing = await listSession(bucket, s, { digests: true });
    expect(Object.fromEntries(listing.entries.map((e) => [e.path, e.sha256]))).toEqual({ 'y.txt': sha('b\n'), 'h.txt': sha('h\n') });
  });

  it('blames the job whose put meets a directory a job before it made, not the batch', async () => {
    const s = `octo__repo__blame-dir-${++n}`;
    await job(s, [{ op: 'put', path: 'f', text: 'a file\n' }]).done;
    const lease = await block(s);
    const a = job(s, [{ op: 'put', path: 'd/f.txt', text: 'f\n' }], { neverHolds: true });
    const dir = job(s, [{ op: 'put', path: 'ok.txt', text: 'ok\n' }, { op: 'put', path: 'd', text: 'a file\n' }], { neverHolds: true });
    const under = job(s, [{ op: 'put', path: 'f/under.txt', text: 'u\n' }], { neverHolds: true });
    await queued(s, 3);
    const h = job(s, [{ op: 'put', path: 'h.txt', text: 'h\n' }]);
    await queued(s, 4);
    await lease.release();
    await Promise.all([
      expect(dir.done).rejects.toMatchObject({ code: 'InvalidInput', message: expect.stringContaining('ops.1: "d" is a directory in the session') }),
      expect(under.done).rejects.toMatchObject({ code: 'InvalidInput', message: expect.stringContaining('ops.0: "f" is a file in the session') }),
    ]);
    const results = await Promise.all([a.done, h.done]);
    expect(results.map((r) => r.batched)).toEqual([2, 2]);
    expect((await listSession(bucket, s)).entries.map((e) => e.path).sort()).toEqual(['d', 'd/f.txt', 'f', 'h.txt']);
  });

  it('judges the failures again when the archive they were judged on is replaced before the commit (a writer without the lock)', async () => {
    const s = `octo__repo__rebase-${++n}`;
    const other = `octo__repo__rebase-v2-${n}`;
    await job(s, [{ op: 'put', path: 'y.txt', text: 'y0\n' }]).done;
    await job(other, [{ op: 'put', path: 'y.txt', text: 'y1\n' }]).done;
    // Between the holder's first pass (b fails on y0) and its second, y.txt becomes y1 under it.
    class ReplacedUnder extends Bucket {
      stats = 0;
      override async stat(...args: Parameters<Bucket['stat']>): ReturnType<Bucket['stat']> {
        if (args[0] === sessionKey(s) && ++this.stats === 2) await super.copy(sessionKey(other), sessionKey(s));
        return super.stat(...args);
      }
    }
    const replacing = new ReplacedUnder(new FsDriver({ root }), { name: 'default' });
    const lease = await block(s);
    const b = job(s, [{ op: 'put', path: 'y.txt', text: 'b\n', ifSha256: sha('y1\n') }], { neverHolds: true });
    await queued(s, 1);
    const h = job(s, [{ op: 'put', path: 'h.txt', text: 'h\n' }], { bucket: replacing });
    await queued(s, 2);
    await lease.release();
    const [rb, rh] = await Promise.all([b.done, h.done]);
    expect([rb.batched, rh.batched]).toEqual([2, 2]);
    expect(replacing.stats).toBeGreaterThanOrEqual(3);
    const listing = await listSession(bucket, s, { digests: true });
    expect(Object.fromEntries(listing.entries.map((e) => [e.path, e.sha256]))).toEqual({ 'y.txt': sha('b\n'), 'h.txt': sha('h\n') });
  });

  it('finds a batch\'s failures in job order, though the archive meets them in reverse: no job is judged twice', async () => {
    const s = `octo__repo__order-${++n}`;
    const J = 6;
    // The archive holds d5/ first, d0/ last; job i puts a file onto d<i>.
    await job(s, Array.from({ length: J }, (_, i) => ({ op: 'put', path: `d${J - 1 - i}/x.txt`, text: 'x\n' }))).done;
    const lease = await block(s);
    const js = Array.from({ length: J }, (_, i) => job(s, [{ op: 'put', path: `ok${i}.txt`, text: 'ok\n' }, { op: 'put', path: `d${i}`, text: 'onto a dir\n' }], { neverHolds: true }));
    await queued(s, J);
    let again = 0;
    const h = job(s, [{ op: 'put', path: 'h.txt', text: 'h\n' }], { log: onLog('jobs judged with a job that left the batch (or on an archive since replaced) are judged again', () => { again++; }) });
    await queued(s, J + 1);
    await lease.release();
    await Promise.all(js.map((j, i) => expect(j.done).rejects.toMatchObject({ code: 'InvalidInput', message: expect.stringContaining(`ops.1: "d${i}" is a directory in the session`) })));
    expect((await h.done).batched).toBeUndefined();
    expect(again).toBe(0);
    expect((await listSession(bucket, s)).entries.filter((e) => e.type === 'file').map((e) => e.path).sort()).toEqual([...Array.from({ length: J }, (_, i) => `d${i}/x.txt`), 'h.txt'].sort());
  });

  it('a holder cancelled right after its seal still commits its batch (its put is stopped only by a lost lease)', async () => {
    const s = `octo__repo__sealcancel-${++n}`;
    await job(s, [{ op: 'put', path: 'base.txt', text: 'base\n' }]).done;
    const lease = await block(s);
    const other = job(s, [{ op: 'put', path: 'other.txt', text: 'o\n' }], { neverHolds: true });
    await queued(s, 1);
    const stop = new AbortController();
    // The cancel lands as the holder's seal returns, before the put's last bytes are released.
    const gated = wrapCalls(conn, ['eval'], async (call, a) => {
      const out = await call();
      if (typeof a[0] === 'string' && a[0].includes("redis.call('hset', KEYS[5], ARGV[i], ARGV[1])")) stop.abort(new Error('Cancelled: the job was cancelled by a request'));
      return out;
    });
    const holder = job(s, [{ op: 'put', path: 'holder.txt', text: 'h\n' }], { redis: gated, signal: stop.signal });
    await queued(s, 2);
    await lease.release();
    const [h, o] = await Promise.all([holder.done, other.done]);
    expect(stop.signal.aborted).toBe(true);
    expect(h.batched).toBe(2);
    expect(o.sha256).toBe(h.sha256);
    expect((await listSession(bucket, s)).entries.map((e) => e.path).sort()).toEqual(['base.txt', 'holder.txt', 'other.txt']);
    expect(await groupKeys(s).then((ks) => ks.filter((k) => !k.includes(':outcome:')))).toEqual([]);
  });

  it('a job cancelled while sealed by a holder that died uncommitted settles under the lock: it leaves the group, no later holder applies it', async () => {
    const s = `octo__repo__unsurecancel-${++n}`;
    await job(s, [{ op: 'put', path: 'base.txt', text: 'base\n' }]).done;
    const stop = new AbortController();
    const c = job(s, [{ op: 'put', path: 'cancelled.txt', text: 'no\n' }], { neverHolds: true, signal: stop.signal });
    await queued(s, 1);
    // A holder that claims and seals c, then goes without committing.
    const lockName = sessionLockName(s);
    const groupName = `session:${s}:default`;
    const joined = await locks().group.join(lockName, groupName, { id: 'h@1', score: 1, data: '{}' }, new AbortController().signal);
    if (!('holder' in joined)) throw new Error('the fake holder did not get the lock');
    const got = await joined.holder.claim(32);
    if ('outcome' in got) throw new Error('unexpected outcome');
    expect(got.members.map((m) => m.id).sort()).toEqual([c.mark, 'h@1'].sort());
    expect(await joined.holder.seal([c.mark, 'h@1'])).toEqual([]);
    stop.abort(new Error('Cancelled: the job was cancelled by a request'));
    const settled = expect(c.done).rejects.toMatchObject({ code: 'Transient', message: expect.stringContaining('went away') });
    holds.allowed = true;
    await joined.holder.lease.release();
    await settled;
    expect(await conn.zscore(gkey(s, 'queue'), c.mark)).toBeNull();
    expect(await conn.hget(gkey(s, 'sealed'), c.mark)).toBeNull();
    const lease = await block(s);
    await locks().group.forget(lockName, groupName, 'h@1');
    await lease.release();
    await job(s, [{ op: 'put', path: 'later.txt', text: 'l\n' }]).done;
    expect((await listSession(bucket, s)).entries.map((e) => e.path).sort()).toEqual(['base.txt', 'later.txt']);
  });

  it('a whole-session write settles the jobs a dead holder sealed first: a committed one keeps its outcome past a delete, an uncommitted one leaves', async () => {
    const s = `octo__repo__wholesettle-${++n}`;
    // done: committed, its mark in the archive; its holder "died" before recording its outcome.
    const done = job(s, [{ op: 'put', path: 'done.txt', text: 'd\n' }]);
    await done.done;
    await conn.del(...await groupKeys(s));
    const lockName = sessionLockName(s);
    const groupName = `session:${s}:default`;
    const stop = new AbortController();
    const open = job(s, [{ op: 'put', path: 'open.txt', text: 'o\n' }], { neverHolds: true, signal: stop.signal });
    const openEnded = open.done.catch(() => undefined);
    await queued(s, 1);
    const joined = await locks().group.join(lockName, groupName, { id: done.mark, score: done.enqueuedAt, data: '{}' }, new AbortController().signal);
    if (!('holder' in joined)) throw new Error('the fake holder did not get the lock');
    const got = await joined.holder.claim(32);
    if ('outcome' in got) throw new Error('unexpected outcome');
    expect(await joined.holder.seal([done.mark, open.mark])).toEqual([]);
    await joined.holder.lease.release();
    expect((await locks().group.sealedOrphans(lockName, groupName)).sort()).toEqual([done.mark, open.mark].sort());
    // The HTTP delete's steps: under the lock, settle, then delete.
    const lease = await block(s);
    await settleSealed(bucket, s, locks());
    await bucket.delete(sessionKey(s));
    await lease.release();
    expect(await locks().group.sealedOrphans(lockName, groupName)).toEqual([]);
    // The uncommitted job is still a live job (it may queue again while it waits): cancelled, it leaves nothing.
    stop.abort(new Error('Cancelled'));
    await openEnded;
    expect(await conn.zcard(gkey(s, 'queue'))).toBe(0);
    // done redelivered: its outcome is there, the session does not come back.
    holds.allowed = true;
    const again = await job(s, [{ op: 'put', path: 'done.txt', text: 'd\n' }], { id: done.id, enqueuedAt: done.enqueuedAt }).done;
    expect(again.entries).toBe(1);
    await expect(bucket.stat(sessionKey(s))).rejects.toMatchObject({ code: 'NotFound' });
  });

  it('a job failing on its own staged file (gone) fails alone', async () => {
    const s = `octo__repo__staged-${++n}`;
    await writeFile(join(staging, `one-${s}`), 'one\n');
    await writeFile(join(staging, `gone-${s}`), 'gone\n');
    const lease = await block(s);
    const one = job(s, [{ op: 'put', path: 'one.txt', source: { path: `one-${s}` } }]);
    const gone = job(s, [{ op: 'put', path: 'gone.txt', source: { path: `gone-${s}` } }], { neverHolds: true });
    await queued(s, 2);
    await run('rm', [join(staging, `gone-${s}`)]);
    await lease.release();
    await expect(gone.done).rejects.toMatchObject({ code: 'NotFound', message: expect.stringContaining('ops.0.source.path') });
    expect((await one.done).missing).toEqual([]);
    expect((await listSession(bucket, s)).entries.map((e) => e.path)).toEqual(['one.txt']);
  });
  it('a job whose staged file goes after the holder checked it fails alone, naming its own op; the rest commits', async () => {
    const s = `octo__repo__unread-${++n}`;
    for (const f of ['one', 'gone', 'hashed']) await writeFile(join(staging, `${f}-${s}`), `${f}\n`);
    const lease = await block(s);
    const gone = job(s, [{ op: 'put', path: 'keep.txt', text: 'k\n' }, { op: 'put', path: 'gone.txt', source: { path: `gone-${s}` } }], { neverHolds: true });
    // Its condition hashes the staged file of its first put.
    const hashed = job(s, [{ op: 'put', path: 'h.txt', source: { path: `hashed-${s}` } }, { op: 'put', path: 'h.txt', text: 'h2\n', ifSha256: sha('hashed\n') }], { neverHolds: true });
    await queued(s, 2);
    // The files go once the holder has checked them (its batch is made), before its rewrite reads them.
    const drop = (): void => { for (const f of ['gone', 'hashed']) rmSync(join(staging, `${f}-${s}`), { force: true }); };
    const one = job(s, [{ op: 'put', path: 'one.txt', source: { path: `one-${s}` } }], { log: onLog('applying a batch of queued repacks under the session lock', drop) });
    await queued(s, 3);
    await lease.release();
    await Promise.all([
      expect(gone.done).rejects.toMatchObject({ code: 'NotFound', message: expect.stringContaining('ops.1: its staged file cannot be read (ENOENT)') }),
      expect(hashed.done).rejects.toMatchObject({ code: 'NotFound', message: expect.stringContaining('ops.0: its staged file cannot be read (ENOENT)') }),
    ]);
    expect((await one.done).missing).toEqual([]);
    expect((await listSession(bucket, s)).entries.map((e) => e.path)).toEqual(['one.txt']);
  });

  it('a staged file swapped for a directory fails its job with its own code (not NotFound); the rest commits', async () => {
    const s = `octo__repo__isdir-${++n}`;
    for (const f of ['one', 'dir']) await writeFile(join(staging, `${f}-${s}`), `${f}\n`);
    const lease = await block(s);
    const dir = job(s, [{ op: 'put', path: 'dir.txt', source: { path: `dir-${s}` } }], { neverHolds: true });
    await queued(s, 1);
    const swap = (): void => { rmSync(join(staging, `dir-${s}`)); mkdirSync(join(staging, `dir-${s}`)); };
    const one = job(s, [{ op: 'put', path: 'one.txt', source: { path: `one-${s}` } }], { log: onLog('applying a batch of queued repacks under the session lock', swap) });
    await queued(s, 2);
    await lease.release();
    await expect(dir.done).rejects.toMatchObject({ code: 'InvalidInput', message: expect.stringContaining('ops.0: its staged file cannot be read (EISDIR)') });
    expect((await one.done).missing).toEqual([]);
    expect((await listSession(bucket, s)).entries.map((e) => e.path)).toEqual(['one.txt']);
  });

  it('segment edits of a batch blame the job whose op failed (its index in the whole plan, not in its segment group)', async () => {
    const s = `octo__repo__segblame-${++n}`;
    // x spans segments of its own (over SEGMENT_MAX), so y is in another dirty group than x.
    await writeFile(join(staging, `x-${s}`), randomBytes(1536 * 1024));
    await job(s, [{ op: 'put', path: 'x.bin', source: { path: `x-${s}` } }, { op: 'put', path: 'y.txt', text: 'y1\n' }]).done;
    await writeFile(join(staging, `y-${s}`), 'y2\n');
    const lease = await block(s);
    const a = job(s, [{ op: 'put', path: 'x.bin', text: 'x2\n' }], { neverHolds: true });
    const b = job(s, [{ op: 'put', path: 'y.txt', source: { path: `y-${s}` } }], { neverHolds: true });
    await queued(s, 2);
    let segments = 0;
    const drop = (): void => rmSync(join(staging, `y-${s}`));
    const log = pino({ level: 'info', hooks: { logMethod(args, method) {
      if ((args as unknown[]).includes('applying a batch of queued repacks under the session lock')) drop();
      if ((args as unknown[]).includes('session segments copied and compressed')) segments++;
      method.apply(this, args);
    } } }, { write() {} });
    const holder = job(s, [], { log });
    await queued(s, 3);
    await lease.release();
    await expect(b.done).rejects.toMatchObject({ code: 'NotFound', message: expect.stringContaining('ops.0: its staged file cannot be read (ENOENT)') });
    expect((await a.done).batched).toBe(2);
    await holder.done;
    expect(segments).toBeGreaterThan(0);
    expect(await fileText(s, 'x.bin')).toBe('x2\n');
    expect(await fileText(s, 'y.txt')).toBe('y1\n');
  });

  it('maps a staged file error: gone is NotFound for that op, a passing one (EMFILE, EIO) Transient for the pass, not the op', () => {
    const errno = (code: string) => Object.assign(new Error(code), { code });
    for (const code of ['ENOENT', 'ENOTDIR', 'ELOOP']) expect(stagedFailed(errno(code), 2)).toMatchObject({ code: 'NotFound', index: 2 });
    expect(stagedFailed(errno('EACCES'), 1)).toMatchObject({ code: 'PermissionDenied', index: 1 });
    for (const code of ['EMFILE', 'EIO']) {
      const e = stagedFailed(errno(code), 3);
      expect(e).toBeInstanceOf(StorageError);
      expect(e).not.toBeInstanceOf(OpFailed);
      expect(e).toMatchObject({ code: 'Transient', message: expect.stringContaining(`ops.3: its staged file cannot be read (${code})`) });
    }
  });

  it("gives each put its own job's enqueue time as mtime, in a batch too", async () => {
    const s = `octo__repo__mtime-${++n}`;
    const t0 = Date.parse('2026-11-30T08:00:00.000Z');
    const lease = await block(s);
    const a = job(s, [{ op: 'put', path: 'a.txt', text: 'a\n' }], { enqueuedAt: t0 });
    const b = job(s, [{ op: 'put', path: 'b/new.txt', text: 'b\n' }], { enqueuedAt: t0 + 5000, neverHolds: true });
    await queued(s, 2);
    await lease.release();
    const [ra, rb] = await Promise.all([a.done, b.done]);
    expect([ra.batched, rb.sha256]).toEqual([2, ra.sha256]);
    const mtimes = Object.fromEntries((await listSession(bucket, s)).entries.map((e) => [e.path, e.mtime]));
    const at = (ms: number): string => new Date(ms).toISOString();
    expect(mtimes).toEqual({ 'a.txt': at(t0), b: at(t0 + 5000), 'b/new.txt': at(t0 + 5000) });
  });

  it('applies a queue longer than one batch in batches of its arrival-order prefix; the holder, newest, waits its turn', async () => {
    const s = `octo__repo__prefix-${++n}`;
    const t0 = Date.parse('2026-12-01T10:00:00.000Z');
    const lease = await block(s);
    const J = 13;
    const js = Array.from({ length: J }, (_, i) => job(s, [{ op: 'put', path: `j/${i}.txt`, text: `${i}\n` }, { op: 'put', path: 'shared.txt', text: `job ${i}\n` }], { id: long('j', i), enqueuedAt: t0 + i, neverHolds: true }));
    await queued(s, J);
    const h = job(s, [{ op: 'put', path: 'shared.txt', text: 'holder\n' }], { id: long('h', 0), enqueuedAt: t0 + J });
    await queued(s, J + 1);
    await lease.release();
    const results = await Promise.all([...js, h].map((j) => j.done));
    // A batch's marks stay within half the metadata list: 6 of these a batch, then the 13th with the holder.
    expect(results.map((r) => r.batched)).toEqual([...Array<number>(12).fill(6), 2, 2]);
    expect(new Set(results.map((r) => r.sha256)).size).toBe(3);
    expect(await fileText(s, 'shared.txt')).toBe('holder\n');
  });

  /**
   * A batch (its holder H and four queued jobs A, each writing shared.txt) fails as `how` says:
   * its holder's Redis dies before its commit or right after it (before it records the outcomes;
   * its lock then expires), or its put commits and then fails (a lost reply). Then older jobs B (a
   * retried job keeps its first enqueue time) come, enough to fill a whole metadata list of marks.
   * Every job must apply once: a job of H's batch applied a second time, after a B, would put
   * shared.txt back to its own content.
   */
  const eachOnce = async (how: 'dies before its commit' | 'dies after its commit' | 'reply lost'): Promise<void> => {
    const s = `octo__repo__orphans-${++n}`;
    const t0 = Date.parse('2026-12-01T12:00:00.000Z');
    await job(s, [{ op: 'put', path: 'shared.txt', text: 'base\n' }]).done;
    const lease = await block(s);
    const ops = (tag: string) => [{ op: 'put', path: `${tag}.txt`, text: `${tag}\n` }, { op: 'put', path: 'shared.txt', text: `${tag}\n` }];
    // a0 brings a staged file, which goes once H's batch is over (as a producer cleans up after a job it thinks done).
    const staged = join(staging, `a0-${s}`);
    await writeFile(staged, 'a0 staged\n');
    const a0 = [{ op: 'put', path: 'a0-staged.txt', source: { path: `a0-${s}` } }, ...ops('a0')];
    const as = Array.from({ length: 4 }, (_, i) => job(s, i === 0 ? a0 : ops(`a${i}`), { id: long('a', i), enqueuedAt: t0 + 100 + i, neverHolds: true }));
    await queued(s, 4);
    const worker = killable(conn);
    const hOpts = { id: long('h', 0), enqueuedAt: t0 + 99 };
    const dies = (msg: string) => ({ ...hOpts, redis: worker.redis, ttlMs: 1000, log: onLog(msg, () => worker.kill()) });
    const h = how === 'reply lost'
      ? job(s, ops('h'), { ...hOpts, bucket: new ReplyLost(new FsDriver({ root }), { name: 'default' }) })
      : job(s, ops('h'), dies(how === 'dies after its commit' ? 'session repacked' : 'applying a batch of queued repacks under the session lock'));
    const hEnded = h.done.then(() => 'done', (err: unknown) => (err instanceof Error ? err.message : String(err)));
    await queued(s, 5);
    await lease.release();
    if (how === 'reply lost') expect(await hEnded).toContain('injected');
    else await until('the holder to die', async () => worker.dead);
    // Before its commit: its seal never reached Redis, so nothing committed.
    if (how === 'dies before its commit') expect(await hEnded).not.toBe('done');
    expect(await fileText(s, 'shared.txt')).toBe(how === 'dies before its commit' ? 'base\n' : 'a3\n');
    // Committed: a0 is settled by its mark though its staged file is gone.
    if (how !== 'dies before its commit') rmSync(staged);
    const bs = Array.from({ length: 12 }, (_, i) => job(s, ops(`b${i + 1}`), { id: long('b', i + 1), enqueuedAt: t0 + i + 1, neverHolds: true }));
    await inQueue(s, bs);
    await job(s, ops('b0'), { id: long('b', 0), enqueuedAt: t0 }).done;
    holds.allowed = true;
    const results = await Promise.all([...as, ...bs].map((j) => j.done));
    expect(results.every((r) => r.key === sessionKey(s))).toBe(true);
    await hEnded;
    // Settled by their marks, H's batch is never applied again: the last job in order stays last.
    expect(await fileText(s, 'shared.txt')).toBe(how === 'dies before its commit' ? 'a3\n' : 'b12\n');
    const files = (await listSession(bucket, s)).entries.map((e) => e.path);
    for (const tag of ['h', 'a0', 'a0-staged', 'a3', 'b0', 'b12']) expect(files).toContain(`${tag}.txt`);
    // H's job, redelivered, meets its outcome and writes nothing.
    const before = (await bucket.stat(sessionKey(s))).sha256;
    await job(s, ops('h'), hOpts).done;
    expect((await bucket.stat(sessionKey(s))).sha256).toBe(before);
  };
  it('a holder that dies before its commit: its batch waits again in its place and each job applies once', () => eachOnce('dies before its commit'));
  it('a holder that dies after its commit: its batch is settled by its marks before any later batch, each job applied once', () => eachOnce('dies after its commit'));
  it('a holder whose put fails after its last byte (it may have committed): its sealed jobs are never given back, each applied once', () => eachOnce('reply lost'));
});

describe('repack-session group commit across worker processes', () => {
  let redis: TestRedis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let root: string;
  let stagingDir: string;
  const clients: StevedoreClient[] = [];
  const spawned: WorkerProcess[] = [];

  beforeAll(async () => {
    [redis, tmp] = await Promise.all([startRedis(), tempDir('stevedore-group-proc-')]);
    root = join(tmp.path, 'objects');
    stagingDir = join(tmp.path, 'staging');
    await mkdir(stagingDir, { recursive: true });
  });
  afterEach(async (ctx) => {
    printWorkersOnFailure(ctx, spawned);
    await stopAllWorkers();
    await Promise.all(clients.splice(0).map((c) => c.close().catch(() => {})));
  });
  afterAll(async () => {
    await stopAllWorkers();
    await redis?.stop();
    await tmp?.remove();
  });

  const setup = async (workers: number, extra: Record<string, string> = {}) => {
    const queue = `group-${randomUUID().slice(0, 8)}`;
    const client = new StevedoreClient({ redisUrl: redis.url, queue, defaultJobOptions: { backoff: { type: 'exponential', delay: 100, jitter: 0.5 }, attempts: 8 } });
    clients.push(client);
    const env = { REDIS_URL: redis.url, STEVEDORE_QUEUE: queue, STEVEDORE_STAGING_DIR: stagingDir, STEVEDORE_BACKENDS: `default=file://${root}`, STEVEDORE_CONCURRENCY: SOAK ? '10' : '4', ...extra };
    const ws = await Promise.all(Array.from({ length: workers }, () => spawnWorker(env)));
    spawned.push(...ws);
    return { client, env, ws, queue };
  };
  const bucket = () => new Bucket(new FsDriver({ root }));
  const results = async (client: StevedoreClient, ids: string[]) => Promise.all(ids.map((id) => client.result<'repack-session'>(id, { timeoutMs: 120_000 })));

  it(`${SOAK ? 30 : 12} concurrent repacks of one session by ${SOAK ? 3 : 2} processes: every edit, fewer commits than jobs`, async () => {
    const edits = SOAK ? 30 : 12;
    const { client, ws } = await setup(SOAK ? 3 : 2);
    const session = 'octo__repo__group-race';
    await writeFile(join(stagingDir, 'bulk'), randomBytes(2 << 20));
    await client.run('repack-session', { session, ops: [{ op: 'put', path: 'bulk.bin', source: { path: 'bulk' } }] }, { timeoutMs: 60_000 });
    const ids = await Promise.all(Array.from({ length: edits }, (_, i) => client.repackSession({ session, ops: [{ op: 'put', path: `edits/${i}.txt`, text: `edit ${i}\n` }, { op: 'delete', path: `never/${i}` }] })));
    const got = await results(client, ids);
    got.forEach((r, i) => expect(r.missing).toEqual([`never/${i}`]));
    // Each distinct archive in the results is one commit.
    const commits = new Set(got.map((r) => r.sha256)).size;
    expect(commits).toBeLessThan(edits);
    expect(got.some((r) => (r.batched ?? 1) > 1)).toBe(true);
    const jobs = await Promise.all(ids.map((id) => client.getJob(id)));
    expect(new Set(jobs.map((j) => j?.processedBy)).size).toBe(ws.length);
    const b = bucket();
    const listing = await listSession(b, session);
    expect(listing.entries.filter((e) => e.path.startsWith('edits/') && e.type === 'file').map((e) => e.path).sort()).toEqual(Array.from({ length: edits }, (_, i) => `edits/${i}.txt`).sort());
    await b.close();
  });

  it('a batch holder killed mid-rewrite: every queued edit lands once, after the others take over', async () => {
    // Short job and session locks, so the killed worker's jobs come back in seconds.
    const { client, env, ws } = await setup(2, { STEVEDORE_LOCK_DURATION_MS: '3000', STEVEDORE_STALLED_INTERVAL_MS: '1000' });
    const session = 'octo__repo__group-killed';
    await writeFile(join(stagingDir, 'huge'), randomBytes(8 << 20));
    await client.run('repack-session', { session, ops: [{ op: 'put', path: 'huge.bin', source: { path: 'huge' } }] }, { timeoutMs: 90_000 });
    // A blocker holds the session's lock (as a whole-session write would) while the jobs queue up behind it.
    const conn = redisConnection(redis.url, 'worker');
    const blocker = await new RedisLocks(conn, { prefix: 'bull', queue: env.STEVEDORE_QUEUE }).acquire(sessionLockName(session), new AbortController().signal);
    const edits = 6;
    // Each job also writes log.txt: a job applied again after a later one would leave its own line there.
    const ids = await Promise.all(Array.from({ length: edits }, (_, i) => client.repackSession({ session, ops: [{ op: 'put', path: `edits/${i}.txt`, text: `edit ${i}\n` }, { op: 'put', path: 'log.txt', text: `job ${i}\n` }] })));
    await until('every job to queue', async () => (await conn.zcard(`bull:${env.STEVEDORE_QUEUE}:group:session:${session}:default:queue`)) >= edits);
    await blocker.release();
    const batch = (w: WorkerProcess) => w.logs().find((l) => l.msg === 'applying a batch of queued repacks under the session lock' && (l.jobs as string[]).some((m) => m.startsWith(`${ids[0]}@`)));
    const holder = await until('a holder to start its batch', async () => ws.find((w) => batch(w)), 30_000, 5);
    expect((batch(holder)!.jobs as string[]).length).toBe(edits);
    // Killed during its batch; whether before or after its commit, each edit must land once.
    holder.kill('SIGKILL');
    await holder.exited;
    // A fresh worker for the killed one's jobs (redelivered once the stalled check sees them).
    spawned.push(await spawnWorker(env));
    const got = await results(client, ids);
    // Applied once: each job in one commit at most (the commits every worker logged, the killed one's
    // too; one it made without logging is found by its marks and applied by none), and log.txt holds
    // the line of the last job of the last commit.
    const commits = spawned.flatMap((w) => w.logs()).filter((l) => l.msg === 'session repacked' && Array.isArray(l.jobs) && (l.jobs as string[]).some((m) => ids.some((id) => m.startsWith(`${id}@`))));
    const applied = commits.flatMap((l) => l.jobs as string[]);
    expect(applied.length).toBe(new Set(applied).size);
    const lastCommit = commits.sort((x, y) => Number(x.time) - Number(y.time)).at(-1)!.jobs as string[];
    const last = ids.findIndex((id) => lastCommit.at(-1)!.startsWith(`${id}@`));
    const b = bucket();
    const listing = await listSession(b, session, { digests: true });
    expect(listing.entries.filter((e) => e.path.startsWith('edits/')).map((e) => [e.path, e.sha256]).sort()).toEqual(Array.from({ length: edits }, (_, i) => [`edits/${i}.txt`, sha(`edit ${i}\n`)]).sort());
    expect(listing.entries.find((e) => e.path === 'log.txt')?.sha256).toBe(sha(`job ${last}\n`));
    expect(listing.entries.find((e) => e.path === 'huge.bin')?.size).toBe(8 << 20);
    const marks = (await b.stat(sessionKey(session))).metadata[APPLIED_META]!.split(' ');
    for (const id of ids) expect(marks.filter((m) => m.startsWith(`${id}@`))).toHaveLength(1);
    expect(got.every((r) => r.key === sessionKey(session) && r.missing.length === 0)).toBe(true);
    await run('gzip', ['-t', join(root, sessionKey(session))]);
    await b.close();
    await conn.quit();
  });
});

describe('group commit in Redis (RedisGroupCommit on a real Redis)', () => {
  let redis: TestRedis;
  let conn: Redis;
  let n = 0;
  const Q = 'group-proto';

  beforeAll(async () => {
    redis = await startRedis();
    conn = redisConnection(redis.url, 'worker');
  });
  afterAll(async () => {
    await conn?.quit();
    await redis?.stop();
  });

  const opts = (o: { ttlMs?: number; waitMs?: number } = {}) => ({ prefix: 'bull', queue: Q, ...o });
  const member = (id: string, score: number) => ({ id, score, data: JSON.stringify({ id }) });
  const key = (group: string, part: string): string => `bull:${Q}:group:${group}:${part}`;
  const names = (): { lock: string; group: string } => ({ lock: `l${++n}`, group: `g${n}` });
  const never = (o: { ttlMs?: number; waitMs?: number } = {}, r: Redis = conn) => new NeverHolds(r, opts(o)).group;
  const holderOf = async (locks: RedisLocks, lock: string, group: string, id: string, score: number): Promise<GroupHolder> => {
    const joined = await locks.group.join(lock, group, member(id, score), new AbortController().signal);
    if (!('holder' in joined)) throw new Error(`${id} did not get the lock`);
    return joined.holder;
  };
  const claimed = async (h: GroupHolder, max = 32) => {
    const got = await h.claim(max);
    if ('outcome' in got) throw new Error('the holder met its own outcome');
    return got.members;
  };
  const queuedIds = (group: string) => conn.zrange(key(group, 'queue'), '0', '-1');
  const waitQueued = (group: string, ids: string[]) => until(`${ids.join(', ')} to queue`, async () => {
    const q = await queuedIds(group);
    return ids.every((id) => q.includes(id));
  });
  /** Resolves once `id` has not polled for `ms` (Redis time). */
  const quietFor = (group: string, id: string, ms: number) => until(`${id} to go quiet`, async () => {
    const [sec, us] = await conn.time();
    return Number(await conn.zscore(key(group, 'alive'), id)) < Number(sec) * 1000 + Math.floor(Number(us) / 1000) - ms;
  });

  it('a claimed member that withdrew is dropped when given back, never left for the next holder', async () => {
    const { lock, group } = names();
    const stop = new AbortController();
    const a = never().join(lock, group, member('a@1', 1), stop.signal);
    await waitQueued(group, ['a@1']);
    const h = await holderOf(new RedisLocks(conn, opts()), lock, group, 'h@2', 2);
    expect((await claimed(h)).map((m) => m.id)).toEqual(['a@1', 'h@2']);
    stop.abort(new Error('Cancelled'));
    await expect(a).rejects.toMatchObject({ code: 'Transient', message: expect.stringContaining('aborted') });
    await h.giveBack(['a@1']);
    expect(await queuedIds(group)).toEqual(['h@2']);
    expect(await conn.hget(key(group, 'data'), 'a@1')).toBeNull();
    await h.lease.release();
  });

  it('a sealed member waits for its outcome while the holder keeps the lock, past every wait bound; once the holder is gone it is unsure, and the next holder takes it first', async () => {
    const { lock, group } = names();
    // waitMs + ttlMs (4 s) was how long a sealed member waited before it gave up; a lock TTL of
    // 3 s keeps the holder's renewals (every second) well ahead of it on a loaded machine.
    const short = { waitMs: 1000, ttlMs: 3000 };
    const stopA = new AbortController();
    const stopB = new AbortController();
    const h = await holderOf(new RedisLocks(conn, opts(short)), lock, group, 'h@1', 1);
    const a = never(short).join(lock, group, member('a@5', 5), stopA.signal);
    const b = never(short).join(lock, group, member('b@6', 6), stopB.signal);
    await waitQueued(group, ['a@5', 'b@6']);
    expect((await claimed(h)).map((m) => m.id)).toEqual(['h@1', 'a@5', 'b@6']);
    expect(await h.seal(['h@1', 'a@5', 'b@6'])).toEqual([]);
    stopA.abort(new Error('Cancelled'));
    stopB.abort(new Error('Cancelled'));
    let settled = false;
    void a.then(() => { settled = true; }, () => { settled = true; });
    await new Promise((r) => setTimeout(r, 4_500));
    expect(settled).toBe(false);
    await h.finish(new Map([['a@5', 'done'], ['h@1', '']]));
    await expect(a).resolves.toEqual({ outcome: 'done' });
    // The holder goes without recording b (it died after its commit, or its put's reply was lost).
    const bUnsure = expect(b).rejects.toMatchObject({ code: 'Transient', message: expect.stringContaining('went away') });
    await h.lease.release();
    await bUnsure;
    const c = never().join(lock, group, member('c@2', 2), new AbortController().signal);
    await waitQueued(group, ['c@2']);
    const h2 = await holderOf(new RedisLocks(conn, opts()), lock, group, 'h2@3', 3);
    // Taken first though c arrived before it, and known to be maybe committed.
    expect(await claimed(h2, 1)).toEqual([{ ...member('b@6', 6), unsure: true }]);
    expect((await claimed(h2)).map((m) => [m.id, m.unsure ?? false])).toEqual([['c@2', false], ['h2@3', false], ['b@6', true]]);
    await h2.finish(new Map([['b@6', ''], ['c@2', 'c done'], ['h2@3', '']]));
    await expect(c).resolves.toEqual({ outcome: 'c done' });
    await h2.lease.release();
  });

  it('drops a member that stopped polling (its worker died): not claimed, and not sealed once claimed', async () => {
    const { lock, group } = names();
    const [w1, w2] = [killable(conn), killable(conn)];
    // The dead members' own loops end on their own once their bounds pass (their Redis calls fail meanwhile).
    // A liveness window of 5 s: a live member under load (polling every 250 ms at most) is never taken for dead.
    const live = 5000;
    void never({ waitMs: 1000, ttlMs: live }, w1.redis).join(lock, group, member('d1@1', 1), new AbortController().signal).catch(() => undefined);
    void never({ waitMs: 30_000, ttlMs: live }, w2.redis).join(lock, group, member('d2@2', 2), new AbortController().signal).catch(() => undefined);
    await waitQueued(group, ['d1@1', 'd2@2']);
    w1.kill();
    // A member silent for the holder's lock TTL counts as gone.
    await quietFor(group, 'd1@1', live);
    const h = await holderOf(new RedisLocks(conn, opts({ ttlMs: live })), lock, group, 'h@3', 3);
    expect((await claimed(h)).map((m) => m.id)).toEqual(['d2@2', 'h@3']);
    expect(await conn.hget(key(group, 'data'), 'd1@1')).toBeNull();
    w2.kill();
    await quietFor(group, 'd2@2', live);
    expect(await h.seal(['d2@2', 'h@3'])).toEqual(['d2@2']);
    expect(await queuedIds(group)).toEqual(['h@3']);
    expect(await h.seal(['h@3'])).toEqual([]);
    await h.finish(new Map([['h@3', '']]));
    await h.lease.release();
  });

  it("the holder's lock renewals keep the group's keys; a seal holds only members whose claim is still this holder's", async () => {
    const { lock, group } = names();
    const h = await holderOf(new RedisLocks(conn, opts({ ttlMs: 3000 })), lock, group, 'h@3', 3);
    await claimed(h);
    // No member polls: the claims' TTL nearly spent (a batch that outlasts it), the next renewal (every 1 s) sets it again.
    await conn.pexpire(key(group, 'claims'), 2500);
    await until('a renewal to refresh the claims', async () => (await conn.pttl(key(group, 'claims'))) > 3000, 5000);
    const stopB = new AbortController();
    const a = never().join(lock, group, member('a@1', 1), new AbortController().signal);
    const b = never().join(lock, group, member('b@2', 2), stopB.signal);
    await waitQueued(group, ['a@1', 'b@2']);
    expect((await claimed(h)).map((m) => m.id)).toEqual(['a@1', 'b@2', 'h@3']);
    // b's claim lost (as when the claims' key expired): the seal reports it and seals nothing.
    await conn.hdel(key(group, 'claims'), 'b@2');
    expect(await h.seal(['a@1', 'b@2', 'h@3'])).toEqual(['b@2']);
    expect(await conn.hlen(key(group, 'sealed'))).toBe(0);
    expect(await h.seal(['a@1', 'h@3'])).toEqual([]);
    await h.finish(new Map([['a@1', 'ok'], ['h@3', '']]));
    await expect(a).resolves.toEqual({ outcome: 'ok' });
    stopB.abort(new Error('Cancelled'));
    await expect(b).rejects.toMatchObject({ code: 'Transient' });
    await h.lease.release();
  });
});
