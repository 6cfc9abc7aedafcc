import { randomUUID } from 'node:crypto';
import { lstat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { FsDriver } from '../../src/backends/fs.js';
import { StevedoreClient } from '../../src/queue/client.js';
import { Bucket } from '../../src/storage/bucket.js';
import { tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { S3RVER_CREDENTIALS, startS3rver, type S3rver } from '../harness/s3.js';
import { printWorkersOnFailure, spawnWorker, stopAllWorkers, type LogLine, type WorkerProcess } from '../harness/worker-process.js';
import { contents, mixedTree, sha, writeLegacyTree } from './fixtures.js';

// One migration shared by worker processes (`stevedore worker`), killed with SIGKILL mid-run and
// cancelled; chunks of 10 keys, 4 in flight, one object at a time per chunk so a run lasts long
// enough to be interrupted. STEVEDORE_SOAK=1 runs a tree ten times larger.

const SOAK = process.env.STEVEDORE_SOAK === '1';
const N = SOAK ? 3000 : 300;

describe('migrate across worker processes', () => {
  let redis: TestRedis;
  let s3: S3rver;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let legacy: string;
  const tree = mixedTree(N, 5);
  const clients: StevedoreClient[] = [];
  const spawned: WorkerProcess[] = [];

  beforeAll(async () => {
    [redis, s3, tmp] = await Promise.all([startRedis(), startS3rver(), tempDir('stevedore-migrate-workers-')]);
    legacy = join(tmp.path, 'legacy');
    await writeLegacyTree(legacy, tree);
  }, 120_000);
  afterEach(async (ctx) => {
    printWorkersOnFailure(ctx, spawned, 5000);
    await stopAllWorkers();
    await Promise.all(clients.splice(0).map((c) => c.close().catch(() => {})));
  });
  afterAll(async () => {
    await stopAllWorkers();
    await s3?.stop();
    await redis?.stop();
    await tmp?.remove();
  });

  const setup = async () => {
    const queue = `mig-${randomUUID().slice(0, 8)}`;
    const client = new StevedoreClient({ redisUrl: redis.url, queue });
    clients.push(client);
    const dest = join(tmp.path, `dest-${queue}`);
    const s3Bucket = await s3.bucket();
    const env = {
      REDIS_URL: redis.url, STEVEDORE_QUEUE: queue, STEVEDORE_STAGING_DIR: join(tmp.path, `staging-${queue}`),
      STEVEDORE_BACKENDS: `legacy=file://${legacy},dest=file://${dest},s3=s3://${s3Bucket}?endpoint=${s3.endpoint}&forcePathStyle=true&conditionalWrites=false`,
      AWS_ACCESS_KEY_ID: S3RVER_CREDENTIALS.accessKeyId, AWS_SECRET_ACCESS_KEY: S3RVER_CREDENTIALS.secretAccessKey,
      STEVEDORE_CONCURRENCY: '2', STEVEDORE_CHUNK_KEYS: '10', STEVEDORE_CHUNK_WINDOW: '4', STEVEDORE_CHUNK_LANES: '1', LOG_LEVEL: 'debug',
    };
    const workers = async (n: number) => {
      const ws = await Promise.all(Array.from({ length: n }, () => spawnWorker(env)));
      spawned.push(...ws);
      return ws;
    };
    return { client, dest, workers, destBucket: () => new Bucket(new FsDriver({ root: dest }), { name: 'dest' }) };
  };
  const copiedBy = (w: WorkerProcess) => w.logs().filter((l: LogLine) => l.msg === 'copied').map((l) => String(l.key));
  const chunksBy = (w: WorkerProcess) => w.logs().filter((l: LogLine) => l.msg === 'job completed' && l.job === 'migrate-chunk').length;

  it('two worker processes killed with SIGKILL mid-run; two new ones finish it, copying nothing that was already verified', async () => {
    const { client, dest, workers, destBucket } = await setup();
    const first = await workers(2);
    const id = await client.migrate({ from: 'legacy', to: 'dest' });
    // Mid-run: a third of the objects copied.
    await until(() => first.reduce((n, w) => n + copiedBy(w).length, 0) >= N / 3);
    await Promise.all(first.map((w) => w.stop()));
    const present = new Map<string, number>();
    for await (const o of destBucket().list()) present.set(o.key, (await lstat(join(dest, o.key))).ino);
    expect(present.size).toBeGreaterThan(0);
    expect(present.size).toBeLessThan(N);

    const second = await workers(2);
    const r = await client.result<'migrate'>(id, { timeoutMs: 120_000 });
    expect(r).toMatchObject({ scanned: N, failed: 0, failures: [] });
    // Every object whose copy had landed before the kill kept its file: never copied twice.
    for (const [k, ino] of present) expect((await lstat(join(dest, k))).ino, k).toBe(ino);
    const again = second.flatMap(copiedBy);
    expect(again.filter((k) => present.has(k))).toEqual([]);
    expect(new Set(again).size).toBe(again.length);
    expect(present.size + again.length).toBe(N);
    const got = await contents(destBucket());
    expect(got.size).toBe(N);
    for (const [k, b] of tree) expect(got.get(k)?.sha, k).toBe(sha(b));
  }, 180_000);

  for (const n of [2, 3]) {
    it(`${n} worker processes share one migration to S3: every one runs chunks, the parent's progress moves as chunks finish`, async () => {
      const { client, workers } = await setup();
      const ws = await workers(n);
      const seen: Array<Record<string, number>> = [];
      const r = await client.run('migrate', { from: 'legacy', to: 's3' }, { timeoutMs: 120_000, onProgress: (p) => seen.push(p as unknown as Record<string, number>) });
      expect(r).toMatchObject({ scanned: N, copied: N, failed: 0, missingDigest: N });
      for (const w of ws) expect(chunksBy(w), w.name).toBeGreaterThan(0);
      const scanned = seen.map((p) => p.scanned ?? 0);
      expect(new Set(scanned).size).toBeGreaterThan(2);
      expect(scanned).toEqual([...scanned].sort((a, b) => a - b));
      expect(seen.at(-1)).toMatchObject({ scanned: N, copied: N });
    }, 180_000);
  }

  it('cancelling a migration stops its chunks and keeps what verified', async () => {
    const { client, workers, destBucket } = await setup();
    const ws = await workers(2);
    const id = await client.migrate({ from: 'legacy', to: 'dest' });
    await until(() => ws.reduce((n, w) => n + copiedBy(w).length, 0) >= N / 4);
    expect(await client.cancel(id)).toMatch(/cancelling|removed/);
    await expect(client.result(id, { timeoutMs: 30_000 })).rejects.toMatchObject({ code: 'Cancelled' });
    // Give any chunk that was running time to see its signal, then nothing more is copied.
    await new Promise((r) => setTimeout(r, 1500));
    const copied = ws.reduce((n, w) => n + copiedBy(w).length, 0);
    await new Promise((r) => setTimeout(r, 2000));
    expect(ws.reduce((n, w) => n + copiedBy(w).length, 0)).toBe(copied);
    expect(copied).toBeLessThan(N);
    const counts = await client.queue.getJobCounts('waiting', 'active', 'delayed', 'waiting-children');
    expect(counts).toEqual({ waiting: 0, active: 0, delayed: 0, 'waiting-children': 0 });
    // What landed is whole and verified.
    const got = await contents(destBucket());
    expect(got.size).toBeGreaterThan(0);
    for (const [k, v] of got) expect(v.sha, k).toBe(sha(tree.get(k)!));
  }, 120_000);
});

async function until(probe: () => boolean, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!probe()) {
    if (Date.now() > deadline) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 20));
  }
}
