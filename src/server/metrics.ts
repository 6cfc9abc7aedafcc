import type { FastifyPluginAsync } from 'fastify';
import { metricsKey } from '../metrics/catalog.js';
import { renderQueues, renderTotals } from '../metrics/render.js';
import type { RedisClient } from '../queue/connection.js';
import { openQueueHandles } from './queue-handles.js';

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
  const h = openQueueHandles(opts.connect, opts.queue, opts.keyPrefix);
  const key = metricsKey(opts.keyPrefix, opts.queue);
  app.addHook('onClose', () => h.close());

  app.get('/metrics', async (_req, reply) => {
    await h.ready();
    const [totals, depth] = await Promise.all([h.redis.hgetall(key).then(renderTotals), renderQueues(h.queues)]);
    return reply.type('text/plain; version=0.0.4; charset=utf-8').send(`${totals.endsWith('\n') ? totals : `${totals}\n`}${depth}`);
  });
};
