import { join } from 'node:path';
import type { Worker } from 'bullmq';
import { composeApp } from '../app.js';
import type { Config } from '../config.js';
import { createLogger } from '../logger.js';
import { describeTarget } from '../queue/connection.js';
import { startWorker, stopWorker } from '../queue/worker.js';
import { MetricsRecorder } from '../metrics/recorder.js';
import { describeEndpoint } from '../webhooks/delivery.js';
import { startWebhooks } from '../webhooks/start.js';
import { redisAnswers, startPrivateRedis } from './redis.js';
import { startHttp } from './run-server.js';

export interface RunWorkerOptions {
  /** `npm start`: start a private redis-server when nothing answers at a loopback REDIS_URL. */
  embeddedRedis: boolean;
  /** Environment the SDKs' credentials come from (AZURE_STORAGE_CONNECTION_STRING...). */
  env: NodeJS.ProcessEnv;
  cwd: string;
  /** `npm start`: the HTTP server too, in this process, on the same app (and private Redis). */
  withServer?: boolean;
}

/** BullMQ's per-minute counts kept per queue: a week of minutes (MetricsTime.ONE_WEEK), about 80 KB. */
const METRICS_DATA_POINTS = 7 * 24 * 60;

/** How often a worker sweeps stale temp files (at start too). */
const SWEEP_EVERY_MS = 10 * 60_000;

/** Composition root of a worker process: config -> logger -> app (backends, staging, Redis) -> worker -> signals. */
export async function runWorker(config: Config, opts: RunWorkerOptions): Promise<Worker> {
  const log = createLogger(config.logLevel);
  let stopRedis: (() => Promise<void>) | undefined;
  let redis: { url: string } | undefined;
  if (opts.embeddedRedis && !config.redisClusterNodes && isLoopback(config.redisUrl) && !(await redisAnswers(config.redisUrl))) {
    const started = await startPrivateRedis(config.redisUrl, join(opts.cwd, 'data', 'redis'), log);
    redis = { url: started.url };
    stopRedis = started.stop;
  }
  const app = composeApp(config, { cwd: opts.cwd, env: opts.env, log, ...(redis ? { redis } : {}) });
  // A backend that cannot be opened ends the start; a private Redis must not outlive it.
  const buckets = await app.buckets().catch(async (err: unknown) => {
    await stopRedis?.().catch(() => {});
    throw err;
  });
  // Counters reach GET /metrics through Redis totals (src/metrics/recorder.ts): workers have no port.
  const metrics = new MetricsRecorder(app.connect('worker'), { prefix: config.prefix, queue: config.queue, flushMs: config.metricsFlushMs, log });
  const webhooks = startWebhooks(app, log, { metrics, metricsDataPoints: METRICS_DATA_POINTS });
  const worker = startWorker(app.connect('worker'), {
    queue: config.queue, prefix: config.prefix, concurrency: config.concurrency, lockDurationMs: config.lockDurationMs,
    stalledIntervalMs: config.stalledIntervalMs, name: config.workerName, retention: app.retention,
    fanout: { chunkKeys: config.fanoutChunkKeys, chunkBytes: config.fanoutChunkBytes, window: config.fanoutWindow, lanes: config.fanoutLanes },
    hooks: [metrics, ...(webhooks ? [webhooks.hooks] : [])], metricsDataPoints: METRICS_DATA_POINTS,
  }, { buckets, staging: app.staging, log, limits: { maxInlineBytes: config.maxInlineBytes }, locks: app.locks() });
  log.info({
    queue: config.queue, prefix: config.prefix, concurrency: config.concurrency, redis: describeTarget(app.redis),
    backends: [...buckets.entries()].map(([name, b]) => `${name}=${b.driver.kind}`), staging: config.stagingDir,
    keepCompleted: app.retention.keepCompleted, keepFailed: app.retention.keepFailed,
    ...(config.webhookUrl ? { webhooks: describeEndpoint(config.webhookUrl) } : {}),
  }, 'worker started');

  // Leftovers of killed workers, in backends and in the staging area: an hour without a change
  // means no live worker owns them. Swept at start and every SWEEP_EVERY_MS after.
  // A tick while a sweep still walks a large (NFS) tree is skipped rather than piled on top.
  let sweeping: Promise<void> | undefined;
  const sweep = () => { sweeping ??= app.sweep().finally(() => { sweeping = undefined; }); };
  sweep();
  const sweeper = setInterval(sweep, SWEEP_EVERY_MS).unref();

  const http = opts.withServer ? await startHttp(app).catch(async (err: unknown) => {
    await worker.close(true).catch(() => {});
    await app.close({ force: true });
    await stopRedis?.().catch(() => {});
    throw err;
  }) : undefined;

  let stopping = false;
  const shutdown = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    clearInterval(sweeper);
    // No new requests while the worker drains; requests in flight finish (or end with the process).
    const httpClosed = http?.close().catch((err: unknown) => log.warn({ err }, 'closing the http server failed'));
    log.info({ signal, deadlineMs: config.shutdownTimeoutMs }, 'stopping: no new jobs, waiting for active ones');
    const outcome = await stopWorker(worker, config.shutdownTimeoutMs, log);
    await httpClosed;
    // After the jobs: the last ones' deliveries are queued before the publisher closes.
    await webhooks?.close().catch((err: unknown) => log.warn({ err }, 'webhooks close failed'));
    await metrics.close();
    // A forced stop leaves handlers running: their connections are dropped, not waited for.
    await app.close({ force: outcome !== 'drained' });
    await stopRedis?.();
    log.info({ outcome }, 'stopped');
    log.flush();
    // A forced stop leaves handlers running; exiting hands their jobs back (stalled recovery).
    process.exit(0);
  };
  const onSignal = (signal: string) => () => {
    shutdown(signal).catch(async (err: unknown) => {
      log.error({ err }, 'stopping failed');
      await stopRedis?.().catch(() => {});
      log.flush();
      process.exit(1);
    });
  };
  process.once('SIGTERM', onSignal('SIGTERM'));
  process.once('SIGINT', onSignal('SIGINT'));
  return worker;
}

/** Only a Redis on this machine, without a password, is ours to start. */
function isLoopback(url: string): boolean {
  const u = new URL(url);
  return !u.password && ['127.0.0.1', 'localhost', '[::1]'].includes(u.hostname);
}
