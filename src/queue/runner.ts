import { UnrecoverableError, type Job } from 'bullmq';
import type { Logger } from 'pino';
import { JOBS, type JobName } from '../../jobs/index.js';
import { ErrorCode, StorageError, classifyCommon, isRetryable } from '../errors.js';
import type { Bucket } from '../storage/bucket.js';
import type { Staging } from '../staging.js';
import { parsePayload, type JobDeps, type Locks } from '../payload.js';

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
export async function runJob(job: Job, deps: RunnerDeps, signal: AbortSignal): Promise<unknown> {
  const started = Date.now();
  const log = deps.log.child({ jobId: job.id, job: job.name, attempt: job.attemptsMade + 1 });
  let bytes = 0;
  try {
    const type = (JOBS as Record<string, (typeof JOBS)[JobName] | undefined>)[job.name];
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
      progress: throttledProgress(job, deps.progressIntervalMs ?? 1000, (n) => { bytes = n; }),
      enqueuedAt: job.timestamp,
      jobId: String(job.id),
      limits: deps.limits,
      ...(deps.locks ? { locks: deps.locks } : {}),
    });
    log.info({ ms: Date.now() - started, bytes }, 'job completed');
    return result;
  } catch (err) {
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

function throttledProgress(job: Job, intervalMs: number, seen: (n: number) => void): (done: number, total?: number) => void {
  let last = 0;
  return (done, total) => {
    seen(done);
    const now = Date.now();
    if (now - last < intervalMs && done !== total) return;
    last = now;
    // Progress is advisory: a failed update must never fail the transfer.
    job.updateProgress({ bytes: done, ...(total === undefined ? {} : { total }) }).catch(() => {});
  };
}
