import { Job, Queue, WaitingChildrenError, type JobsOptions } from 'bullmq';
import type { Counters, FanOut, FanOutLimits } from '../payload.js';
import type { RedisClient } from './connection.js';

/** A parent's checkpoint and tally outlive it by at most this (a parent removed by retention leaves them). */
const STATE_TTL_S = 7 * 24 * 3600;

/**
 * Adds a child's counters once per child id (a retried or restarted chunk reports again, and is
 * not counted twice), refreshes the expiry, and sets the parent's progress to the new tally in the
 * same script, so reports from chunks finishing at once on several workers can never store or
 * announce an older tally after a newer one. The progress write is BullMQ's own updateProgress
 * script (updateProgress-3.lua: HSET progress, XADD a progress event, capped at the queue's
 * maxLenEvents), inlined for that atomicity; a parent already gone gets none. Returns the state
 * hash as it stands after the report, so the reporting chunk sees the tally its report made.
 * KEYS: state hash, reported-children set, parent job hash, events stream, queue meta.
 * ARGV: ttl, child id ('' for the parent itself: its counters are only created, at 0), parent id,
 * then name/value pairs.
 */
const REPORT = `
if ARGV[2] == '' then
  for i = 4, #ARGV, 2 do redis.call('HSETNX', KEYS[1], 't.' .. ARGV[i], ARGV[i + 1]) end
elseif redis.call('SADD', KEYS[2], ARGV[2]) == 1 then
  for i = 4, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], 't.' .. ARGV[i], ARGV[i + 1]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
local flat = redis.call('HGETALL', KEYS[1])
if redis.call('EXISTS', KEYS[3]) == 1 then
  local p = { listed = 0, listingDone = false }
  for i = 1, #flat, 2 do
    local k, v = flat[i], flat[i + 1]
    if string.sub(k, 1, 2) == 't.' then p[string.sub(k, 3)] = tonumber(v)
    elseif k == 'cp.listed' then p.listed = tonumber(v)
    elseif k == 'cp.done' then p.listingDone = (v == '1') end
  end
  local data = cjson.encode(p)
  local maxEvents = redis.call('HGET', KEYS[5], 'opts.maxLenEvents') or 10000
  redis.call('HSET', KEYS[3], 'progress', data)
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxEvents, '*', 'event', 'progress', 'jobId', ARGV[3], 'data', data)
end
return flat`;

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
  const tallyScript = async (of: string, from: string, counters: Counters) => {
    const args = Object.entries(counters).flatMap(([k, v]) => [k, String(Math.trunc(v))]);
    const q = job.queueQualifiedName;
    return await connection.eval(REPORT, 5, stateKey(of), seenKey(of), `${q}:${of}`, `${q}:events`, `${q}:meta`, STATE_TTL_S, from, of, ...args) as string[];
  };
  const stateOf = async (of: string) => splitState(await connection.hgetall(stateKey(of)).then((h) => Object.entries(h).flat()));
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
    async removePendingSiblings() {
      // BullMQ's script skips locked (running) children, this chunk among them.
      const parent = parentId ? await Job.fromId(queue, parentId) : undefined;
      await parent?.removeUnprocessedChildren();
    },
    async checkpoint() {
      return (await stateOf(id)).checkpoint;
    },
    async setCheckpoint(fields) {
      const flat = Object.entries(fields).flatMap(([k, v]) => [`cp.${k}`, v]);
      if (flat.length === 0) return;
      await connection.multi().hset(stateKey(id), ...flat).expire(stateKey(id), STATE_TTL_S).exec();
    },
    async tally() {
      return (await stateOf(id)).tally;
    },
    async report(counters) {
      return parentId ? splitState(await tallyScript(parentId, id, counters)).tally : {};
    },
    async publish(counters) {
      await tallyScript(id, '', counters);
    },
    async progress(value) {
      await job.updateProgress(value as Record<string, unknown>);
    },
    async clear() {
      await connection.del(stateKey(id), seenKey(id));
    },
  };
}
