import type { Queue } from 'bullmq';
import type { RedisClient } from './connection.js';

/**
 * Cancelling a job from any process (the CLI, the HTTP server, another worker). BullMQ's
 * `worker.cancelJob` reaches only the jobs of its own process, so a request travels two ways: a
 * mark in Redis that every worker checks before it starts a job (and a chunk checks for its parent),
 * and a pub/sub message that makes the worker running the job abort its signal. The mark closes
 * the race in which the job starts between the request and the message.
 */

/** How long a cancel mark outlives its request: longer than any job waits in a backoff. */
const MARK_TTL_S = 7 * 24 * 3600;

/** The reason an aborted signal carries when a request cancelled the job (not a stop or a lost lock). */
export const CANCEL_REASON = 'Cancelled: the job was cancelled by a request';

export type CancelOutcome =
  /** It was waiting (or delayed, or waiting for its children) and is gone. */
  | 'removed'
  /** It is running: its worker was told to stop it; it fails `Cancelled`, never retried. */
  | 'cancelling'
  /** It had already completed or failed. */
  | 'finished'
  | 'not-found';

export const cancelChannel = (queue: { toKey(type: string): string }): string => queue.toKey('cancel');
const markKey = (queue: { toKey(type: string): string }, jobId: string): string => queue.toKey(`cancelled:${jobId}`);

/** Cancels job `jobId` of `queue`, wherever it runs. */
export async function cancelJob(queue: Queue, conn: RedisClient, jobId: string): Promise<CancelOutcome> {
  const job = await queue.getJob(jobId);
  if (!job) return 'not-found';
  const state = await job.getState();
  if (state === 'completed' || state === 'failed') return 'finished';
  // Marked first: a job that starts from here on sees the mark; one already running hears the message.
  await conn.set(markKey(queue, jobId), '1', 'EX', MARK_TTL_S);
  if (state !== 'active') {
    try {
      // A migration's chunks go with it (removeChildren); the verified copies stay in the backend.
      await job.remove({ removeChildren: true });
      // Gone with its children: nothing will look for the mark, and a new job may reuse the id.
      await conn.del(markKey(queue, jobId));
      return 'removed';
    } catch {
      // It was taken by a worker in between (a locked job cannot be removed): stop it where it runs.
    }
  }
  await conn.publish(cancelChannel(queue), jobId);
  return 'cancelling';
}

/** Whether a cancel was requested for this job or for its parent (a chunk of a cancelled migration). */
export async function cancelRequested(conn: RedisClient, queue: { toKey(type: string): string }, job: { id?: string | undefined; parent?: { id?: string | undefined } | undefined }): Promise<boolean> {
  const keys = [job.id, job.parent?.id].filter((k): k is string => Boolean(k)).map((id) => markKey(queue, id));
  if (keys.length === 0) return false;
  // One key per call: under Redis Cluster a job and its parent may hash to different slots.
  const found = await Promise.all(keys.map((k) => conn.exists(k)));
  return found.some((n) => n > 0);
}

/** Forgets the request once the job failed `Cancelled` (a later job may reuse its id). */
export async function clearCancel(conn: RedisClient, queue: { toKey(type: string): string }, jobId: string): Promise<void> {
  await conn.del(markKey(queue, jobId));
}
