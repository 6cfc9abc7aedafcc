import { z } from 'zod';
import type { Logger } from 'pino';
import { ErrorCode, StorageError } from './errors.js';
import type { Bucket } from './storage/bucket.js';
import { validateKey, validatePrefix, validateSha256 } from './storage/keys.js';
import type { Staging } from './staging.js';

/** Everything a job handler may use. Handlers never read process.env, touch Redis or decide retries. */
export interface JobDeps {
  /** The named backend; unknown names are InvalidInput. */
  bucket(name: string): Bucket;
  staging: Staging;
  log: Logger;
  signal: AbortSignal;
  /** Bytes done (and total when known), throttled by the runner before it reaches Redis. */
  progress(done: number, total?: number): void;
  /** When the job was first enqueued (ms since epoch): the same on every attempt. */
  enqueuedAt: number;
  /** The BullMQ job id: the same on every attempt and every redelivery of one job. */
  jobId: string;
  limits: { maxInlineBytes: number };
  /** Named locks shared by every worker process (Redis); repack-session serialises a session with them. */
  locks?: Locks;
  /** The job's children on its own queue (BullMQ flows), for jobs that spread their work (migrate, verify). */
  fanout?: FanOut;
}

/** How a fanned-out job cuts and paces its work; from the worker's configuration. */
export interface FanOutLimits {
  /** Keys per chunk. @defaultValue 250 */
  chunkKeys: number;
  /** Bytes per chunk (a chunk ends at the object that reaches it). @defaultValue 64 MiB */
  chunkBytes: number;
  /** Chunks of one parent in flight (waiting or active) at once. @defaultValue 16 */
  window: number;
  /** Objects one chunk works on at once. @defaultValue 8 */
  lanes: number;
  /** Objects finished before a migration may abort for failing (more than half of them). @defaultValue 1000 */
  abortAfter: number;
}

/** Counters summed over a parent's chunks (the results' numeric fields). */
export type Counters = Record<string, number>;

/**
 * A job's own children (chunk jobs) and the small state a parent keeps while it spreads its work
 * over every worker: the narrow view of BullMQ flows a handler may use (src/queue/fanout.ts).
 */
export interface FanOut {
  readonly limits: FanOutLimits;
  /** The parent's id when this job is a child, else undefined. */
  readonly parentId: string | undefined;
  /**
   * Adds child `id` (deterministic, so a restarted parent never adds one twice) of internal job
   * type `name` with this job as its parent; a failed child does not fail the parent. When a job
   * with that id exists already nothing is added and its data is returned.
   */
  addChild(name: string, id: string, data: object): Promise<{ existed: boolean; data: unknown }>;
  /** Children not finished yet. */
  pending(): Promise<number>;
  /** Results of the children that completed, and reasons of the ones that failed for good. */
  children(): Promise<{ completed: unknown[]; failed: string[] }>;
  /**
   * Returns when no child is pending. Otherwise parks this job until they all finished (the worker
   * slot is freed) by throwing an error the runner hands to BullMQ; the handler is then called again.
   */
  waitForChildren(): Promise<void>;
  /** Removes the children that have not started (a cancelled or aborted parent). */
  removePending(): Promise<void>;
  /** The parent's own checkpoint (string fields), kept in Redis beside the job while it runs. */
  checkpoint(): Promise<Record<string, string>>;
  setCheckpoint(fields: Record<string, string>): Promise<void>;
  /** The sum of what children reported so far (see report). */
  tally(): Promise<Counters>;
  /**
   * A child adds its counters to its parent's tally, once per child id whatever its retries, and
   * the parent's progress becomes the new tally (so it moves as chunks finish). Returns the
   * parent's tally as it stands after this report (empty for a job without a parent).
   */
  report(counters: Counters): Promise<Counters>;
  /** A child removes its parent's children that have not started (its siblings); running ones stay. */
  removePendingSiblings(): Promise<void>;
  /**
   * Sets this (parent) job's progress to its tally and listing state, in the same step as the
   * reports so an older tally is never stored after a newer one; `counters` are created at 0.
   */
  publish(counters: Counters): Promise<void>;
  /** Sets this job's progress (a fanned-out job's progress is its counters, not bytes). */
  progress(value: object): Promise<void>;
  /** Deletes the checkpoint and tally (the parent is done). */
  clear(): Promise<void>;
}

/** A held lock. `signal` aborts when the lock is lost (not renewed in time, or taken over): stop before committing. */
export interface Lease {
  readonly signal: AbortSignal;
  release(): Promise<void>;
}
export interface Locks {
  /** Waits (bounded) for the lock; Transient when it stays busy, or when `signal` aborts the wait. */
  acquire(name: string, signal: AbortSignal): Promise<Lease>;
  /** Group commit: jobs waiting for a lock hand their work to its holder (absent: each job takes the lock in turn). */
  readonly group?: GroupCommit;
}

/** One job's work as queued for a lock's holder: ordered by `score` (its arrival), then by `id`'s bytes. */
export interface GroupMember {
  id: string;
  score: number;
  /** The work itself, as the holder will read it (JSON). */
  data: string;
  /** Sealed into the commit of a holder that went away: that commit may have happened. */
  unsure?: boolean;
}

