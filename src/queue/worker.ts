import { Queue, UnrecoverableError, WaitingError, Worker } from 'bullmq';
import type { Logger } from 'pino';
import { CANCEL_REASON, cancelChannel, cancelRequested, clearCancel } from './cancel.js';
import { duplicateConnection, type RedisClient } from './connection.js';
import { DEFAULT_FANOUT_LIMITS } from '../fanout/parent.js';
import { bullFanOut } from './fanout.js';
import type { FanOutLimits } from '../payload.js';
import type { JobHooks } from './job-hooks.js';
import { DEFAULT_RETENTION, workerRetention, type Retention } from './retention.js';
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
  /** Finished jobs kept for producers that set no removeOn* of their own. @defaultValue DEFAULT_RETENTION */
  retention?: Retention;
  /** How migrate and verify cut and pace their chunks. @defaultValue DEFAULT_FANOUT_LIMITS */
  fanout?: Partial<FanOutLimits>;
  /** Told of every job's end (webhooks, metrics); never awaited by the job. */
  hooks?: readonly JobHooks[];
  /** BullMQ's per-minute completed/failed counts (`exportPrometheusMetrics`' counters); off when unset. */
  metricsDataPoints?: number;
}

/** One BullMQ worker serving the stevedore queue. Close it with `stopWorker`. */
export function startWorker(connection: RedisClient, opts: WorkerOptions, deps: RunnerDeps): Worker {
  // The jobs running here, with their parents: a cancel request names either (src/queue/cancel.ts).
  const running = new Map<string, string | undefined>();
  // Chunk jobs are added through a Queue on the worker's own connection, made on first use.
  let queue: Queue | undefined;
  const limits: FanOutLimits = { ...DEFAULT_FANOUT_LIMITS, ...opts.fanout };
  let cancels: CancelListener; // set below, once the worker exists
  // A job failing Cancelled for good: its mark has done its work (a later job may reuse the id).
  const cancelled = async (id: string): Promise<Error> => {
    await clearCancel(connection, worker, id).catch((err: unknown) => deps.log.warn({ err, jobId: id }, 'could not clear a cancel mark'));
    return new UnrecoverableError(CANCEL_REASON);
  };
  const worker: Worker = new Worker(opts.queue, async (job, token, signal) => {
    // Back to the front of the wait list, for another worker; WaitingError spends no attempt.
    const handBack = async (): Promise<never> => {
      await job.moveToWait(token);
      throw new WaitingError();
    };
    // A fetch whose blocking wait was already woken when close() began still delivers its job
    // (BullMQ does not look at `closing` again before moveToActive): a stopping worker hands such a
    // job straight back instead of starting it.
    if (worker.closing) return handBack();
    const cancel = signal ?? new AbortController().signal;
    const id = String(job.id);
    await cancels.ready;
    running.set(id, job.parent?.id);
    try {
      // Checked once it is in `running`: a request from here on reaches it by message. One that
      // came before is in `heard` (its message arrived between the fetch and now), or, for a job
      // this process could not have heard of (a chunk whose parent was cancelled while it waited,
      // a job run again after a stall or a retry), in Redis: a first run of a job without a parent
      // was waiting until just now, and a request for a waiting job removes it instead.
      const again = (job.attemptsStarted ?? 1) > 1 || job.parent !== undefined;
      if (cancels.heard(id) || (again && await cancelRequested(connection, worker, job))) throw await cancelled(id);
      queue ??= new Queue(opts.queue, { connection, prefix: opts.prefix });
      return await runJob(job, deps, cancel, bullFanOut(queue, connection, job, token, limits));
    } catch (err) {
      // Cancelled by a forced stop (stopWorker): handed back at once instead of waiting for the
      // lock to lapse.
      if (cancel.aborted && worker.closing && token) return handBack();
      // Cancelled by a request: whatever the handler made of its abort, the job fails Cancelled, for good.
      if (cancel.aborted && cancel.reason === CANCEL_REASON) throw await cancelled(id);
      throw err;
    } finally {
      running.delete(id);
    }
  }, {
    connection,
    prefix: opts.prefix,
    concurrency: opts.concurrency,
    lockDuration: opts.lockDurationMs ?? 30_000,
    stalledInterval: opts.stalledIntervalMs ?? 30_000,
    // A job that stalls (its worker died) is run again, up to this many times, before it fails.
    maxStalledCount: 3,
    ...workerRetention(opts.retention ?? DEFAULT_RETENTION),
    ...(opts.name ? { name: opts.name } : {}),
    ...(opts.metricsDataPoints ? { metrics: { maxDataPoints: opts.metricsDataPoints } } : {}),
    autorun: true,
  });
  // Without an 'error' listener a Redis hiccup would be an unhandled error event and kill the process.
  worker.on('error', (err) => deps.log.error({ err }, 'worker error'));
  // A job whose lock could not be renewed may already be another worker's (its stalled check took
  // it): stop this run instead of racing that one. Its handler sees the abort, and whatever it
  // leaves is invisible (temp files, unfinished uploads); the other run completes the job.
  worker.on('lockRenewalFailed', (jobIds: string[]) => {
    for (const id of jobIds) {
      if (worker.cancelJob(id, 'lock lost: another worker may be running this job')) deps.log.warn({ jobId: id }, 'job lock lost; job cancelled');
      for (const h of opts.hooks ?? []) callHook(() => h.lockLost?.(id), deps.log);
    }
  });
  worker.on('closed', () => { void queue?.close().catch(() => {}); });
  if (opts.hooks?.length) {
    const hooks = opts.hooks;
    worker.on('completed', (job, result) => { for (const h of hooks) callHook(() => h.completed?.(job, result), deps.log); });
    // BullMQ emits 'failed' for every failed attempt; only a job that is now in the failed set has finishedOn.
    worker.on('failed', (job, err) => {
      if (!job) return;
      for (const h of hooks) callHook(() => (job.finishedOn ? h.failed?.(job, err) : h.retried?.(job, err)), deps.log);
    });
  }
  cancels = listenForCancels(worker, connection, running, deps.log);
  return worker;
}

