import { join } from 'node:path';
import type { Worker } from 'bullmq';
import { FsDriver } from '../backends/fs.js';
import { openBackends } from '../backends/open.js';
import type { Config } from '../config.js';
import { createLogger, redactUrl } from '../logger.js';
import { redisConnection } from '../queue/connection.js';
import { RedisLocks } from '../queue/lock.js';
import { startWorker, stopWorker } from '../queue/worker.js';
import { Staging } from '../staging.js';
import { redisAnswers, startPrivateRedis } from './redis.js';

export interface RunWorkerOptions {
  /** `npm start`: start a private redis-server when nothing answers at a loopback REDIS_URL. */
  embeddedRedis: boolean;
  /** Environment the SDKs' credentials come from (AZURE_STORAGE_CONNECTION_STRING...). */
  env: NodeJS.ProcessEnv;
  cwd: string;
}

/** How often a worker sweeps stale temp files (at start too). */
const SWEEP_EVERY_MS = 10 * 60_000;

/** Composition root of a worker process: config -> logger -> backends -> worker -> signals. */
export async function runWorker(config: Config, opts: RunWorkerOptions): Promise<Worker> {
  const log = createLogger(config.logLevel);
  let redisUrl = config.redisUrl;
  let stopRedis: (() => Promise<void>) | undefined;
  if (opts.embeddedRedis && isLoopback(redisUrl) && !(await redisAnswers(redisUrl))) {
    const started = await startPrivateRedis(redisUrl, join(opts.cwd, 'data', 'redis'), log);
    redisUrl = started.url;
    stopRedis = started.stop;
  }
  // A backend that cannot be opened ends the start; a private Redis must not outlive it.
  const buckets = await openBackends(config.backends, { cwd: opts.cwd, AZURE_STORAGE_CONNECTION_STRING: opts.env.AZURE_STORAGE_CONNECTION_STRING })
    .catch(async (err: unknown) => {
      await stopRedis?.().catch(() => {});
      throw err;
    });
  const staging = new Staging(config.stagingDir);
  const connection = redisConnection(redisUrl, 'worker');
  connection.on('error', (err) => log.warn({ err: { message: err.message } }, 'redis connection error'));
  const worker = startWorker(connection, {
    queue: config.queue, prefix: config.prefix, concurrency: config.concurrency, lockDurationMs: config.lockDurationMs,
    stalledIntervalMs: config.stalledIntervalMs, name: config.workerName,
  }, {
    buckets, staging, log, limits: { maxInlineBytes: config.maxInlineBytes },
    locks: new RedisLocks(connection, { prefix: config.prefix, queue: config.queue, ttlMs: config.lockDurationMs }),
  });
  log.info({
    queue: config.queue, prefix: config.prefix, concurrency: config.concurrency, redis: redactUrl(redisUrl),
    backends: [...buckets.entries()].map(([name, b]) => `${name}=${b.driver.kind}`), staging: config.stagingDir,
  }, 'worker started');

  // Leftovers of killed workers, in filesystem backends and in the staging area: an hour without a
  // change means no live worker owns them. Swept at start and every SWEEP_EVERY_MS after.
  const sweep = () => {
    const sweeps: Array<[string, Promise<number>]> = [['staging', staging.sweep()]];
    for (const [name, b] of buckets) if (b.driver instanceof FsDriver) sweeps.push([`backend ${name}`, b.driver.sweep()]);
    for (const [where, done] of sweeps) {
      done.then((n) => n && log.info({ where, removed: n }, 'swept stale temp files'), (err: unknown) => log.warn({ err, where }, 'sweep failed'));
    }
  };
  sweep();
  const sweeper = setInterval(sweep, SWEEP_EVERY_MS).unref();

  let stopping = false;
  const shutdown = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    clearInterval(sweeper);
    log.info({ signal, deadlineMs: config.shutdownTimeoutMs }, 'stopping: no new jobs, waiting for active ones');
    const outcome = await stopWorker(worker, config.shutdownTimeoutMs, log);
    if (outcome === 'drained') {
      await Promise.allSettled([...buckets.values()].map((b) => b.close()));
      await connection.quit().catch(() => connection.disconnect());
    } else {
      connection.disconnect();
    }
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
