import { createHash } from 'node:crypto';
import { UnrecoverableError, Worker, type Job } from 'bullmq';
import type { Logger } from 'pino';
import type { RedisClient } from '../queue/connection.js';
import { workerRetention, type Retention } from '../queue/retention.js';
import { type DeliveryData, webhookQueueName } from './publisher.js';
import { nextDelay, parseRetryAfter } from './schedule.js';
import { secretKey, sign } from './signature.js';

export interface DeliveryOptions {
  queue: string;
  prefix: string;
  url: string;
  /** `whsec_...`; never logged, never stored in a job. */
  secret: string;
  /** Waits before each attempt (the first is usually 0); its length is the number of attempts. */
  scheduleMs: readonly number[];
  /** One POST's time limit. @defaultValue 15000 */
  timeoutMs?: number;
  /** @defaultValue 8 */
  concurrency?: number;
  retention: Retention;
  log: Logger;
  /** BullMQ's per-minute completed/failed counts for the webhook queue; off when unset. */
  metricsDataPoints?: number;
}

export type DeliveryResult = { status: number } | { status: 410; disabled: true } | { skipped: 'endpoint disabled' };

/** Where a 410 is remembered, per endpoint (its URL's hash, so the URL itself is not stored). */
/** After the queue's name and a `:`, which no BullMQ job id may contain, so no job's key can be this one. */
export const disabledKey = (prefix: string, queue: string): string => `${prefix}:${webhookQueueName(queue)}:endpoints:disabled`;
export const endpointHash = (url: string): string => createHash('sha256').update(url).digest('hex');

/** Carries a receiver's `retry-after` from the failed attempt to the backoff strategy. */
class DeliveryError extends Error {
  constructor(message: string, readonly retryAfterMs?: number) {
    super(message);
    this.name = 'Transient';
  }
}

/**
 * The webhook delivery worker (in each worker process): POSTs each queued message with Standard
 * Webhooks headers, signed anew at each attempt (the timestamp is the attempt's). A 2xx is
 * delivered; 410 disables the endpoint (remembered in Redis, every later message skipped); anything
 * else, a timeout or a refused connection is retried on the schedule, `retry-after` honoured.
 * Redirects are not followed: a 3xx is a failed attempt.
 */
export function startWebhookWorker(connection: RedisClient, o: DeliveryOptions): Worker<DeliveryData, DeliveryResult> {
  const key = secretKey(o.secret);
  const endpoint = endpointHash(o.url);
  const disabled = disabledKey(o.prefix, o.queue);
  const where = describeEndpoint(o.url);
  const worker = new Worker<DeliveryData, DeliveryResult>(webhookQueueName(o.queue), async (job: Job<DeliveryData>) => {
    if (await connection.hexists(disabled, endpoint)) return { skipped: 'endpoint disabled' };
    const ts = Math.floor(Date.now() / 1000);
    let res: Response;
    try {
      res = await fetch(o.url, {
        method: 'POST',
        redirect: 'manual',
        signal: AbortSignal.timeout(o.timeoutMs ?? 15_000),
        headers: {
          'content-type': 'application/json',
          'webhook-id': job.data.id,
          'webhook-timestamp': String(ts),
          'webhook-signature': sign(key, job.data.id, ts, job.data.body),
        },
        body: job.data.body,
      });
    } catch (err) {
      // The cause (ECONNREFUSED, a timeout) without the URL, which may carry a token.
      const cause = (err as { cause?: { code?: string; message?: string } }).cause;
      throw new DeliveryError(`Transient: webhook POST to ${where} failed: ${cause?.code ?? cause?.message ?? (err as Error).name}`);
    }
    await res.body?.cancel().catch(() => {});
    if (res.status >= 200 && res.status < 300) return { status: res.status };
    if (res.status === 410) {
      await connection.hset(disabled, endpoint, JSON.stringify({ at: new Date().toISOString(), webhookId: job.data.id }));
      o.log.warn({ url: where, webhookId: job.data.id }, 'webhook endpoint answered 410 Gone: disabled');
      return { status: 410, disabled: true };
    }
    throw new DeliveryError(`Transient: webhook endpoint ${where} answered ${res.status}`, parseRetryAfter(res.headers.get('retry-after')));
  }, {
    connection,
    prefix: o.prefix,
    concurrency: o.concurrency ?? 8,
    ...workerRetention(o.retention),
    ...(o.metricsDataPoints ? { metrics: { maxDataPoints: o.metricsDataPoints } } : {}),
    settings: {
      backoffStrategy: (attemptsMade: number, _type?: string, err?: Error) => nextDelay(o.scheduleMs, attemptsMade, err instanceof DeliveryError ? err.retryAfterMs : undefined),
    },
  });
  worker.on('error', (err) => o.log.error({ err }, 'webhook worker error'));
  worker.on('failed', (job, err) => {
    if (!job) return;
    const final = Boolean(job.finishedOn) || err instanceof UnrecoverableError;
    o.log[final ? 'error' : 'warn']({ webhookId: job.data.id, attempt: job.attemptsMade, err: { message: err.message } }, final ? 'webhook delivery gave up' : 'webhook delivery failed; will retry');
  });
  return worker;
}

/** For logs and failed reasons: scheme, host and path; no credentials, no query (which may hold a token). */
export function describeEndpoint(url: string): string {
  const u = new URL(url);
  return `${u.protocol}//${u.host}${u.pathname}`;
}