/**
 * Jobs that need the same lock queue their work in Redis while they wait; whoever gets the lock
 * takes the queue, does it all at once, and hands each job its outcome (src/queue/group-commit.ts).
 */
export interface GroupCommit {
  /**
   * Queues `member`'s work under lock `lock` (queue `group`) and waits: resolves with the outcome
   * a holder recorded for it, or with a holder of its own once it has the lock (its own work is
   * then queued with the rest). When `signal` aborts, the work is withdrawn unless a holder has
   * already sealed it into a commit, in which case the outcome is awaited while that holder keeps
   * the lock. Transient when the lock stays busy with the work unclaimed for the lock's wait time.
   */
  join(lock: string, group: string, member: GroupMember, signal: AbortSignal): Promise<{ outcome: string } | { holder: GroupHolder }>;
  /**
   * Takes member `id` out of the group whatever its state, so no holder applies it, recording
   * `outcome` for it when given: only while holding `lock`.
   */
  forget(lock: string, group: string, id: string, outcome?: string): Promise<void>;
  /** Members sealed into the commit of a holder that no longer has `lock`: whether it committed them is for the caller to settle. */
  sealedOrphans(lock: string, group: string): Promise<string[]>;
}

/** The lock's holder and the members it took from the queue. Members it does not finish go back to the queue. */
export interface GroupHolder {
  readonly lease: Lease;
  /**
   * Takes up to `max` members in queue order: orphans (claimed or sealed by a holder that went
   * away) first, then a prefix of the waiting ones; its own member is among them once the prefix
   * reaches it. Resolves with its own member's outcome instead when another holder recorded one.
   */
  claim(max: number): Promise<{ outcome: string } | { members: GroupMember[] }>;
  /**
   * Right before a commit: returns the claimed members among `ids` that can no longer come (they
   * withdrew, or stopped polling: gone); when none did, the rest can no longer withdraw and wait
   * for their outcome instead.
   */
  seal(ids: readonly string[]): Promise<string[]>;
  /** The commit surely did not happen: the members may withdraw again. */
  unseal(ids: readonly string[]): Promise<void>;
  /** Records each member's outcome (kept for a while in Redis; none when empty) and lets them go. */
  finish(outcomes: ReadonlyMap<string, string>): Promise<void>;
  /** Members wait again, in place, for the lock's next holder; one that withdrew goes. */
  giveBack(ids: readonly string[]): Promise<void>;
}

const storageRule = (check: (v: string) => unknown) => (v: string, ctx: z.RefinementCtx) => {
  try {
    check(v);
  } catch (err) {
    ctx.addIssue({ code: 'custom', message: err instanceof StorageError ? err.detail : String(err) });
  }
};

export const Key = z.string().superRefine(storageRule((k) => validateKey(k)));
export const BackendName = z.string().regex(/^[A-Za-z0-9._-]{1,64}$/, 'must be a configured backend name').default('default');
export const Sha256 = z.string().superRefine(storageRule(validateSha256)).transform((s) => s.toLowerCase());
export const SiteId = z.string().regex(/^[A-Za-z0-9._-]{1,128}$/, 'must match [A-Za-z0-9._-]{1,128}').refine((s) => s !== '.' && s !== '..', 'must not be "." or ".."');
export const Metadata = z.record(z.string(), z.string());
/** A plain string prefix of keys ('' for all), checked like a key (a trailing `/` allowed). */
export const Prefix = z.string().superRefine(storageRule((v) => validatePrefix(v)));
/** A path relative to the staging directory; containment is checked by Staging when used. */
export const StagingPath = z.string().min(1).max(4096);

/** Names no payload field uses, at any depth: the shapes of prototype pollution (RELIABILITY #11). */
const FORBIDDEN_NAMES = new Set(['__proto__', 'constructor', 'prototype']);

/** The path of the first forbidden name in `v`; own keys only (JSON.parse makes `__proto__` one). */
function forbiddenName(v: unknown, path: string[] = []): string | undefined {
  if (typeof v !== 'object' || v === null || path.length > 64) return undefined;
  for (const k of Object.keys(v)) {
    if (FORBIDDEN_NAMES.has(k)) return [...path, k].join('.');
    const found = forbiddenName((v as Record<string, unknown>)[k], [...path, k]);
    if (found) return found;
  }
  return undefined;
}

/** Validates a payload; the error names every offending field, and unknown fields are refused. */
export function parsePayload<S extends z.ZodType>(schema: S, data: unknown): z.infer<S> {
  const res = schema.safeParse(data);
  if (res.success) {
    // zod drops a `__proto__` key inside records (metadata) without a word; it must not pass silently.
    const bad = forbiddenName(data);
    if (bad) throw new StorageError(ErrorCode.InvalidInput, `${bad}: "${bad.split('.').pop()!}" is not allowed as a field name`);
    return res.data;
  }
  const detail = res.error.issues
    .slice(0, 5)
    .map((i) => {
      const path = i.path.length ? i.path.map(String).join('.') : 'payload';
      if (i.code === 'unrecognized_keys') return `${path}: unknown field(s) ${i.keys.map((k) => JSON.stringify(k)).join(', ')}`;
      return `${path}: ${i.message}`;
    })
    .join('; ');
  throw new StorageError(ErrorCode.InvalidInput, detail);
}