interface CancelListener {
  /** Settles once the subscription is in place (or failed: then jobs are checked in Redis alone). */
  ready: Promise<void>;
  /** Whether a cancel request for this id was heard lately (before its job reached this worker). */
  heard(jobId: string): boolean;
}

/** How long a heard cancel request is remembered for a job not running here (yet). */
const HEARD_MS = 60_000;

/** Aborts the jobs (and the children of jobs) that a cancel request names, on a subscriber connection of its own. */
function listenForCancels(worker: Worker, connection: RedisClient, running: Map<string, string | undefined>, log: Logger): CancelListener {
  const heard = new Map<string, number>();
  const sub = duplicateConnection(connection);
  sub.on('error', (err: Error) => log.warn({ err: { message: err.message } }, 'cancel listener connection error'));
  sub.on('message', (_channel: string, jobId: string) => {
    const now = Date.now();
    for (const [id, at] of heard) if (now - at > HEARD_MS) heard.delete(id);
    heard.set(jobId, now);
    for (const [id, parent] of running) {
      if ((id === jobId || parent === jobId) && worker.cancelJob(id, CANCEL_REASON)) log.warn({ jobId: id, requested: jobId }, 'job cancelled by request');
    }
  });
  const ready = sub.subscribe(cancelChannel(worker)).then(() => {}, (err: unknown) => log.error({ err }, 'cannot listen for cancel requests'));
  worker.on('closed', () => { sub.quit().catch(() => sub.disconnect()); });
  return { ready, heard: (id) => heard.has(id) };
}

function callHook(call: () => void | Promise<void>, log: Logger): void {
  try {
    const p = call();
    if (p) p.catch((err: unknown) => log.warn({ err }, 'job hook failed'));
  } catch (err) {
    log.warn({ err }, 'job hook failed');
  }
}

/** How long a forced stop waits for cancelled jobs to hand themselves back. */
const HAND_BACK_MS = 5_000;

/**
 * Graceful stop: take no new jobs, let active ones finish for up to `deadlineMs`. Past the
 * deadline the active jobs are cancelled (their AbortSignal fires): each stops its transfer,
 * leaving nothing visible, and moves itself back to the wait list. It returns 'forced' after at most
 * HAND_BACK_MS more (BullMQ's close() cannot be hurried once begun); a job that ignored the signal
 * is picked up by another worker once its lock lapses (stalled recovery). Every job is safe to run
 * twice.
 */
export async function stopWorker(worker: Worker, deadlineMs: number, log: Logger): Promise<'drained' | 'forced'> {
  const closing = worker.close().then(() => 'drained' as const);
  closing.catch((err: unknown) => log.warn({ err }, 'worker close failed'));
  const outcome = await Promise.race([closing, sleep(deadlineMs, 'forced' as const)]);
  if (outcome === 'forced') {
    log.warn({ deadlineMs }, 'active jobs did not finish in time; cancelling them and handing them back');
    worker.cancelAllJobs('the worker is stopping');
    await Promise.race([closing.catch(() => {}), sleep(HAND_BACK_MS, undefined)]);
  }
  return outcome;
}

function sleep<T>(ms: number, value: T): Promise<T> {
  return new Promise((resolve) => { setTimeout(() => resolve(value), ms).unref(); });
}
