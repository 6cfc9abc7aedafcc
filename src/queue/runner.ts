import { UnrecoverableError, WaitingChildrenError, type Job } from 'bullmq';
import type { Logger } from 'pino';
import { JOBS, type JobType } from '../../jobs/index.js';
import { ErrorCode, StorageError, classifyCommon, isRetryable } from '../errors.js';
import type { Bucket } from '../storage/bucket.js';
import type { Staging } from '../staging.js';
import { parsePayload, type FanOut, type JobDeps, type Locks } from '../payload.js';

export interface RunnerDeps {
  buckets: ReadonlyMap<string, Bucket>;
  staging: Staging;
  log: Logger;
  limits: { maxInlineBytes: number };
  /** Named locks across worker processes (src/queue/lock.ts); jobs that need one fail without it. */
  locks?: Locks;
  /** Least time between two progress updates sent to Redis. @defaultValue 1000 */
  progressIntervalMs?: number;
}

/**
 * Runs one BullMQ job: validates its payload, calls its handler, and maps the outcome. This is the
 * one place errors become retry decisions: permanent codes become UnrecoverableError (no retry),
 * Transient and Unknown are rethrown for BullMQ's backoff. The code leads every failed reason.
 */
export async function runJob(job: Job, deps: RunnerDeps, signal: AbortSignal, fanout?: FanOut): Promise<unknown> {
  const started = Date.now();
  const log = deps.log.child({ jobId: job.id, job: job.name, attempt: job.attemptsMade + 1 });
  let bytes = 0;
  const progress = throttledProgress(job, deps.progressIntervalMs ?? 1000, (n) => { bytes = n; });
  try {
    const type = (JOBS as Record<string, JobType | undefined>)[job.name];
    if (!type) throw new StorageError(ErrorCode.InvalidInput, `name: unknown job type "${job.name}" (expected one of ${Object.keys(JOBS).join(', ')})`);
    const payload = parsePayload(type.payload, job.data);
    log.info('job started');
    const result = await (type.handle as (p: unknown, d: JobDeps) => Promise<unknown>)(payload, {
      bucket: (name) => {
        const b = deps.buckets.get(name);
        if (!b) throw new StorageError(ErrorCode.InvalidInput, `backend: no backend named "${name}" is configured`);
        return b;
      },
      staging: deps.staging,
      log,
      signal,
      progress: progress.update,
      enqueuedAt: job.timestamp,
      jobId: String(job.id),
      limits: deps.limits,
      ...(deps.locks ? { locks: deps.locks } : {}),
      ...(fanout ? { fanout } : {}),
    });
    // Before the job completes, so its stored progress is final by the time `completed` is seen.
    await progress.flush();
    log.info({ ms: Date.now() - started, bytes }, 'job completed');
    return result;
  } catch (err) {
    await progress.flush();
    // A parent parked until its children finish (FanOut.waitForChildren): BullMQ's own signal, not a failure.
    if (err instanceof WaitingChildrenError) {
      log.info({ ms: Date.now() - started }, 'job waiting for its children');
      throw err;
    }
    const mapped = toBullError(err);
    if (signal.aborted) {
      // Cancelled: by a forced stop (the worker hands it back, see stopWorker), or because its lock
      // was lost (another worker runs it now).
      log.warn({ ms: Date.now() - started, bytes, err, reason: String(signal.reason) }, 'job cancelled');
      throw mapped;
    }
    const level = mapped instanceof UnrecoverableError ? 'error' : 'warn';
    log[level]({ ms: Date.now() - started, bytes, err, retry: !(mapped instanceof UnrecoverableError) }, 'job failed');
    throw mapped;
  }
}

/** An error as BullMQ should see it: message `<Code>: ...`, UnrecoverableError unless the code can heal. */
export function toBullError(err: unknown): Error {
  const code = err instanceof StorageError ? err.code : classifyCommon(err) ?? ErrorCode.Unknown;
  const message = err instanceof StorageError ? err.message : `${code}: ${err instanceof Error ? err.message : String(err)}`;
  if (isRetryable(code)) {
    const e = new Error(message, { cause: err });
    e.name = code;
    return e;
  }
  return new UnrecoverableError(message);
}

/** How long a job's end waits for its last progress update to reach Redis. */
const FLUSH_WAIT_MS = 2_000;

interface Throttled {
  update(done: number, total?: number): void;
  /** Sends the latest update if the throttle held it back; resolves once it reached Redis (or failed). */
  flush(): Promise<void>;
}

/**
 * At most one update per `intervalMs` reaches Redis, and the latest one always does: an update
 * held back is sent by a timer when the interval is over, or by `flush` when the job ends, so a
 * job's stored progress is its last reported one.
 */
export function throttledProgress(job: Pick<Job, 'updateProgress'>, intervalMs: number, seen: (n: number) => void): Throttled {
  let last = -Infinity;
  let pending: { bytes: number; total?: number } | undefined;
  let timer: NodeJS.Timeout | undefined;
  // The update on its way to Redis, until it settles: a job that reported nothing, or whose last
  // update is already stored (most small jobs), ends without a timer or an await.
  let inFlight: Promise<void> | undefined;
  const send = () => {
    if (timer) clearTimeout(timer);
    timer = undefined;
    if (!pending) return;
    const value = pending;
    pending = undefined;
    last = Date.now();
    // Progress is advisory: a failed update must never fail the transfer. Updates go out one
    // after the other on one connection, so Redis keeps the newest.
    const sent: Promise<void> = job.updateProgress(value).catch(() => {}).then(() => { if (inFlight === sent) inFlight = undefined; });
    inFlight = sent;
  };
  return {
    update(done, total) {
      seen(done);
      pending = { bytes: done, ...(total === undefined ? {} : { total }) };
      const wait = last + intervalMs - Date.now();
      if (wait <= 0 || done === total) send();
      else timer ??= setTimeout(send, wait);
    },
    async flush() {
      send();
      if (!inFlight) return;
      // Bounded: with Redis away the update would wait for it, and a cancelled job must not.
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([inFlight, new Promise<void>((r) => { timer = setTimeout(r, FLUSH_WAIT_MS); })]);
      clearTimeout(timer);
    },
  };
}
