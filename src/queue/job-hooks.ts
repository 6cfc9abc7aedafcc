import type { Job } from 'bullmq';

/**
 * What else happens when a job of the public queue ends, beside the job itself: webhook deliveries
 * queued, counters moved. Called from the worker's events, after BullMQ recorded the outcome, and
 * never awaited by the job: a hook can neither delay nor fail the job it reports. A hook that
 * throws or rejects is logged and ignored.
 */
export interface JobHooks {
  /** The job completed (it is in the completed set, its result stored). */
  completed?(job: Job, result: unknown): void | Promise<void>;
  /** The job failed for good (no attempt left, or a permanent code): it is in the failed set. */
  failed?(job: Job, err: Error): void | Promise<void>;
  /** The attempt failed and the job will run again (backoff). */
  retried?(job: Job, err: Error): void | Promise<void>;
  /** The job's lock could not be renewed: this worker stopped its run. */
  lockLost?(jobId: string): void;
}
