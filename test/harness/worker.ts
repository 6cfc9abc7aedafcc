import { randomUUID } from 'node:crypto';
import type { Worker } from 'bullmq';
import { pino } from 'pino';
import { redisConnection, type RedisClient } from '../../src/queue/connection.js';
import { RedisLocks } from '../../src/queue/lock.js';
import type { JobHooks } from '../../src/queue/job-hooks.js';
import type { Retention } from '../../src/queue/retention.js';
import type { FanOutLimits } from '../../src/payload.js';
import { StevedoreClient } from '../../src/queue/client.js';
import { startWorker } from '../../src/queue/worker.js';
import type { Bucket } from '../../src/storage/bucket.js';
import { Staging } from '../../src/staging.js';

export interface InProcessWorker {
  queue: string;
  client: StevedoreClient;
  worker: Worker;
  staging: Staging;
  close(): Promise<void>;
}

/** A worker and a client on a fresh queue name, in this process, against real Redis and real backends. */
export async function inProcessWorker(redisUrl: string, buckets: Map<string, Bucket>, stagingDir: string, opts: { concurrency?: number; maxInlineBytes?: number; prefix?: string; lockDurationMs?: number; retention?: Retention; progressIntervalMs?: number; hooks?: JobHooks[]; queue?: string; metricsDataPoints?: number; fanout?: Partial<FanOutLimits> } = {}): Promise<InProcessWorker> {
  const queue = opts.queue ?? `test-${randomUUID().slice(0, 8)}`;
  const connection: RedisClient = redisConnection(redisUrl, 'worker');
  const staging = new Staging(stagingDir);
  const worker = startWorker(connection, { queue, prefix: opts.prefix ?? 'bull', concurrency: opts.concurrency ?? 4, stalledIntervalMs: 5_000, ...(opts.lockDurationMs ? { lockDurationMs: opts.lockDurationMs } : {}), ...(opts.retention ? { retention: opts.retention } : {}), ...(opts.hooks ? { hooks: opts.hooks } : {}), ...(opts.metricsDataPoints ? { metricsDataPoints: opts.metricsDataPoints } : {}), ...(opts.fanout ? { fanout: opts.fanout } : {}) }, {
    buckets, staging, log: pino({ level: 'silent' }), limits: { maxInlineBytes: opts.maxInlineBytes ?? 1 << 20 }, progressIntervalMs: opts.progressIntervalMs ?? 0,
    locks: new RedisLocks(connection, { prefix: opts.prefix ?? 'bull', queue, ...(opts.lockDurationMs ? { ttlMs: opts.lockDurationMs } : {}) }),
  });
  await worker.waitUntilReady();
  const client = new StevedoreClient({ redisUrl, queue, prefix: opts.prefix ?? 'bull', defaultJobOptions: { backoff: { type: 'exponential', delay: 50, jitter: 0.5 } } });
  return {
    queue, client, worker, staging,
    async close() {
      await client.close();
      await worker.close();
      await connection.quit().catch(() => {});
    },
  };
}
