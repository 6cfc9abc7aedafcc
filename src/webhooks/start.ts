import type { Logger } from 'pino';
import type { App } from '../app.js';
import type { MetricsRecorder } from '../metrics/recorder.js';
import type { JobHooks } from '../queue/job-hooks.js';
import { startWebhookWorker } from './delivery.js';
import { WebhookPublisher } from './publisher.js';
import { WebhookSweeper } from './sweep.js';

export interface Webhooks {
  /** Queues a delivery for each job's end; for the public queue's worker. */
  hooks: JobHooks;
  /**
   * Stops the sweep and taking deliveries, lets in-flight POSTs finish for up to `graceMs`, then forces the
   * delivery worker closed (a delivery cut short is delivered again, same webhook-id, once its
   * lock lapses), then closes the publisher. Bounded, so a stop never waits out a slow receiver.
   */
  close(graceMs?: number): Promise<void>;
}

/** A worker process's webhook parts, when STEVEDORE_WEBHOOK_URL is set: the publisher hooks and the delivery worker. */
export function startWebhooks(app: App, log: Logger, opts: { metrics?: MetricsRecorder; metricsDataPoints?: number } = {}): Webhooks | undefined {
  const c = app.config;
  if (!c.webhookUrl || !c.webhookSecret) return undefined;
  const publisher = new WebhookPublisher(app.connect('worker'), { queue: c.queue, prefix: c.prefix, retention: app.retention, attempts: c.webhookScheduleMs.length });
  const worker = startWebhookWorker(app.connect('worker'), {
    queue: c.queue, prefix: c.prefix, url: c.webhookUrl, secret: c.webhookSecret, scheduleMs: c.webhookScheduleMs,
    timeoutMs: c.webhookTimeoutMs, retention: app.retention, log: log.child({ component: 'webhooks' }),
    ...(opts.metricsDataPoints ? { metricsDataPoints: opts.metricsDataPoints } : {}),
  });
  // Deliveries a worker killed right after a job's end never queued.
  const sweeper = new WebhookSweeper(app.connect('worker'), publisher, { queue: c.queue, prefix: c.prefix, intervalMs: c.webhookSweepMs, graceMs: c.webhookSweepMs, log: log.child({ component: 'webhooks' }) }).start();
  const m = opts.metrics;
  if (m) {
    worker.on('completed', (_job, r) => m.inc('stevedore_webhook_deliveries_total', { outcome: 'skipped' in r ? 'skipped' : 'disabled' in r ? 'disabled' : 'delivered' }));
    worker.on('failed', () => m.inc('stevedore_webhook_deliveries_total', { outcome: 'failed' }));
  }
  return {
    hooks: publisher,
    async close(graceMs = 5_000) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([sweeper.close().catch(() => {}), new Promise<void>((r) => { setTimeout(r, graceMs).unref(); })]);
      const graceful = worker.close();
      const outcome = await Promise.race([graceful.then(() => 'closed' as const), new Promise<'late'>((r) => { timer = setTimeout(() => r('late'), graceMs); })]);
      clearTimeout(timer);
      if (outcome === 'late') await worker.close(true).catch(() => {});
      graceful.catch(() => {});
      await Promise.race([publisher.close(), new Promise<void>((r) => { setTimeout(r, graceMs).unref(); })]);
    },
  };
}
