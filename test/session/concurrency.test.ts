import { randomBytes, randomUUID } from 'node:crypto';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { FsDriver } from '../../src/backends/fs.js';
import { S3Driver } from '../../src/backends/s3.js';
import { Bucket } from '../../src/storage/bucket.js';
import { StevedoreClient } from '../../src/queue/client.js';
import { sessionKey } from '../../src/session/ids.js';
import { catSession, listSession } from '../../src/session/read.js';
import { run } from '../archive/corpus.js';
import { tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { S3RVER_CREDENTIALS, startS3rver, type S3rver } from '../harness/s3.js';
import { printWorkersOnFailure, spawnWorker, stopAllWorkers, type WorkerProcess } from '../harness/worker-process.js';

// RELIABILITY #19: concurrent repacks of one session by several worker processes never lose an
// edit, on the filesystem (conditional commit checked by a stat) and on s3rver (no conditional
// writes at all: the lock alone). STEVEDORE_SOAK=1 runs the full 30-way version.
const EDITS = process.env.STEVEDORE_SOAK === '1' ? 30 : 12;

async function until<T>(what: string, probe: () => Promise<T | undefined | false>, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe().catch(() => undefined);
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

describe('concurrent repacks of one session across worker processes', () => {
  let redis: TestRedis;
  let s3: S3rver;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let root: string;
  let stagingDir: string;
  let backends: string;
  let s3Bucket: string;
  const clients: StevedoreClient[] = [];
  const spawned: WorkerProcess[] = [];

  beforeAll(async () => {
    [redis, s3, tmp] = await Promise.all([startRedis(), startS3rver(), tempDir('stevedore-concurrency-')]);
    s3Bucket = await s3.bucket();
    root = join(tmp.path, 'objects');
    stagingDir = join(tmp.path, 'staging');
    await mkdir(stagingDir, { recursive: true });
    backends = `default=file://${root},s3=s3://${s3Bucket}?endpoint=${s3.endpoint}&forcePathStyle=true&conditionalWrites=false`;
  });
  /** The backend the workers call `name`, opened here (s3rver's credentials passed, never via process.env). */
  const bucketFor = (name: string): Bucket => name === 's3' ? new Bucket(new S3Driver(s3.driverOptions(s3Bucket))) : new Bucket(new FsDriver({ root }));
  afterEach(async (ctx) => {
    printWorkersOnFailure(ctx, spawned);
    if (ctx.task.name.includes('on default')) return; // the s3 race reuses its workers and client
    await stopAllWorkers();
    await Promise.all(clients.splice(0).map((c) => c.close().catch(() => {})));
  });
  afterAll(async () => {
    await stopAllWorkers();
    await s3?.stop();
    await redis?.stop();
    await tmp?.remove();
  });

  const setup = async (workers: number) => {
    const queue = `repack-${randomUUID().slice(0, 8)}`;
    const client = new StevedoreClient({ redisUrl: redis.url, queue, defaultJobOptions: { backoff: { type: 'exponential', delay: 100, jitter: 0.5 }, attempts: 8 } });
    clients.push(client);
    const env = {
      REDIS_URL: redis.url, STEVEDORE_QUEUE: queue, STEVEDORE_STAGING_DIR: stagingDir, STEVEDORE_BACKENDS: backends,
      AWS_ACCESS_KEY_ID: S3RVER_CREDENTIALS.accessKeyId, AWS_SECRET_ACCESS_KEY: S3RVER_CREDENTIALS.secretAccessKey, STEVEDORE_CONCURRENCY: '4',
    };
    const ws = await Promise.all(Array.from({ length: workers }, () => spawnWorker(env)));
    spawned.push(...ws);
    return { client, env, ws };
  };

  /** Three worker processes shared by both backends' races (a process start costs seconds here). */
  let racers: Promise<Awaited<ReturnType<typeof setup>>> | undefined;

  it.each(['default', 's3'])(`keeps every edit of ${EDITS} concurrent repacks on %s by 3 worker processes`, async (backend) => {
    const bucket = bucketFor(backend);
    const { client, ws } = await (racers ??= setup(3));
    spawned.push(...ws);
    const session = `octo__repo__race-${backend}`;
    // A session with some bulk, so a rewrite takes long enough for the jobs to overlap.
    await writeFile(join(stagingDir, `bulk-${backend}`), randomBytes(256 << 10));
    await client.run('repack-session', { backend, session, ops: [{ op: 'put', path: 'bulk.bin', source: { path: `bulk-${backend}` } }] }, { timeoutMs: 60_000 });
    const ids = await Promise.all(Array.from({ length: EDITS }, (_, i) => client.repackSession({ backend, session, ops: [{ op: 'put', path: `edits/${i}.txt`, text: `edit ${i}\n` }] })));
    const before = await client.queue.getJobCounts('completed', 'failed');
    const done = await until('every repack to finish', async () => {
      const c = await client.queue.getJobCounts('completed', 'failed');
      return (c.completed ?? 0) + (c.failed ?? 0) >= (before.completed ?? 0) + EDITS && c;
    }, 120_000);
    expect(done).toMatchObject({ completed: (before.completed ?? 0) + EDITS, failed: 0 });
    const jobs = await Promise.all(ids.map((id) => client.getJob(id)));
    // Served by more than one process: the lock, not a single worker, kept them apart.
    expect(new Set(jobs.map((j) => j?.processedBy)).size).toBeGreaterThan(1);
    const listing = await listSession(bucket, session, { digests: true });
    const edits = listing.entries.filter((e) => e.path.startsWith('edits/') && e.type === 'file').map((e) => e.path).sort();
    expect(edits).toEqual(Array.from({ length: EDITS }, (_, i) => `edits/${i}.txt`).sort());
    expect(listing.entries.find((e) => e.path === 'bulk.bin')?.size).toBe(256 << 10);
    await bucket.close();
  });

  it('a worker killed mid-repack leaves the previous archive whole; another worker completes the job', async () => {
    const { client, env } = await setup(0);
    const session = 'octo__repo__killed';
    const key = sessionKey(session);
    await writeFile(join(stagingDir, 'first'), 'first\n');
    await writeFile(join(stagingDir, 'huge'), randomBytes(64 << 20));
    const a = await spawnWorker(env);
    spawned.push(a);
    await client.run('repack-session', { session, ops: [{ op: 'put', path: 'first.txt', source: { path: 'first' } }] }, { timeoutMs: 60_000 });
    const before = await readFile(join(root, key));
    const id = await client.repackSession({ session, ops: [{ op: 'put', path: 'huge.bin', source: { path: 'huge' } }] });
    // Caught while it writes the new archive's temp file beside the old one.
    const meta = join(root, 'sessions', session, '.stevedore');
    await until('the repack to write its temp file', async () => (await readdir(meta)).some((f) => f.startsWith('tmp-')), 60_000);
    a.kill('SIGKILL');
    await a.exited;
    expect(Buffer.compare(await readFile(join(root, key)), before)).toBe(0);
    await run('gzip', ['-t', join(root, key)]);
    const bucket = bucketFor('default');
    expect((await listSession(bucket, session)).entries.map((e) => e.path)).toEqual(['first.txt']);
    // The dead worker's session lock lapses (4 s here) as its BullMQ lock does; the job runs again.
    const b = await spawnWorker(env);
    spawned.push(b);
    const result = await client.result<'repack-session'>(id, { timeoutMs: 90_000 });
    expect(result.missing).toEqual([]);
    const chunks: Buffer[] = [];
    const out = new Writable({ write(c: Buffer, _e, cb) { chunks.push(Buffer.from(c)); cb(); } });
    const got = await catSession(bucket, session, 'first.txt', out);
    expect([got.verified, Buffer.concat(chunks).toString()]).toEqual([true, 'first\n']);
    expect((await listSession(bucket, session)).entries.map((e) => [e.path, e.size])).toEqual([['first.txt', 6], ['huge.bin', 64 << 20]]);
    await bucket.close();
  });
});
