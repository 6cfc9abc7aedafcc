import { Queue, type Job } from 'bullmq';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MemoryDriver } from '../../src/backends/memory.js';
import { StevedoreClient } from '../../src/queue/client.js';
import { Bucket } from '../../src/storage/bucket.js';
import { tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { inProcessWorker, type InProcessWorker } from '../harness/worker.js';

const KEEP = { keepCompleted: 3, keepFailed: 2 };
const entry = (build: string) => ({ site: 's', build, action: 'deploy', status: 'ok' });

/** Polls until `probe` holds; the jobs finish in the background. */
async function until(what: string, probe: () => Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await probe())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// Contract, Queue / Retention: what a plain BullMQ producer leaves behind is bounded by the worker.
describe('retention of finished jobs', () => {
  let redis: TestRedis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let w: InProcessWorker;
  let conn: Redis;
  let plain: Queue;

  beforeAll(async () => {
    redis = await startRedis();
    tmp = await tempDir();
    w = await inProcessWorker(redis.url, new Map([['default', new Bucket(new MemoryDriver())]]), tmp.path, { retention: KEEP, concurrency: 1 });
    conn = new Redis(redis.url, { maxRetriesPerRequest: null });
    // Nothing but the bullmq package, no job options: as a producer outside this project would.
    plain = new Queue(w.queue, { connection: conn });
  });
  afterAll(async () => {
    await plain?.close();
    await w?.close();
    await conn?.quit();
    await redis?.stop();
    await tmp?.remove();
  });

  const counts = () => plain.getJobCounts('completed', 'failed', 'waiting', 'active');
  /** Every job hash left in Redis for this queue (finished sets trimmed, hashes deleted too). */
  const jobHashes = async () => (await conn.keys(`bull:${w.queue}:*`)).filter((k) => /:\d+$/.test(k)).length;

  it('keeps only STEVEDORE_KEEP_COMPLETED completed and STEVEDORE_KEEP_FAILED failed jobs of a plain producer', async () => {
    for (let i = 0; i < 8; i++) await plain.add('log', entry(`b${i}`));
    // Invalid payloads fail at once, without retries.
    for (let i = 0; i < 6; i++) await plain.add('log', { site: 's' });
    await until('all 14 jobs finished', async () => {
      const c = await counts();
      return c.waiting === 0 && c.active === 0;
    });
    const c = await counts();
    expect(c).toMatchObject({ completed: 3, failed: 2 });
    // The removed jobs are gone from Redis, not only from the sets.
    expect(await jobHashes()).toBe(5);
    // The newest are the ones kept.
    const kept = await plain.getCompleted();
    expect(kept.map((j) => (j.data as { build: string }).build).sort()).toEqual(['b5', 'b6', 'b7']);
  });

  it("keeps a producer's own removeOn* choice", async () => {
    // Removed at once although the worker would keep it.
    const gone = await plain.add('log', entry('gone'), { removeOnComplete: true });
    // Kept beyond the worker's count: at their completion their own count applies.
    const mine: Job[] = [];
    for (let i = 0; i < 4; i++) mine.push(await plain.add('log', entry(`mine${i}`), { removeOnComplete: { count: 100 } }));
    await until('the producer-optioned jobs finished', async () => (await Promise.all(mine.map((j) => j.isCompleted()))).every(Boolean));
    expect(await plain.getJob(gone.id!)).toBeUndefined();
    expect((await counts()).completed).toBe(3 + 4);
  });

  it('trims the jobs of every producer once a plain job finishes', async () => {
    for (let i = 0; i < 5; i++) await w.client.log(entry(`c${i}`));
    await until('the client jobs finished', async () => {
      const c = await counts();
      return c.waiting === 0 && c.active === 0;
    });
    // The harness's client runs on the default retention (10,000): its jobs trim nothing.
    expect((await counts()).completed).toBe(7 + 5);
    // A plain job's completion trims the set back to the worker's count, whoever produced the rest.
    await plain.add('log', entry('last'));
    await until('trimmed', async () => (await counts()).completed === KEEP.keepCompleted);
  });

  it("bounds the project's client's own jobs by the retention it is given", async () => {
    const client = new StevedoreClient({ redisUrl: redis.url, queue: w.queue, retention: { keepCompleted: 2, keepFailed: 1 } });
    try {
      for (let i = 0; i < 4; i++) await client.run('log', entry(`r${i}`), { timeoutMs: 10_000 });
      for (let i = 0; i < 3; i++) await client.run('log', { site: 's' } as never, { timeoutMs: 10_000 }).catch(() => {});
      expect(await counts()).toMatchObject({ completed: 2, failed: 1 });
    } finally {
      await client.close();
    }
  });
});
