import { Queue } from 'bullmq';
import type { FastifyPluginAsync } from 'fastify';
import { metricsKey } from '../metrics/catalog.js';
import { renderQueues, renderTotals } from '../metrics/render.js';
import { waitForRedis, type RedisClient } from '../queue/connection.js';
import { webhookQueueName } from '../webhooks/publisher.js';

export interface MetricsPluginOptions {
  /** The public queue's name (STEVEDORE_QUEUE). */
  queue: string;
  /** BullMQ's key prefix (STEVEDORE_PREFIX). Not `prefix`: Fastify takes that as the routes' URL prefix. */
  keyPrefix: string;
  /** A new Redis connection (producer role: a scrape fails fast when Redis is away); closed by the plugin. */
  connect: () => RedisClient;
}

/**
 * `GET /metrics`: Prometheus text. The workers' counters (jobs, durations, bytes, mismatches,
 * retries, lock losses, webhook deliveries) come from their Redis totals, and queue depth by state
 * plus BullMQ's completed/failed counts from `exportPrometheusMetrics`, for the public queue and
 * the webhook queue. A scrape costs Redis one HGETALL and a few O(1) counts per queue, whatever
 * the number of jobs: no KEYS, no SCAN.
 */
export const metricsPlugin: FastifyPluginAsync<MetricsPluginOptions> = async (app, opts) => {
  const redis = opts.connect();
  redis.on('error', () => {});
  const queues = [opts.queue, webhookQueueName(opts.queue)].map((name) => {
    const q = new Queue(name, { connection: redis, prefix: opts.keyPrefix });
    q.on('error', () => {});
    return q;
  });
  const key = metricsKey(opts.keyPrefix, opts.queue);
  app.addHook('onClose', async () => {
    await Promise.all(queues.map((q) => q.close()));
    await redis.quit().catch(() => redis.disconnect());
  });

  app.get('/metrics', async (_req, reply) => {
    // A producer connection has no offline queue: a scrape right after start (or while Redis is
    // away) waits a little for it rather than failing at once, and never hangs.
    if (redis.status !== 'ready') await waitForRedis(redis, 2_000);
    const [totals, depth] = await Promise.all([redis.hgetall(key).then(renderTotals), renderQueues(queues)]);
    return reply.type('text/plain; version=0.0.4; charset=utf-8').send(`${totals.endsWith('\n') ? totals : `${totals}\n`}${depth}`);
  });
};
