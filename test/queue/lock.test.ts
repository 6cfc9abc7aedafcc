// A worker that loses its job's lock (a long GC pause, a partition from Redis) must stop the job:
// another worker may already run it, and two runs racing to one destination is what #17 guards.
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MemoryDriver } from '../../src/backends/memory.js';
import { Bucket } from '../../src/storage/bucket.js';
import { hangingPuts } from '../fixtures/hanging-puts.js';
import { tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { inProcessWorker, type InProcessWorker } from '../harness/worker.js';

describe('a job whose lock is lost', () => {
  let redis: TestRedis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let w: InProcessWorker | undefined;
  beforeAll(async () => {
    redis = await startRedis();
    tmp = await tempDir();
  });
  afterAll(async () => {
    // A put that never saw its abort would hold close() forever.
    w?.worker.cancelAllJobs('test over');
    await w?.close();
    await redis.stop();
    await tmp.remove();
  });

  it('is cancelled at the next lock renewal: its transfer sees the abort', async () => {
    const hanging = hangingPuts(new MemoryDriver());
    w = await inProcessWorker(redis.url, new Map([['default', new Bucket(hanging.proxy)]]), tmp.path, { lockDurationMs: 2_000 });
    const id = await w.client.store({ key: 'k', source: { base64: 'eHl6' } });
    await hanging.putStarted;
    // What another worker's stalled check, or an expired key, does to the lock.
    const raw = new Redis(redis.url);
    try {
      expect(await raw.del(`bull:${w.queue}:${id}:lock`)).toBe(1);
    } finally {
      raw.disconnect();
    }
    const reason = await Promise.race([hanging.putAborted, new Promise((r) => setTimeout(() => r('not aborted'), 5_000))]);
    expect(String(reason)).toMatch(/lock/);
    expect(hanging.events).toEqual(['put']);
  });
});
