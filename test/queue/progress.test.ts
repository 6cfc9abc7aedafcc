import { join } from 'node:path';
import type { Job } from 'bullmq';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { MemoryDriver } from '../../src/backends/memory.js';
import { ErrorCode, StorageError } from '../../src/errors.js';
import { Bucket } from '../../src/storage/bucket.js';
import { throttledProgress } from '../../src/queue/runner.js';
import type { Driver, PutBody } from '../../src/storage/driver.js';
import { writeRandomFile } from '../fixtures/big-file.js';
import { overrideDriver } from '../fixtures/override-driver.js';
import { tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { inProcessWorker, type InProcessWorker } from '../harness/worker.js';

const MiB = 1 << 20;
const bytesOf = (job: Job | undefined): number | undefined => (job?.progress as { bytes?: number } | undefined)?.bytes;

/**
 * A driver whose put reads `chunks` MiB of the body, then waits for `release` (if given) and fails
 * PermissionDenied: a transfer that ends before its total, whatever the job knows of the total.
 */
function failingAfter(chunks: number, release?: Promise<void>): Driver {
  return overrideDriver(new MemoryDriver(), {
    async put(key: string, body: PutBody) {
      const buf = Buffer.alloc(MiB);
      for (let i = 0; i < chunks; i++) await body.read(buf);
      await release;
      throw new StorageError(ErrorCode.PermissionDenied, 'refused by the test driver', { op: 'put', key });
    },
  });
}

// Contract: "the last update of a job is never dropped" by the runner's throttle.
describe('job progress', () => {
  let redis: TestRedis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let w: InProcessWorker | undefined;
  beforeAll(async () => {
    redis = await startRedis();
    tmp = await tempDir();
    await writeRandomFile(join(tmp.path, 'five.bin'), 5 * MiB + 123, MiB);
  });
  afterEach(async () => {
    await w?.close();
    w = undefined;
  });
  afterAll(async () => {
    await redis?.stop();
    await tmp?.remove();
  });

  it("ends at the store's last reported bytes although the throttle held them back", async () => {
    // An interval longer than the job: only the first update and the trailing one can be sent.
    w = await inProcessWorker(redis.url, new Map([['default', new Bucket(new MemoryDriver())]]), tmp.path, { progressIntervalMs: 60_000 });
    const result = await w.client.run('store', { key: 'five', source: { path: 'five.bin' } }, { timeoutMs: 20_000 });
    expect(result.size).toBe(5 * MiB + 123);
    expect(bytesOf(await w.client.getJob(await lastJobId(w)))).toBe(5 * MiB + 123);
  });

  it('ends at the bytes a failed transfer reached, short of any total', async () => {
    w = await inProcessWorker(redis.url, new Map([['default', new Bucket(failingAfter(3))]]), tmp.path, { progressIntervalMs: 60_000 });
    await expect(w.client.run('store', { key: 'five', source: { path: 'five.bin' } }, { timeoutMs: 20_000 })).rejects.toThrow(/^PermissionDenied: /);
    expect(bytesOf(await w.client.getJob(await lastJobId(w)))).toBe(3 * MiB);
  });

  it('sends a held-back update once the interval is over, while the job still runs', async () => {
    let release!: () => void;
    const released = new Promise<void>((r) => { release = r; });
    w = await inProcessWorker(redis.url, new Map([['default', new Bucket(failingAfter(2, released))]]), tmp.path, { progressIntervalMs: 300 });
    const id = await w.client.store({ key: 'five', source: { path: 'five.bin' } });
    try {
      const deadline = Date.now() + 10_000;
      let seen: number | undefined;
      while ((seen = bytesOf(await w.client.getJob(id))) !== 2 * MiB && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      expect(seen).toBe(2 * MiB);
      expect(await (await w.client.getJob(id))!.getState()).toBe('active');
    } finally {
      release();
    }
    await expect(w.client.result(id, { timeoutMs: 20_000 })).rejects.toThrow(/^PermissionDenied: /);
  });
});

/** The id of the newest job of the worker's queue. */
async function lastJobId(w: InProcessWorker): Promise<string> {
  const [job] = await w.client.queue.getJobs(['completed', 'failed'], 0, 0, false);
  return job!.id!;
}

// Most jobs report nothing (a log entry) or have their last update stored before they end: their
// end must cost no timer and no wait.
describe('throttledProgress flush', () => {
  afterEach(() => { vi.useRealTimers(); });
  it('sets no timer when nothing was reported or the last update already reached Redis, and still sends a held-back one', async () => {
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'Date'] });
    const sent: unknown[] = [];
    const p = throttledProgress({ updateProgress: async (v: unknown) => { sent.push(v); } } as Pick<Job, 'updateProgress'>, 1000, () => {});
    // Checked while the flush runs: a timer it set would be cleared again by the time it resolved.
    const idle = p.flush();
    expect(vi.getTimerCount()).toBe(0);
    await idle;
    p.update(1);
    for (let i = 0; i < 3; i++) await Promise.resolve();
    const stored = p.flush();
    expect(vi.getTimerCount()).toBe(0);
    await stored;
    // Held back by the interval: the flush sends it.
    p.update(2);
    expect(vi.getTimerCount()).toBe(1);
    await p.flush();
    expect(sent).toEqual([{ bytes: 1 }, { bytes: 2 }]);
    expect(vi.getTimerCount()).toBe(0);
  });
});
