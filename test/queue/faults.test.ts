import { randomUUID } from 'node:crypto';
import { readdir, stat, utimes, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { Readable } from 'node:stream';
import { GetObjectCommand, HeadObjectCommand, ListObjectsV2Command, type HeadObjectCommandOutput } from '@aws-sdk/client-s3';
import type { Job } from 'bullmq';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { FsDriver } from '../../src/backends/fs.js';
import { StevedoreClient } from '../../src/queue/client.js';
import { STAGING_TMP } from '../../src/staging.js';
import { Bucket } from '../../src/storage/bucket.js';
import { digestFile, digestStream, writeRandomFile, type Written } from '../fixtures/big-file.js';
import { startGateProxy, type GateProxy } from '../fixtures/gate-proxy.js';
import { tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { S3RVER_CREDENTIALS, startS3rver, type S3rver } from '../harness/s3.js';
import { spawnWorker, stopAllWorkers, type LogLine, type WorkerProcess } from '../harness/worker-process.js';

// Reliability rows 15, 16, 17, 23 against worker processes (`stevedore worker`), real Redis, a real
// filesystem and s3rver. Workers run with a 4 s lock and a 2 s stalled check (harness defaults), so
// a dead worker's job is handed back within seconds.

const MiB = 1 << 20;
/** Staged files: a large one for the filesystem, a smaller one for s3rver (about 60 MiB/s here). */
const BIG = 'big.bin';
const BIG_SIZE = 512 * MiB;
const MID = 'mid.bin';
const MID_SIZE = 192 * MiB;

/** Polls `probe` until it returns a value other than undefined/false; errors count as "not yet" only when asked. */
async function until<T>(what: string, probe: () => Promise<T | undefined | false>, opts: { timeoutMs?: number; everyMs?: number; tolerateErrors?: boolean } = {}): Promise<T> {
  const deadline = Date.now() + (opts.timeoutMs ?? 30_000);
  let last: unknown;
  for (;;) {
    try {
      const v = await probe();
      if (v !== undefined && v !== false) return v;
    } catch (err) {
      if (!opts.tolerateErrors) throw err;
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? ` (last error: ${String(last)})` : ''}`);
    await new Promise((r) => setTimeout(r, opts.everyMs ?? 50));
  }
}

async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`${what} within ${ms} ms`)), ms); });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

const tmpFiles = async (dir: string): Promise<string[]> => (await readdir(dir).catch(() => [] as string[])).filter((f) => f.startsWith('tmp-'));
const progressBytes = (job: Job | undefined): number => (typeof job?.progress === 'object' && job.progress !== null ? Number((job.progress as { bytes?: unknown }).bytes ?? 0) : 0);
const isMsg = (msg: string, jobId?: string) => (l: LogLine) => l.msg === msg && (jobId === undefined || l.jobId === jobId);

describe('worker processes under faults', () => {
  let redis: TestRedis;
  let s3: S3rver;
  let s3Bucket: string;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let root: string;
  let stagingDir: string;
  let fsBucket: Bucket;
  let big: Written;
  let mid: Written;
  const clients: StevedoreClient[] = [];
  /** This test's worker processes, whose logs a failure prints. */
  const spawned: WorkerProcess[] = [];
  const worker = async (env: Record<string, string>) => {
    const w = await spawnWorker(env);
    spawned.push(w);
    return w;
  };
  const proxies: GateProxy[] = [];

  beforeAll(async () => {
    [redis, s3, tmp] = await Promise.all([startRedis(), startS3rver(), tempDir('stevedore-faults-')]);
    s3Bucket = await s3.bucket();
    root = join(tmp.path, 'objects');
    stagingDir = join(tmp.path, 'staging');
    fsBucket = new Bucket(new FsDriver({ root }), { name: 'default' });
    big = await writeRandomFile(join(stagingDir, BIG), BIG_SIZE);
    mid = await writeRandomFile(join(stagingDir, MID), MID_SIZE);
  });
  afterEach(async (ctx) => {
    if (ctx.task.result?.state === 'fail') {
      for (const w of spawned) console.error(`--- ${w.name} (${w.alive() ? 'alive' : 'exited'}) ---\n${w.output().slice(-6000)}`);
    }
    spawned.length = 0;
    // Whatever a test left running dies here, pass or fail.
    await stopAllWorkers();
    await Promise.all(clients.splice(0).map((c) => c.close().catch(() => {})));
    await Promise.all(proxies.splice(0).map((p) => p.close()));
  });
  afterAll(async () => {
    await stopAllWorkers();
    await s3?.stop();
    await redis?.stop();
    await tmp?.remove();
  });

  /** A fresh queue (each test has its own) and a producer on it. */
  const queueAndClient = () => {
    const queue = `faults-${randomUUID().slice(0, 8)}`;
    const client = new StevedoreClient({ redisUrl: redis.url, queue });
    clients.push(client);
    return { queue, client };
  };
  /** Worker configuration; `s3Endpoint` lets one worker reach s3rver through a gate proxy. */
  const workerEnv = (queue: string, extra: Record<string, string> = {}, s3Endpoint = s3.endpoint): Record<string, string> => ({
    REDIS_URL: redis.url,
    STEVEDORE_QUEUE: queue,
    STEVEDORE_STAGING_DIR: stagingDir,
    STEVEDORE_BACKENDS: `default=file://${root},s3=s3://${s3Bucket}?endpoint=${s3Endpoint}&forcePathStyle=true&conditionalWrites=false`,
    AWS_ACCESS_KEY_ID: S3RVER_CREDENTIALS.accessKeyId,
    AWS_SECRET_ACCESS_KEY: S3RVER_CREDENTIALS.secretAccessKey,
    STEVEDORE_CONCURRENCY: '4',
    ...extra,
  });
  const proxy = async () => {
    const p = await startGateProxy(s3.server.port);
    proxies.push(p);
    return p;
  };
  const head = async (key: string): Promise<HeadObjectCommandOutput | undefined> => {
    try {
      return await s3.client.send(new HeadObjectCommand({ Bucket: s3Bucket, Key: key }));
    } catch (err) {
      if ((err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode === 404) return undefined;
      throw err;
    }
  };
  const s3Keys = async (prefix: string): Promise<string[]> =>
    ((await s3.client.send(new ListObjectsV2Command({ Bucket: s3Bucket, Prefix: prefix }))).Contents ?? []).map((o) => o.Key ?? '');
  const s3Digest = async (key: string): Promise<Written> =>
    digestStream((await s3.client.send(new GetObjectCommand({ Bucket: s3Bucket, Key: key }))).Body as Readable);
  const fsKeys = async (prefix: string): Promise<string[]> => {
    const keys: string[] = [];
    for await (const o of fsBucket.list(prefix)) keys.push(o.key);
    return keys;
  };
  const state = async (client: StevedoreClient, id: string) => (await client.getJob(id))?.getState();
  /**
   * Waits until `n` jobs of this test's queue have finished, by polling counts rather than with
   * `client.result()`: a result() that creates the client's QueueEvents can miss a completion that
   * lands before its first XREAD (reported separately), and a batch of quick jobs hits that window.
   */
  const allFinished = (client: StevedoreClient, n: number, timeoutMs = 60_000) => until(`${n} jobs to finish`, async () => {
    const c = await client.queue.getJobCounts('completed', 'failed', 'active', 'waiting', 'delayed');
    return (c.completed ?? 0) + (c.failed ?? 0) >= n && c;
  }, { timeoutMs, everyMs: 100, tolerateErrors: true });

  /** A store of BIG under `key`, taken by a fresh worker and caught while it writes its temp file. */
  const bigStoreUnderway = async (key: string) => {
    const { queue, client } = queueAndClient();
    const meta = join(root, dirname(key), '.stevedore');
    const id = await client.store({ key, source: { path: BIG } }, { attempts: 3 });
    const a = await worker(workerEnv(queue));
    const [temp] = await until('the store to write its temp file', async () => {
      const t = await tmpFiles(meta);
      return t.length > 0 && t;
    }, { everyMs: 5 });
    expect(await state(client, id)).toBe('active');
    return { queue, client, meta, id, a, temp: temp! };
  };

  describe('kill -9 mid-store (#15)', () => {
    it('leaves no object on the filesystem; a second worker completes the job with the right digest and sweeps the temp file', async () => {
      const key = 'kill9/fs/artifact.tar.gz';
      const { queue, client, meta, id, a, temp } = await bigStoreUnderway(key);
      a.kill('SIGKILL');
      expect(await a.exited).toEqual({ code: null, signal: 'SIGKILL' });

      // Killed halfway: a partial temp file, nothing at the key, nothing listed.
      expect((await stat(join(meta, temp))).size).toBeLessThan(big.size);
      await expect(stat(join(root, key))).rejects.toMatchObject({ code: 'ENOENT' });
      await expect(fsBucket.stat(key)).rejects.toMatchObject({ code: 'NotFound' });
      expect(await fsKeys('kill9/')).toEqual([]);
      expect(await state(client, id)).toBe('active');

      // Age what the dead writer left so the next worker's start-up sweep counts it as stale; and
      // plant what a worker killed mid-fetch leaves in staging. The staging sweep judges age by
      // ctime, which utimes cannot set back: the next worker sweeps what is unchanged for 1.5 s.
      const old = new Date(Date.now() - 2 * 3600_000);
      for (const f of await readdir(meta)) await utimes(join(meta, f), old, old);
      const fetchLeftover = join(stagingDir, `${STAGING_TMP}fetched.bin-dead`);
      await writeFile(fetchLeftover, 'partial');
      await new Promise((r) => setTimeout(r, 2_000));

      const b = await worker(workerEnv(queue, { STEVEDORE_SWEEP_AFTER_MS: '1500' }));
      const result = await client.result<'store'>(id, { timeoutMs: 60_000 });
      expect(result).toEqual({ backend: 'default', key, size: big.size, sha256: big.sha256 });
      expect(await digestFile(join(root, key))).toEqual(big);
      expect((await fsBucket.stat(key)).sha256).toBe(big.sha256);
      const job = await client.getJob(id);
      expect(job?.processedBy).toBe(b.name);
      expect(job?.stalledCounter).toBe(1);
      expect((await b.waitForLog((l) => l.msg === 'swept stale temp files' && l.where === 'backend default', 10_000)).removed).toBeGreaterThanOrEqual(1);
      expect((await b.waitForLog((l) => l.msg === 'swept stale temp files' && l.where === 'staging', 10_000)).removed).toBe(1);
      expect(await tmpFiles(meta)).toEqual([]);
      await expect(stat(fetchLeftover)).rejects.toMatchObject({ code: 'ENOENT' });
      expect(await fsKeys('kill9/')).toEqual([key]);
    }, 120_000);

    it('leaves no object visible on S3; a second worker completes the job with size and digest metadata', async () => {
      const { queue, client } = queueAndClient();
      const key = 'kill9/s3/artifact.tar.gz';
      const gate = await proxy();
      const id = await client.store({ backend: 's3', key, source: { path: MID } }, { attempts: 3 });
      const a = await worker(workerEnv(queue, {}, gate.endpoint));
      // Parts are on their way to s3rver; freezing the link keeps the kill mid-upload for sure.
      await until('upload progress', async () => progressBytes(await client.getJob(id)) > 0 && gate.upstreamBytes() >= 16 * MiB, { timeoutMs: 60_000, everyMs: 20 });
      gate.freeze();
      expect(await state(client, id)).toBe('active');
      a.kill('SIGKILL');
      expect(await a.exited).toEqual({ code: null, signal: 'SIGKILL' });

      expect(await head(key)).toBeUndefined();
      expect(await s3Keys('kill9/')).toEqual([]);

      const b = await worker(workerEnv(queue));
      const result = await client.result<'store'>(id, { timeoutMs: 90_000 });
      expect(result).toEqual({ backend: 's3', key, size: mid.size, sha256: mid.sha256 });
      const h = await head(key);
      expect(h?.ContentLength).toBe(mid.size);
      expect(h?.Metadata?.sha256).toBe(mid.sha256);
      expect(await s3Digest(key)).toEqual(mid);
      const job = await client.getJob(id);
      expect(job?.processedBy).toBe(b.name);
      expect(job?.stalledCounter).toBe(1);
    }, 120_000);
  });

  it('loses no job when Redis is killed and restarted mid-run (#16); both workers reconnect and keep serving', async () => {
    const { queue, client } = queueAndClient();
    // The producer's Queue reports the outage as 'error' events; without a listener BullMQ prints them.
    client.queue.on('error', () => {});
    const stores = await Promise.all(Array.from({ length: 20 }, (_, i) => writeRandomFile(join(stagingDir, `restart/s-${i}.bin`), 256 * 1024 + i)));
    const [a, b] = await Promise.all([worker(workerEnv(queue)), worker(workerEnv(queue))]);
    const t0 = Date.parse('2026-05-01T00:00:00.000Z');
    const opts = { attempts: 5, backoff: { type: 'fixed', delay: 200 } };
    const logJobs = Array.from({ length: 200 }, (_, i) => ({ name: 'log', data: { site: 'restart', build: `b${i}`, action: 'deploy', status: 'ok', timestamp: t0 + i * 1000 }, opts }));
    const storeJobs = stores.map((_, i) => ({ name: 'store', data: { key: `restart/objects/s-${i}.bin`, source: { path: `restart/s-${i}.bin` } }, opts }));
    // Interleaved so the restart lands among both kinds.
    const all: { name: string; data: object; opts: typeof opts }[] = [...logJobs];
    storeJobs.forEach((s, i) => all.splice(i * 11, 0, s));
    const added = await client.queue.addBulk(all);
    const total = added.length;

    const atKill = await until('the run to be under way', async () => {
      const c = await client.queue.getJobCounts('completed');
      return (c.completed ?? 0) >= 20 && c;
    }, { everyMs: 10 });
    await redis.restart({ downMs: 1_000, signal: 'SIGKILL' });
    expect(atKill.completed).toBeLessThan(total);

    const counts = await allFinished(client, total, 90_000);
    expect(counts).toEqual({ completed: total, failed: 0, active: 0, waiting: 0, delayed: 0 });

    // Every result is right, and what it names is stored.
    for (const added1 of added) {
      const job = (await client.getJob(added1.id!))!;
      if (job.name === 'log') {
        const d = job.data as { build: string; timestamp: number };
        const ts = new Date(d.timestamp).toISOString();
        expect(job.returnvalue).toEqual({ key: `sites/restart/logs/${ts}-${d.build}.json`, timestamp: ts });
      } else {
        const i = Number(/s-(\d+)\.bin$/.exec((job.data as { key: string }).key)![1]);
        expect(job.returnvalue).toEqual({ backend: 'default', key: `restart/objects/s-${i}.bin`, size: stores[i]!.size, sha256: stores[i]!.sha256 });
        expect((await fsBucket.stat(`restart/objects/s-${i}.bin`)).sha256).toBe(stores[i]!.sha256);
      }
    }
    expect(await fsKeys('sites/restart/logs/')).toHaveLength(200);
    expect(await fsKeys('restart/objects/')).toHaveLength(20);

    // Both processes survived the outage and both take new work.
    expect([a.alive(), b.alive()]).toEqual([true, true]);
    const after = await client.queue.addBulk(Array.from({ length: 24 }, (_, i) => ({ name: 'log', data: { site: 'after', build: `b${i}`, action: 'deploy', status: 'ok' } })));
    expect(await allFinished(client, total + after.length)).toMatchObject({ completed: total + after.length, failed: 0 });
    const afterJobs = await Promise.all(after.map(async (j) => (await client.getJob(j.id!))!));
    expect(afterJobs.every((j) => (j.returnvalue as { key: string }).key.startsWith('sites/after/logs/'))).toBe(true);
    expect(new Set(afterJobs.map((j) => j.processedBy))).toEqual(new Set([a.name, b.name]));
  }, 150_000);

  describe('SIGTERM with an active job (#23)', () => {
    it('finishes the active job within a generous deadline, exits 0, and takes no job after the signal', async () => {
      const key = 'sigterm/drained.bin';
      const { queue, client, id, a } = await bigStoreUnderway(key);
      a.kill('SIGTERM');
      await a.waitForLog(isMsg('stopping: no new jobs, waiting for active ones'), 10_000);
      const late = await client.log({ site: 'late', build: 'b1', action: 'deploy', status: 'ok' });

      expect(await within(a.exited, 60_000, 'the worker to exit')).toEqual({ code: 0, signal: null });
      const job = (await client.getJob(id))!;
      expect(await job.getState()).toBe('completed');
      expect(job.returnvalue).toEqual({ backend: 'default', key, size: big.size, sha256: big.sha256 });
      expect(job.processedBy).toBe(a.name);
      expect(await digestFile(join(root, key))).toEqual(big);
      const lines = a.logs();
      const stopping = lines.findIndex(isMsg('stopping: no new jobs, waiting for active ones'));
      expect(lines.findIndex(isMsg('job completed', id))).toBeGreaterThan(stopping);
      expect(lines.find(isMsg('stopped'))?.outcome).toBe('drained');

      // Not started here: still waiting, no attempt made, never run by this worker. (`processedBy`
      // is not checked: a fetch woken as close() begins records it even when the job is handed back.)
      const lateJob = (await client.getJob(late))!;
      expect(await lateJob.getState()).toBe('waiting');
      expect(lateJob.attemptsMade).toBe(0);
      expect(lines.some((l) => l.jobId === late)).toBe(false);
    }, 90_000);

    it('with a tiny deadline exits promptly and hands the job back; a second worker completes it', async () => {
      const { queue, client } = queueAndClient();
      const key = 'sigterm/handed-back.bin';
      const gate = await proxy();
      const id = await client.store({ backend: 's3', key, source: { path: MID } }, { attempts: 3 });
      const a = await worker(workerEnv(queue, { STEVEDORE_SHUTDOWN_TIMEOUT_MS: '200' }, gate.endpoint));
      // A backend that stops answering mid-upload: the job cannot finish before the deadline.
      await until('upload progress', async () => progressBytes(await client.getJob(id)) > 0 && gate.upstreamBytes() >= 8 * MiB, { timeoutMs: 60_000, everyMs: 20 });
      gate.freeze();
      expect(await state(client, id)).toBe('active');
      const signalled = Date.now();
      a.kill('SIGTERM');
      // The lock is 4 s: exiting well before it runs out is "prompt".
      expect(await within(a.exited, 10_000, 'the worker to exit after SIGTERM with a 200 ms deadline')).toEqual({ code: 0, signal: null });
      expect(Date.now() - signalled).toBeLessThan(4_000);
      expect(a.logs().find(isMsg('stopped'))?.outcome).toBe('forced');
      expect(a.logs().some(isMsg('job completed', id))).toBe(false);
      expect(a.logs().some(isMsg('job cancelled', id))).toBe(true);
      expect(await head(key)).toBeUndefined();
      // Handed back before exiting: waiting at once, not active until its 4 s lock lapses.
      expect(await state(client, id)).toBe('waiting');

      const b = await worker(workerEnv(queue));
      const result = await client.result<'store'>(id, { timeoutMs: 90_000 });
      expect(result).toEqual({ backend: 's3', key, size: mid.size, sha256: mid.sha256 });
      const job = await client.getJob(id);
      expect(job?.processedBy).toBe(b.name);
      // Handed back, not failed: the stop cost the job none of its attempts, and it never stalled.
      expect(job?.attemptsMade).toBe(1);
      expect(job?.stalledCounter).toBe(0);
      const h = await head(key);
      expect(h?.ContentLength).toBe(mid.size);
      expect(h?.Metadata?.sha256).toBe(mid.sha256);
    }, 120_000);
  });

  it('spreads 100 log jobs over two worker processes on one queue, and completes them all', async () => {
    const { queue, client } = queueAndClient();
    const [a, b] = await Promise.all([worker(workerEnv(queue)), worker(workerEnv(queue))]);
    const t0 = Date.parse('2026-06-01T00:00:00.000Z');
    const added = await client.queue.addBulk(Array.from({ length: 100 }, (_, i) => ({ name: 'log', data: { site: 'pair', build: `b${i}`, action: 'build', status: 'ok', timestamp: t0 + i } })));
    expect(await allFinished(client, 100)).toMatchObject({ completed: 100, failed: 0 });
    const jobs = await Promise.all(added.map(async (j) => (await client.getJob(j.id!))!));
    const results = jobs.map((j) => j.returnvalue as { key: string });
    expect(results.map((r) => r.key)).toEqual(Array.from({ length: 100 }, (_, i) => `sites/pair/logs/${new Date(t0 + i).toISOString()}-b${i}.json`));
    expect(new Set(jobs.map((j) => j.processedBy))).toEqual(new Set([a.name, b.name]));
    expect(await fsKeys('sites/pair/logs/')).toEqual(results.map((r) => r.key));
  }, 90_000);

  describe.each([
    { backend: 'default', size: 96 * MiB },
    { backend: 's3', size: 48 * MiB },
  ])('the same store run concurrently by two workers (#17), on $backend', ({ backend, size }) => {
    it('completes both with the same digest and leaves the object whole', async () => {
      const { queue, client } = queueAndClient();
      const file = await writeRandomFile(join(stagingDir, `twice-${backend}.bin`), size);
      const key = `twice/${backend}/artifact.bin`;
      // One job at a time per process: the two deliveries must run in different workers.
      const [a, b] = await Promise.all([worker(workerEnv(queue, { STEVEDORE_CONCURRENCY: '1' })), worker(workerEnv(queue, { STEVEDORE_CONCURRENCY: '1' }))]);
      const payload = { backend, key, source: { path: `twice-${backend}.bin` } };
      const ids = await Promise.all([client.store(payload, { jobId: `${queue}-first` }), client.store(payload, { jobId: `${queue}-second` })]);
      const results = await Promise.all(ids.map((id) => client.result<'store'>(id, { timeoutMs: 60_000 })));
      expect(results).toEqual([
        { backend, key, size: file.size, sha256: file.sha256 },
        { backend, key, size: file.size, sha256: file.sha256 },
      ]);
      const [j1, j2] = (await Promise.all(ids.map((id) => client.getJob(id)))) as [Job, Job];
      expect(new Set([j1.processedBy, j2.processedBy])).toEqual(new Set([a.name, b.name]));
      // They really ran at the same time.
      expect(j1.processedOn!).toBeLessThan(j2.finishedOn!);
      expect(j2.processedOn!).toBeLessThan(j1.finishedOn!);

      if (backend === 's3') {
        const h = await head(key);
        expect(h?.ContentLength).toBe(file.size);
        expect(h?.Metadata?.sha256).toBe(file.sha256);
        expect(await s3Digest(key)).toEqual(file);
      } else {
        expect(await digestFile(join(root, key))).toEqual(file);
        expect((await fsBucket.stat(key)).sha256).toBe(file.sha256);
        expect(await tmpFiles(join(root, `twice/${backend}/.stevedore`))).toEqual([]);
        expect(await fsKeys(`twice/${backend}/`)).toEqual([key]);
      }
    }, 90_000);
  });
});
