import { Job, Queue, WaitingChildrenError, type JobsOptions } from 'bullmq';
import type { Counters, FanOut, FanOutLimits } from '../payload.js';
import type { RedisClient } from './connection.js';

/** @defaultValue of FanOutLimits: the "a thousand keys or a GiB" per chunk. */
export const DEFAULT_FANOUT_LIMITS: FanOutLimits = { chunkKeys: 1000, chunkBytes: 1 << 30, window: 16, lanes: 8 };

/** A parent's checkpoint and tally outlive it by at most this (a parent removed by retention leaves them). */
const STATE_TTL_S = 7 * 24 * 3600;

/**
 * Adds a child's counters once per child id (a retried or restarted chunk reports again, and is
 * not counted twice), refreshes the expiry, and returns the whole state hash for the progress.
 * KEYS: state hash, reported-children set. ARGV: ttl, child id, then name/value pairs.
 */
const REPORT = `
if redis.call('SADD', KEYS[2], ARGV[2]) == 1 then
  for i = 3, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], 't.' .. ARGV[i], ARGV[i + 1]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return redis.call('HGETALL', KEYS[1])`;

/** Chunks are retried like any job; a chunk that fails for good is only counted by its parent. */
const CHILD_OPTIONS: JobsOptions = {
  attempts: 5,
  backoff: { type: 'exponential', delay: 1_000, jitter: 0.5 },
  // Its result stays in the parent's processed hash and its reason in the parent's failed hash:
  // a finished chunk leaves that small summary, not its keys.
  removeOnComplete: true,
  removeOnFail: true,
  ignoreDependencyOnFailure: true,
};

/** Splits a state hash (HGETALL's flat array) into checkpoint fields and tally counters. */
function splitState(flat: string[]): { checkpoint: Record<string, string>; tally: Counters } {
  const checkpoint: Record<string, string> = {};
  const tally: Counters = {};
  for (let i = 0; i + 1 < flat.length; i += 2) {
    const [k, v] = [flat[i]!, flat[i + 1]!];
    if (k.startsWith('t.')) tally[k.slice(2)] = Number(v);
    else if (k.startsWith('cp.')) checkpoint[k.slice(3)] = v;
  }
  return { checkpoint, tally };
}

/** What a parent's progress shows: the tally of finished chunks and how many keys it listed so far. */
function progressOf(flat: string[]): object {
  const { checkpoint, tally } = splitState(flat);
  return { ...tally, listed: Number(checkpoint.listed ?? 0), listingDone: checkpoint.done === '1' };
}

/**
 * The FanOut of one running BullMQ job: children added with `parent` (flows), parked with
 * `moveToWaitingChildren`, failed children ignored (`ignoreDependencyOnFailure`) so one bad chunk
 * never fails the whole run. State beside the job lives at `<prefix>:<queue>:<id>:fanout` (same
 * hash slot as the job under a hash-tagged prefix).
 */
export function bullFanOut(queue: Queue, connection: RedisClient, job: Job, token: string | undefined, limits: FanOutLimits): FanOut {
  const id = String(job.id);
  const stateKey = (of: string) => `${job.queueQualifiedName}:${of}:fanout`;
  const seenKey = (of: string) => `${job.queueQualifiedName}:${of}:fanout-seen`;
  const parentId = job.parent?.id;
  return {
    limits,
    parentId,
    async addChild(name, childId, data) {
      const existing = await Job.fromId(queue, childId);
      if (existing) return { existed: true, data: existing.data as unknown };
      await queue.add(name, data, { ...CHILD_OPTIONS, jobId: childId, parent: { id, queue: job.queueQualifiedName } });
      return { existed: false, data };
    },
    async pending() {
      const counts = await job.getDependenciesCount({ unprocessed: true });
      return counts.unprocessed ?? 0;
    },
    async children() {
      const [values, failures] = await Promise.all([job.getChildrenValues(), job.getIgnoredChildrenFailures()]);
      return { completed: Object.values(values), failed: Object.values(failures) };
    },
    async waitForChildren() {
      if (!token) throw new Error('waitForChildren needs the job lock token');
      if (await job.moveToWaitingChildren(token)) throw new WaitingChildrenError();
    },
    async removePending() {
      await job.removeUnprocessedChildren();
    },
    async checkpoint() {
      return splitState(await connection.hgetall(stateKey(id)).then((h) => Object.entries(h).flat())).checkpoint;
    },
    async setCheckpoint(fields) {
      const flat = Object.entries(fields).flatMap(([k, v]) => [`cp.${k}`, v]);
      if (flat.length === 0) return;
      await connection.multi().hset(stateKey(id), ...flat).expire(stateKey(id), STATE_TTL_S).exec();
    },
    async tally() {
      return splitState(await connection.hgetall(stateKey(id)).then((h) => Object.entries(h).flat())).tally;
    },
    async report(counters) {
      if (!parentId) return;
      const args = Object.entries(counters).flatMap(([k, v]) => [k, String(Math.trunc(v))]);
      const flat = (await connection.eval(REPORT, 2, stateKey(parentId), seenKey(parentId), STATE_TTL_S, id, ...args)) as string[];
      // Advisory: a parent already gone (cancelled, removed) has no progress to move.
      const parent = await Job.fromId(queue, parentId).catch(() => undefined);
      await parent?.updateProgress(progressOf(flat)).catch(() => {});
    },
    async progress(value) {
      await job.updateProgress(value as Record<string, unknown>);
    },
    async clear() {
      await connection.del(stateKey(id), seenKey(id));
    },
  };
}
