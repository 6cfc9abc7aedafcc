import { randomUUID } from 'node:crypto';
import { FlowProducer } from 'bullmq';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MemoryDriver } from '../../src/backends/memory.js';
import { redisConnection } from '../../src/queue/connection.js';
import { StevedoreClient } from '../../src/queue/client.js';
import { Bucket } from '../../src/storage/bucket.js';
import type { DriverPutOptions } from '../../src/storage/driver.js';
import { overrideDriver } from '../fixtures/override-driver.js';
import { inProcessWorker, type InProcessWorker } from '../harness/worker.js';
import { tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';

// Cancelling a job from another client than the worker's (the CLI, the HTTP server's DELETE
// /jobs/<id>): the request travels through Redis only, as it does between processes.

let redis: TestRedis;
let stagingDir: string;
beforeAll(async () => {
  redis = await startRedis();
  stagingDir = (await tempDir('cancel-staging')).path;
});
afterAll(async () => { await redis?.stop(); });

/** A memory bucket whose puts of keys under `slow/` hang until their signal aborts; `started` counts them. */
function hangingBucket(): { bucket: Bucket; driver: MemoryDriver; started: string[] } {
  const driver = new MemoryDriver();
  const started: string[] = [];
  const proxy = overrideDriver(driver, {
    put: (key: string, body, opts: DriverPutOptions) => {
      if (!key.startsWith('slow/')) return driver.put(key, body, opts);
      started.push(key);
      return new Promise((_, reject) => {
        const stop = () => reject(new Error('aborted'));
        if (opts.signal?.aborted) stop();
        opts.signal?.addEventListener('abort', stop, { once: true });
      });
    },
  });
  return { bucket: new Bucket(proxy), driver, started };
}

async function until<T>(probe: () => Promise<T | undefined | false> | T | undefined | false, timeoutMs = 15_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 25));
  }
}

const inline = (text: string) => ({ base64: Buffer.from(text).toString('base64') });

describe('cancel', () => {
  it('removes a waiting or delayed job, and says so', async () => {
    // No worker serves this queue: the jobs stay where they were put.
    const client = new StevedoreClient({ redisUrl: redis.url, queue: `idle-${randomUUID().slice(0, 8)}` });
    try {
      const waiting = await client.store({ key: 'a', source: inline('a') });
      const delayed = await client.store({ key: 'b', source: inline('b') }, { delay: 60_000 });
      expect(await client.cancel(waiting)).toBe('removed');
      expect(await client.cancel(delayed)).toBe('removed');
      expect(await client.getJob(waiting)).toBeUndefined();
      expect(await client.getJob(delayed)).toBeUndefined();
      expect(await client.cancel('no-such-job')).toBe('not-found');
      // A producer's own id, cancelled while waiting, can be used again: its new job is not cancelled.
      const mine = await client.store({ key: 'c', source: inline('c') }, { jobId: 'build-7' });
      expect(await client.cancel(mine)).toBe('removed');
      const conn = redisConnection(redis.url, 'worker');
      try {
        expect(await conn.exists(client.queue.toKey('cancelled:build-7'))).toBe(0);
      } finally {
        await conn.quit();
      }
    } finally {
      await client.close();
    }
  });

  describe('with a worker', () => {
    let w: InProcessWorker;
    let hanging: ReturnType<typeof hangingBucket>;
    beforeAll(async () => {
      hanging = hangingBucket();
      w = await inProcessWorker(redis.url, new Map([['default', hanging.bucket]]), stagingDir, { concurrency: 1 });
    });
    afterAll(async () => { await w?.close(); });

    /** The job once it has failed (read after its state says so: a job read before may be stale). */
    const failedJob = (id: string) => until(async () => {
      const j = await w.client.getJob(id);
      if (!j || (await j.getState()) !== 'failed') return undefined;
      return w.client.getJob(id);
    });

    it('stops a running job, which fails Cancelled without a retry and leaves nothing', async () => {
      const id = await w.client.store({ key: 'slow/one', source: inline('x'.repeat(100)) }, { attempts: 5 });
      await until(() => hanging.started.includes('slow/one'));
      expect(await w.client.cancel(id)).toBe('cancelling');
      await expect(w.client.result(id, { timeoutMs: 15_000 })).rejects.toMatchObject({ code: 'Cancelled' });
      const job = (await w.client.getJob(id))!;
      expect(await job.getState()).toBe('failed');
      expect(job.attemptsMade).toBe(1);
      expect(job.failedReason).toMatch(/^Cancelled: /);
      await expect(hanging.driver.stat('slow/one')).rejects.toMatchObject({ code: 'NotFound' });
      // The worker goes on serving other jobs.
      await expect(w.client.run('store', { key: 'fast', source: inline('ok') }, { timeoutMs: 15_000 })).resolves.toMatchObject({ key: 'fast', size: 2 });
      // Cancelling what already finished changes nothing.
      expect(await w.client.cancel(id)).toBe('finished');
      // The request is forgotten once it took effect: an id reused later is not cancelled by it.
      const conn = redisConnection(redis.url, 'worker');
      try {
        expect(await conn.exists(w.client.queue.toKey(`cancelled:${id}`))).toBe(0);
      } finally {
        await conn.quit();
      }
    });

    it("stops a flow's children with their parent: the running one by message, the waiting ones before they start", async () => {
      const conn = redisConnection(redis.url, 'worker');
      const flows = new FlowProducer({ connection: conn, prefix: 'bull' });
      try {
        const childOpts = { attempts: 3, ignoreDependencyOnFailure: true };
        const flow = await flows.add({
          name: 'store', queueName: w.queue, data: { key: 'parent', source: inline('p') }, opts: { attempts: 3 },
          children: [
            { name: 'store', queueName: w.queue, data: { key: 'slow/child-1', source: inline('1') }, opts: childOpts },
            { name: 'store', queueName: w.queue, data: { key: 'slow/child-2', source: inline('2') }, opts: childOpts },
          ],
        });
        const parentId = flow.job.id!;
        // Concurrency 1: one child runs (and hangs), the other waits behind it.
        await until(() => hanging.started.some((k) => k.startsWith('slow/child-')));
        expect(await w.client.cancel(parentId)).toBe('cancelling');
        const children = flow.children!.map((c) => c.job.id!);
        for (const child of children) {
          const job = await failedJob(child);
          expect(job.failedReason).toMatch(/^Cancelled: /);
          expect(job.attemptsMade).toBe(1);
        }
        // Only one child ever started its write: the second saw its parent's mark first.
        expect(hanging.started.filter((k) => k.startsWith('slow/child-'))).toHaveLength(1);
        // With its children done, the parent runs, sees its own mark, and fails Cancelled too.
        const parent = await failedJob(parentId);
        expect(parent.failedReason).toMatch(/^Cancelled: /);
        await expect(hanging.driver.stat('parent')).rejects.toMatchObject({ code: 'NotFound' });
      } finally {
        await flows.close();
        await conn.quit();
      }
    });
  });
});
