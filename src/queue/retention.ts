import type { KeepJobs } from 'bullmq';

/**
 * How many finished jobs a queue keeps (STEVEDORE_KEEP_COMPLETED / STEVEDORE_KEEP_FAILED). One
 * piece for the public queue and every internal `<queue>-<purpose>` queue, so none grows without
 * bound under `noeviction` whoever produced its jobs.
 */
export interface Retention {
  /** @defaultValue 10000 */
  keepCompleted: number;
  /** @defaultValue 10000 */
  keepFailed: number;
}

/**
 * A completed job's hash is about 1 KB, a failed one with its stack traces a few KB: 10,000 of
 * each is tens of MB at most, and enough for a dashboard or `GET /jobs/<id>` to still find the
 * result of anything finished in the last minutes at full speed (about 2,500 jobs/s here).
 */
export const DEFAULT_RETENTION: Readonly<Retention> = Object.freeze({ keepCompleted: 10_000, keepFailed: 10_000 });

/**
 * Worker options. BullMQ (6.7, `getKeepJobs` in redis-queue-backend.js) uses the worker's
 * removeOnComplete / removeOnFail only for a job whose own options have no removeOn* at all; a
 * job that carries its own (the project's client always does) keeps its producer's choice. Either
 * way the count trims the whole finished set when that job finishes, oldest first.
 */
export function workerRetention(r: Retention): { removeOnComplete: KeepJobs; removeOnFail: KeepJobs } {
  return { removeOnComplete: { count: r.keepCompleted }, removeOnFail: { count: r.keepFailed } };
}

/**
 * Job options for the project's own producers: the same counts, plus an age (a day for results,
 * a week for failures) so a quiet queue does not keep old jobs forever either.
 */
export function jobRetention(r: Retention): { removeOnComplete: KeepJobs; removeOnFail: KeepJobs } {
  return {
    removeOnComplete: { age: 24 * 3600, count: r.keepCompleted },
    removeOnFail: { age: 7 * 24 * 3600, count: r.keepFailed },
  };
}
