import { WaitingError, Worker } from 'bullmq';
import type { Redis } from 'ioredis';
import type { Logger } from 'pino';
import { runJob, type RunnerDeps } from './runner.js';

export interface WorkerOptions {
  queue: string;
  prefix: string;
  concurrency: number;
  /** BullMQ lock; renewed at half of it while a job runs, so long transfers never look stalled. @defaultValue 30000 */
  lockDurationMs?: number;
  /** How often this worker looks for jobs whose worker died. @defaultValue 30000 */
  stalledIntervalMs?: number;
  /** Recorded on each job as `processedBy`. */
  name?: string;
}

/** One BullMQ worker serving the stevedore queue. Close it with `stopWorker`. */
export function startWorker(connection: Redis, opts: WorkerOptions, deps: RunnerDeps): Worker {
  const worker: Worker = new Worker(opts.queue, async (job, token, signal) => {
    // A fetch whose blocking wait was already woken when close() began still delivers its job
    // (BullMQ does not look at `closing` again before moveToActive): a stopping worker hands such a
    // job straight back to the front of the wait list instead of starting it.
    if (worker.closing) {
      await job.moveToWait(token);
      throw new WaitingError();
    }
    return runJob(job, deps, signal ?? new AbortController().signal);
  }, {
    connection,
    prefix: opts.prefix,
    concurrency: opts.concurrency,
    lockDuration: opts.lockDurationMs ?? 30_000,
    stalledInterval: opts.stalledIntervalMs ?? 30_000,
    // A job that stalls (its worker died) is run again, up to this many times, before it fails.
    maxStalledCount: 3,
    ...(opts.name ? { name: opts.name } : {}),
    autorun: true,
  });
  // Without an 'error' listener a Redis hiccup would be an unhandled error event and kill the process.
  worker.on('error', (err) => deps.log.error({ err }, 'worker error'));
  return worker;
}

/**
 * Graceful stop: take no new jobs, let active ones finish for up to `deadlineMs`. Past the
 * deadline it returns 'forced' without waiting further (BullMQ's close() cannot be hurried once
 * begun): the caller then exits, the jobs' locks lapse, and another worker picks them up as stalled
 * jobs. Every job is safe to run twice.
 */
export async function stopWorker(worker: Worker, deadlineMs: number, log: Logger): Promise<'drained' | 'forced'> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<'forced'>((resolve) => { timer = setTimeout(() => resolve('forced'), deadlineMs); });
  const closing = worker.close().then(() => 'drained' as const);
  closing.catch((err: unknown) => log.warn({ err }, 'worker close failed'));
  const outcome = await Promise.race([closing, deadline]);
  clearTimeout(timer);
  if (outcome === 'forced') log.warn({ deadlineMs }, 'active jobs did not finish in time; handing them back');
  return outcome;
}
