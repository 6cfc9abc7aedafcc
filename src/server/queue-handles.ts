import { Queue } from 'bullmq';
import { waitForRedis, type RedisClient } from '../queue/connection.js';
import { webhookQueueName } from '../webhooks/publisher.js';

/** The public queue and its webhook queue on one connection, for the read-mostly plugins (metrics, dashboard). */
export interface QueueHandles {
  redis: RedisClient;
  /** The public queue, then `<queue>-webhooks`. */
  queues: [Queue, Queue];
  /**
   * A producer connection has no offline queue: a request right after start (or while Redis is
   * away) waits a little for it rather than failing at once, and never hangs.
   */
  ready(timeoutMs?: number): Promise<void>;
  close(): Promise<void>;
}

export function openQueueHandles(connect: () => RedisClient, queue: string, keyPrefix: string): QueueHandles {
  const redis = connect();
  redis.on('error', () => {});
  const open = (name: string) => {
    const q = new Queue(name, { connection: redis, prefix: keyPrefix });
    q.on('error', () => {});
    return q;
  };
  const queues: [Queue, Queue] = [open(queue), open(webhookQueueName(queue))];
  return {
    redis, queues,
    async ready(timeoutMs = 2_000) {
      if (redis.status !== 'ready') await waitForRedis(redis, timeoutMs);
    },
    async close() {
      await Promise.all(queues.map((q) => q.close()));
      await redis.quit().catch(() => redis.disconnect());
    },
  };
}
