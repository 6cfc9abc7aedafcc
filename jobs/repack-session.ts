import { Transform } from 'node:stream';
import { z } from 'zod';
import { ErrorCode, StorageError, isRetryable } from '../src/errors.js';
import { BackendName, Sha256, StagingPath, type GroupHolder, type GroupMember, type JobDeps, type Lease, type Locks } from '../src/payload.js';
import { CONTENT_TYPE, GZIP_LEVEL, readArchive, rewriteArchive, type SeekableInput } from '../src/session/archive.js';
import { dirtySegments, rewriteSegments } from '../src/session/seek-edit.js';
import { ArchiveReplaced, openSeekable } from '../src/session/seek-read.js';
import { SpliceUnsupported, shouldSplice, spliceRewrite } from '../src/session/seek-splice.js';
import { OpPath, SessionId, sessionKey, sessionLockName } from '../src/session/ids.js';
import { OpFailed, SpoolNeeded, type Body, type PlanOp } from '../src/session/plan.js';
import { BatchPlan, MAX_BATCH_JOBS, Withdrawn, afterLeaving, decodeOutcome, encodeOutcome, fitBatch, type BatchJob, type Failures } from '../src/session/batch.js';
import { SealedUnsure } from '../src/queue/group-commit.js';
import type { Bucket, PutOptions } from '../src/storage/bucket.js';
import type { ObjectInfo } from '../src/storage/driver.js';

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;
/** Ops in one job: each delete is matched against the job's puts, so the count is kept modest. */
export const MAX_OPS = 1000;
/** Commits tried when writers without the lock keep replacing the archive under us. */
const MAX_COMMIT_TRIES = 4;
/** Reruns to spool removed files that hard links still name (one per such file at most). */
const MAX_SPOOL_RERUNS = 16;
/** Object metadata listing the jobs whose edits the archive holds: a redelivered job finds its own. */
export const APPLIED_META = 'applied_jobs';
/** Marks kept: every job of the largest batch (MAX_BATCH_JOBS), and those of the batch before it. */
const APPLIED_KEEP = 2 * MAX_BATCH_JOBS;
/** Metadata is 2 KB in all on every backend: the list stays well under it whatever the ids' lengths. */
const APPLIED_MAX_CHARS = 1000;
/** A batch's marks: half the list, so the batch before it keeps all of its marks (see MAX_BATCH_JOBS). */
const BATCH_MARK_CHARS = APPLIED_MAX_CHARS / 2;
const APPLIED_ID = /^[\u0021-\u007e]{1,100}$/;

const Mode = z.number().int().min(0).max(0o7777);
const Put = z.strictObject({
  op: z.literal('put'),
  path: OpPath,
  text: z.string().optional(),
  base64: z.string().regex(BASE64, 'must be base64').refine((s) => s.length % 4 === 0, 'must be padded base64').optional(),
  source: z.strictObject({ path: StagingPath }).optional(),
  mode: Mode.optional(),
  ifSha256: Sha256.optional(),
}).refine((o) => [o.text, o.base64, o.source].filter((v) => v !== undefined).length === 1, 'a put needs exactly one of text, base64 or source');
const Delete = z.strictObject({ op: z.literal('delete'), path: OpPath, ifSha256: Sha256.optional() });

export const RepackPayload = z.strictObject({
  backend: BackendName,
  session: SessionId,
  ops: z.array(z.discriminatedUnion('op', [Put, Delete])).max(MAX_OPS),
  /**
   * false: the session must exist (NotFound otherwise, checked under the session's lock), so an
   * edit racing a whole-session delete never recreates it. @defaultValue true (created if absent)
   */
  create: z.boolean().optional(),
});
export type RepackPayload = z.infer<typeof RepackPayload>;

export interface RepackResult {
  key: string;
  size: number;
  sha256: string;
  /** Entries in the archive written. */
  entries: number;
  /** Paths of deletes that found nothing. */
  missing: string[];
  /** Jobs whose edits this rewrite committed together with this one's (group commit), when more than one. */
  batched?: number;
}

/**
 * Applies ordered file edits to `sessions/<session>/session.tar.gz` (created if absent), all or
 * none, streaming the stored archive through a rewrite into a new one. Never loses an edit:
 * repacks of one session hold its lock (src/queue/lock.ts) from read to commit, and the commit is
 * conditional on the version read (ifMatch, or ifAbsent for a new session), which stores with
 * atomic conditional writes enforce and the others check by a stat first. A commit that finds
 * the archive replaced anyway (a writer without the lock) reads it again and re-applies.
 *
 * Group commit: a job waiting for the lock queues its ops in Redis (Locks.group); the job that
 * gets the lock takes the session's queued jobs and applies them in as few rewrites as their
 * bounds allow, in arrival order, then records each job's own result (or error) for it
 * (src/session/batch.ts).
 */
export async function repackSession(p: RepackPayload, d: JobDeps): Promise<RepackResult> {
  const key = sessionKey(p.session);
  if (!d.locks) throw new StorageError(ErrorCode.Unknown, 'repack-session needs the worker\'s lock service (JobDeps.locks)', { op: 'repack', key });
  // Known by its mark, so a later job reusing the id never meets this one's outcome.
  const mark = `${d.jobId}@${d.enqueuedAt}`;
  const self: BatchJob = { id: mark, mark, enqueuedAt: d.enqueuedAt, ops: await planOps(p, d), create: p.create ?? true };
  const lockName = sessionLockName(p.session);
  const group = d.locks.group;
  if (!group || !APPLIED_ID.test(self.mark)) {
    const lease = await d.locks.acquire(lockName, d.signal);
    try {
      return ownOutcome(await commitBatch(d.bucket(p.backend), key, [self], d, lease), self.id);
    } finally {
      await lease.release();
    }
  }
  const entry: QueuedRepack = { jobId: d.jobId, enqueuedAt: d.enqueuedAt, payload: p };
  const groupName = sessionGroup(p.session, p.backend);
  const joined = await group.join(lockName, groupName, { id: self.id, score: d.enqueuedAt, data: JSON.stringify(entry) }, d.signal).catch(async (err: unknown) => {
    if (!(err instanceof SealedUnsure) || !d.signal.aborted) throw err;
    return { outcome: undefined, settled: await settleCancelled(d.bucket(p.backend), key, self.mark, lockName, groupName, d, err) };
  });
  if ('settled' in joined) return joined.settled;
  if ('outcome' in joined) {
    const result = decodeOutcome<RepackResult>(joined.outcome);
    d.log.info({ key, size: result.size, batched: result.batched }, 'session repacked by the holder of its lock');
    return result;
  }
  return holdBatch(joined.holder, p, self, d);
}

/**
 * A cancelled job sealed into the commit of a holder that went away: under the session's lock (no
 * holder can apply it meanwhile) its mark says whether that holder committed it. Committed, it
 * succeeded; if not, it leaves the group so no later holder applies it, and only then ends cancelled.
 */
async function settleCancelled(bucket: Bucket, key: string, mark: string, lockName: string, groupName: string, d: JobDeps, cancelled: StorageError): Promise<RepackResult> {
  // The job's own signal has aborted: the lock's own wait bound applies.
  const lease = await d.locks!.acquire(lockName, new AbortController().signal);
  try {
    if ((await storedMarks(bucket, key)).includes(mark)) return { ...await currentArchive(bucket, key, lease.signal), missing: [] };
    await d.locks!.group!.forget(lockName, groupName, mark);
    throw cancelled;
  } finally {
    await lease.release();
  }
}

/** The group a session's repacks on one backend queue in. */
const sessionGroup = (session: string, backend: string): string => `session:${session}:${backend}`;

/**
 * For a whole-session write (upload, delete), while it holds the session's lock: the jobs sealed
 * by a holder that went away are settled first, as the next holder would (their marks say
 * whether that holder committed them). Committed ones get their outcome, so a redelivery does
 * not apply them again onto what the write leaves; the others leave the group (their jobs,
 * retried, queue again after the write).
 */
export async function settleSealed(bucket: Bucket, session: string, locks: Locks): Promise<void> {
  if (!locks.group) return;
  const lockName = sessionLockName(session);
  const group = sessionGroup(session, bucket.name);
  const orphans = await locks.group.sealedOrphans(lockName, group);
  if (orphans.length === 0) return;
  const key = sessionKey(session);
  const marks = await storedMarks(bucket, key);
  const done = new Set(orphans.filter((id) => marks.includes(id)));
  const now = done.size > 0 ? encodeOutcome({ result: { ...await currentArchive(bucket, key, new AbortController().signal), missing: [] } }) : '';
  for (const id of orphans) await locks.group.forget(lockName, group, id, done.has(id) ? now : '');
}

/** A job queued for the session's lock holder, as it waits in Redis. */
const QueuedRepack = z.strictObject({ jobId: z.string(), enqueuedAt: z.number(), payload: RepackPayload });
type QueuedRepack = z.infer<typeof QueuedRepack>;

/** Per job of a batch: its result, its own error, or nothing (it withdrew: cancelled before the commit). */
type Finished = Map<string, { result: RepackResult } | { error: StorageError } | undefined>;

/**
 * This job has the lock: it takes the session's queued jobs batch after batch (orphans first,
 * then the queue in arrival order) until its own is done, and returns its own outcome.
 */
async function holdBatch(holder: GroupHolder, p: RepackPayload, self: BatchJob, d: JobDeps): Promise<RepackResult> {
  try {
    for (;;) {
      const claimed = await holder.claim(MAX_BATCH_JOBS).catch((err: unknown) => { throw lostOr(err, holder.lease); });
      // Another holder did this job between its last poll and its taking the lock.
      if ('outcome' in claimed) return decodeOutcome<RepackResult>(claimed.outcome);
      const finished = await applyBatch(holder, claimed.members, p, self, d);
      if (finished.has(self.id)) return ownOutcome(finished, self.id);
    }
  } finally {
    await holder.lease.release();
  }
}

/**
 * One batch: the claimed jobs that fit one rewrite, applied and committed, each one's outcome
 * recorded for it. Jobs past the batch's bounds wait for the next batch; when the batch fails, its
 * jobs wait again for the next holder, except those sealed into a commit that may have happened
 * (a put that failed after its last byte, a lock lost meanwhile): they stay sealed, and the next
 * holder settles them by their marks.
 */
async function applyBatch(holder: GroupHolder, members: readonly GroupMember[], p: RepackPayload, self: BatchJob, d: JobDeps): Promise<Finished> {
  const key = sessionKey(p.session);
  const finished: Finished = new Map();
  const sealed = new Set<string>();
  const record = async (): Promise<void> => {
    const outcomes = new Map<string, string>();
    for (const [id, o] of finished) outcomes.set(id, o ? encodeOutcome(o) : '');
    await holder.finish(outcomes).catch((err: unknown) => d.log.warn({ err, key }, 'could not record the outcomes of the batch\'s jobs: they find their edits in the archive'));
  };
  // Members whose ops could not be read for a passing reason: given back, never a 15-minute Transient outcome.
  const retry: string[] = [];
  try {
    const read = await Promise.all(members.map(async (m) => {
      if (m.id === self.id) return { ...self, unsure: m.unsure ?? false };
      try {
        return await absorbed(m, p, d);
      } catch (err) {
        if (!(err instanceof StorageError) || d.signal.aborted) throw err;
        if (err.code === ErrorCode.Transient) retry.push(m.id);
        else finished.set(m.id, m.unsure ? await settledByMark(d.bucket(p.backend), key, m.id, err, holder.lease.signal) : { error: err });
        return undefined;
      }
    }));
    const { take, rest } = fitBatch(read.filter((j) => j !== undefined), { maxOps: MAX_OPS, maxInlineBytes: BATCH_INLINE_TIMES * d.limits.maxInlineBytes, maxMarkChars: BATCH_MARK_CHARS });
    await holder.giveBack([...rest.map((j) => j.id), ...retry]);
    d.log.info({ key, jobs: take.map((j) => j.id), left: rest.length }, 'applying a batch of queued repacks under the session lock');
    const seal = async (ids: readonly string[]): Promise<() => Promise<void>> => {
      const gone = await holder.seal(ids);
      if (gone.length > 0) throw new Withdrawn(gone);
      for (const id of ids) sealed.add(id);
      return async () => {
        await holder.unseal(ids);
        for (const id of ids) sealed.delete(id);
      };
    };
    for (const [id, o] of await commitBatch(d.bucket(p.backend), key, take, d, holder.lease, seal)) finished.set(id, o);
  } catch (err) {
    await holder.giveBack(members.filter((m) => m.id !== self.id && !finished.has(m.id) && !sealed.has(m.id)).map((m) => m.id)).catch(() => {});
    // This job's own entry goes (it fails here), unless its commit may have happened.
    if (!sealed.has(self.id)) finished.set(self.id, undefined);
    await record();
    throw lostOr(err, holder.lease);
  }
  await record();
  return finished;
}

/**
 * An unsure job (sealed by a holder that went away) whose ops can no longer be read, its staged
 * file gone, say: the archive's marks say whether that holder committed it; if not, its own error.
 */
async function settledByMark(bucket: Bucket, key: string, mark: string, err: StorageError, signal: AbortSignal): Promise<{ result: RepackResult } | { error: StorageError }> {
  if (!(await storedMarks(bucket, key)).includes(mark)) return { error: err };
  return { result: { ...await currentArchive(bucket, key, signal), missing: [] } };
}

/** The marks the stored archive's metadata holds (no archive: none); a stat that fails otherwise throws. */
async function storedMarks(bucket: Bucket, key: string): Promise<string[]> {
  const info = await bucket.stat(key).catch((err: unknown) => {
    if (err instanceof StorageError && err.code === ErrorCode.NotFound) return undefined;
    throw err;
  });
  return (info?.metadata[APPLIED_META] ?? '').split(' ');
}

/** Inline bytes one batch holds, in units of what one job may carry. */
const BATCH_INLINE_TIMES = 8;

/** A queued job's ops, checked as the job itself checked them (its staged files are in the shared staging area). */
async function absorbed(m: GroupMember, p: RepackPayload, d: JobDeps): Promise<BatchJob> {
  let data: unknown;
  try {
    data = JSON.parse(m.data);
  } catch {
    data = undefined;
  }
  const parsed = QueuedRepack.safeParse(data);
  if (!parsed.success || `${parsed.data.jobId}@${parsed.data.enqueuedAt}` !== m.id || parsed.data.payload.session !== p.session || parsed.data.payload.backend !== p.backend) {
    throw new StorageError(ErrorCode.InvalidInput, 'the queued repack does not match its batch', { op: 'repack', key: sessionKey(p.session) });
  }
  const { enqueuedAt, payload } = parsed.data;
  return { id: m.id, mark: m.id, enqueuedAt, ops: await planOps(payload, d), create: payload.create ?? true, unsure: m.unsure ?? false };
}

function ownOutcome(finished: Finished, id: string): RepackResult {
  const o = finished.get(id);
  if (!o) throw new StorageError(ErrorCode.Unknown, 'the batch ended without this job\'s outcome', { op: 'repack' });
  if ('error' in o) throw o.error;
  return o.result;
}

/**
 * Applies the jobs' ops in one rewrite and commit, each job all or none: a job whose ops fail
 * (a condition, a path conflict) or that must not create the session leaves the batch with its
 * error and the rest are applied again without it; one whose mark the archive holds already
 * (redelivered after a commit) is complete without applying again. `seal` runs right before
 * the commit (the last bytes held back), and returns what undoes it when the commit fails.
 * A failure judged with jobs before it that then leave (withdrawn at the seal, failed, applied
 * already), or on an archive replaced since, is judged again: only the failures of the set that
 * commits are recorded (those of a job failing alone, its staged file unreadable, at once).
 */
async function commitBatch(bucket: Bucket, key: string, jobs: readonly BatchJob[], d: JobDeps, lease: Lease, seal?: (ids: readonly string[]) => Promise<() => Promise<void>>): Promise<Finished> {
  const finished: Finished = new Map();
  const failures: Failures = new Map();
  const applied = new Set<string>();
  let active = [...jobs];
  // The archive the pass under way read, and the one the failures standing were judged on (the
  // same but for a writer without the lock: then they are judged again, as after a conflict).
  let passOn: string | undefined;
  let failuresOn: string | undefined;
  const read = (etag: string | undefined): boolean => {
    passOn = etag;
    return failures.size === 0 || etag === failuresOn;
  };
  const leave = (gone: readonly BatchJob[] | 'all'): void => {
    const before = new Set(active);
    active = afterLeaving(jobs, active, failures, gone);
    const back = active.filter((j) => !before.has(j));
    if (back.length > 0) d.log.info({ key, jobs: back.map((j) => j.id) }, 'jobs judged with a job that left the batch (or on an archive since replaced) are judged again');
  };
  const spool = new Set<string>();
  let committed: Omit<RepackResult, 'missing'> | undefined;
  let splice = true;
  for (let tries = 1, reruns = 0; active.length > 0;) {
    const batch = new BatchPlan(active);
    // Once sealed, the jobs' commit is promised to them (a later holder would apply them): only a
    // lost lease stops it, never this job's cancel.
    // (From the seal's call on: it may have landed in Redis before its reply.)
    const stop = new AbortController();
    let sealing = false;
    const follow = (s: AbortSignal, unlessSealed: boolean): void => {
      const go = (): void => { if (!unlessSealed || !sealing) stop.abort(s.reason); };
      if (s.aborted) go();
      else s.addEventListener('abort', go, { once: true });
    };
    let unseal: (() => Promise<void>) | undefined;
    follow(lease.signal, false);
    follow(d.signal, true);
    const beforeCommit = seal ? async () => {
      sealing = true;
      unseal = await seal(active.map((j) => j.id));
    } : undefined;
    const outcome = await attempt(bucket, key, batch, spool, stop.signal, d, splice, read, beforeCommit).catch(async (err: unknown) => {
      if (lease.signal.aborted) throw lease.signal.reason;
      // Refused for good (not Transient, not Unknown), the put surely did not commit: the seal is undone.
      if (unseal && err instanceof StorageError && !isRetryable(err.code)) await unseal();
      if (err instanceof SpoolNeeded && reruns < MAX_SPOOL_RERUNS && !spool.has(err.target)) return err;
      if (err instanceof OpFailed || err instanceof Withdrawn) return err;
      if (err instanceof SpliceUnsupported && splice) return err;
      throw err;
    });
    if (outcome instanceof SpliceUnsupported) {
      // Nothing was written: the same batch goes again, streamed, unsealed until then.
      await unseal?.();
      d.log.info({ key }, 'the store cannot splice; writing the edit whole');
      splice = false;
      continue;
    }
    if (outcome instanceof SpoolNeeded) {
      spool.add(outcome.target);
      reruns++;
      continue;
    }
    if (outcome instanceof OpFailed) {
      const { job, error } = batch.blame(outcome);
      leave([job]);
      if (error.alone) finished.set(job.id, { error });
      else failures.set(job, error);
      failuresOn = passOn;
      continue;
    }
    if (outcome instanceof Withdrawn) {
      for (const id of outcome.ids) finished.set(id, undefined);
      leave(active.filter((j) => outcome.ids.includes(j.id)));
      continue;
    }
    if (outcome === 'conflict') {
      await unseal?.();
      leave('all');
      if (++tries > MAX_COMMIT_TRIES) throw new StorageError(ErrorCode.Transient, `the archive was replaced by other writers ${MAX_COMMIT_TRIES} times while repacking`, { op: 'repack', key });
      d.log.warn({ key, tries }, 'session archive replaced while repacking; applying the edits again');
      continue;
    }
    if ('drop' in outcome) {
      const dropped = active.filter((j) => outcome.drop.has(j.id));
      leave(dropped);
      // Must not create the session: judged with the jobs before it (none of them creates it).
      for (const j of dropped) {
        const o = outcome.drop.get(j.id)!;
        if (o === 'applied') applied.add(j.id);
        else failures.set(j, o);
      }
      failuresOn = passOn;
      continue;
    }
    const { result, missing } = outcome;
    active.forEach((j, i) => finished.set(j.id, { result: { ...result, missing: missing(...batch.range(i)), ...(active.length > 1 ? { batched: active.length } : {}) } }));
    committed = result;
    d.log.info({ key, size: result.size, entries: result.entries, jobs: active.map((j) => j.id), tries }, 'session repacked');
    break;
  }
  for (const [j, error] of failures) finished.set(j.id, { error });
  if (applied.size > 0) {
    // Redelivered jobs whose edits the archive holds: the deletes' findings of their first run are not recorded.
    const now = committed ?? await currentArchive(bucket, key, AbortSignal.any([d.signal, lease.signal]));
    for (const id of applied) finished.set(id, { result: { ...now, missing: [] } });
  }
  return finished;
}

/** A job that lost its lock stops with that as its reason (Transient: retried), whatever failed under it. */
function lostOr(err: unknown, lease: Lease): unknown {
  return lease.signal.aborted ? lease.signal.reason : err;
}

/** The payload's ops with their bodies, checked before any lock or archive I/O. */
async function planOps(p: RepackPayload, d: JobDeps): Promise<PlanOp[]> {
  let inline = 0;
  const out: PlanOp[] = [];
  for (const [i, o] of p.ops.entries()) {
    if (o.op === 'delete') {
      out.push({ op: 'delete', path: o.path, ifSha256: o.ifSha256 });
      continue;
    }
    let body: Body;
    if (o.source) {
      const staged = await d.staging.sourceFile(o.source.path, `ops.${i}.source.path`, { signal: d.signal });
      body = { file: staged.path, size: staged.size };
    } else {
      const bytes = o.text !== undefined ? Buffer.from(o.text, 'utf8') : Buffer.from(o.base64!, 'base64');
      inline += bytes.length;
      if (inline > d.limits.maxInlineBytes) {
        throw new StorageError(ErrorCode.InvalidInput, `ops.${i}: inline content over ${d.limits.maxInlineBytes} bytes in all; stage a file (source.path) instead`, { op: 'repack' });
      }
      body = { bytes };
    }
    out.push({ op: 'put', path: o.path, body, mode: o.mode, ifSha256: o.ifSha256 });
  }
  return out;
}

/** One pass that committed: the archive written, and the deletes of ops `from`..`to` that found nothing. */
interface Committed {
  result: Omit<RepackResult, 'missing'>;
  missing(from: number, to: number): string[];
}

/**
 * One read-rewrite-commit pass. Resolves with the commit, 'conflict' when the conditional commit
 * found the archive replaced since it was read (or `read`, hearing the etag of the archive read,
 * answers false: the batch's failures were judged on another), or the jobs to drop before trying
 * again (their error, or 'applied': the archive holds their edits already). An edit the index
 * places is spliced inside the store where it can (`splice`), else streamed to it.
 */
async function attempt(bucket: Bucket, key: string, batch: BatchPlan, spool: ReadonlySet<string>, signal: AbortSignal, d: JobDeps, splice: boolean, read: (etag: string | undefined) => boolean, beforeCommit?: () => Promise<void>): Promise<Committed | 'conflict' | { drop: Map<string, StorageError | 'applied'> }> {
  const plan = batch.plan;
  const notFound = (err: unknown): undefined => {
    if (err instanceof StorageError && err.code === ErrorCode.NotFound) return undefined;
    throw err;
  };
  // A seekable archive's index first: its segments that come out unchanged are copied as they are.
  let view: Awaited<ReturnType<typeof openSeekable>>;
  try {
    view = await openSeekable(bucket, key, signal).catch(notFound);
  } catch (err) {
    if (err instanceof ArchiveReplaced) return 'conflict';
    throw err;
  }
  const appliedIn = (info: ObjectInfo): string[] => (info.metadata[APPLIED_META] ?? '').split(' ').filter(Boolean);
  const redelivered = (info: ObjectInfo): boolean => appliedIn(info).some((m) => batch.jobs.some((j) => j.mark === m));
  // A seekable archive is read only as its segments, each checked against the index's digest
  // (the index against the footer's): the whole-object digest would hash the same bytes again.
  // A batch with a redelivered job reads the archive whole (currentArchive), so that read keeps the check.
  const partsChecked = view !== undefined && !redelivered(view.info);
  const current = await bucket.get(key, { signal, partsChecked }).catch(notFound);
  if ((view && (!current || current.info.etag !== view.info.etag || current.info.size !== view.info.size || redelivered(current.info) !== redelivered(view.info))) || !read(current?.info.etag)) {
    current?.stream.destroy();
    return 'conflict';
  }
  const applied = current ? appliedIn(current.info) : [];
  const drop = new Map<string, StorageError | 'applied'>();
  for (const j of batch.jobs) if (applied.includes(j.mark)) drop.set(j.id, 'applied');
  if (!current) {
    // Jobs that must not create the session fail until one that may has created it.
    for (const j of batch.jobs) {
      if (j.create) break;
      drop.set(j.id, new StorageError(ErrorCode.NotFound, 'no such session (the job asked not to create one)', { op: 'session', key }));
    }
  }
  if (drop.size > 0) {
    current?.stream.destroy();
    return { drop };
  }
  if (current && current.info.sha256 === undefined) d.log.warn({ key }, 'session archive has no recorded digest: read unverified (gzip CRC only)');
  const seekable: SeekableInput | undefined = view ? { index: view.index, key } : undefined;
  const metadata = { [APPLIED_META]: appliedList(applied, batch.jobs.map((j) => j.mark)) };
  // Edits the index can place rewrite only their segments; anything else goes through the full transform.
  const groups = view && current ? dirtySegments(plan.ops, view.index) : undefined;
  if (splice && groups && current && view && shouldSplice(bucket, current.info, view.index, plan.ops, groups)) {
    try {
      const r = await spliceRewrite(bucket, key, current, view.index, plan.ops, plan.mtime, groups, { metadata, signal, progress: d.progress, warn: (msg, err) => d.log.warn({ key, err }, msg), beforeCommit });
      d.log.info({ key, reused: r.reused, compressed: r.compressed }, 'session segments spliced in the store and compressed');
      return { result: { key, size: r.info.size, sha256: r.info.sha256!, entries: r.entries }, missing: () => [] };
    } catch (err) {
      if (err instanceof StorageError && err.code === ErrorCode.PreconditionFailed) return 'conflict';
      throw err;
    }
  }
  const run = plan.start(spool);
  // The new archive's bytes on their way to the store, counted for the job's progress; the last
  // of them wait for `beforeCommit`, so nothing commits before it agreed.
  let written = 0;
  let sealFailed: unknown;
  const out = new Transform({
    highWaterMark: 1 << 20,
    transform(chunk: Buffer, _enc, cb) {
      written += chunk.length;
      d.progress(written);
      cb(null, chunk);
    },
    flush(cb) {
      if (!beforeCommit) return cb();
      beforeCommit().then(() => cb(), (err: unknown) => {
        sealFailed = err;
        cb(err as Error);
      });
    },
  });
  const stopRewrite = new AbortController();
  const opts: PutOptions = {
    contentType: CONTENT_TYPE,
    metadata,
    signal,
    ...(current ? (current.info.etag !== undefined ? { ifMatch: current.info.etag } : {}) : { ifAbsent: true }),
  };
  let first: 'rewrite' | 'put' | undefined;
  const putting = bucket.put(key, out, opts).catch((err: unknown) => {
    first ??= 'put';
    // A put that gives up early (a precondition, a store error) must not leave the rewrite waiting on it.
    stopRewrite.abort(err);
    throw err;
  });
  const rewriteSignal = AbortSignal.any([signal, stopRewrite.signal]);
  const rewriting = (groups && current && view
    ? rewriteSegments(current.stream, view.index, key, plan.ops, plan.mtime, groups, out, GZIP_LEVEL, rewriteSignal)
    : rewriteArchive(current?.stream ?? null, out, run, { signal: rewriteSignal, seekable })).catch((err: unknown) => {
    first ??= 'rewrite';
    throw err;
  });
  try {
    const [rewrote, info] = await Promise.allSettled([rewriting, putting]);
    const failed = run.failure(rewrote.status === 'rejected' ? rewrote.reason : undefined);
    if (failed) throw failed;
    if (sealFailed) throw sealFailed;
    if (rewrote.status === 'fulfilled' && info.status === 'fulfilled') {
      d.log.info({ key, reused: rewrote.value.reused, compressed: rewrote.value.compressed }, 'session segments copied and compressed');
      return {
        result: { key, size: info.value.size, sha256: info.value.sha256!, entries: rewrote.value.entries },
        missing: (from, to) => run.missing(from, to),
      };
    }
    const err = first === 'put' && info.status === 'rejected' ? info.reason : rewrote.status === 'rejected' ? rewrote.reason : (info as PromiseRejectedResult).reason;
    if (first === 'put' && err instanceof StorageError && err.code === ErrorCode.PreconditionFailed) return 'conflict';
    throw err;
  } finally {
    if (!out.destroyed) out.destroy();
    await run.close();
  }
}

/**
 * The newest job marks, the batch's last (all of them: a batch fits BATCH_MARK_CHARS), bounded in
 * count and length. A mark APPLIED_ID refuses (a job id with control characters, which S3, GCS and
 * Azure metadata reject, or one long enough to push the others out) is left out: its job took the
 * path without a group and is not found by its mark when redelivered.
 */
function appliedList(applied: string[], marks: string[]): string {
  const list = [...applied.filter((m) => !marks.includes(m)), ...marks].filter((m) => APPLIED_ID.test(m)).slice(-APPLIED_KEEP);
  while (list.join(' ').length > APPLIED_MAX_CHARS) list.shift();
  return list.join(' ');
}

/** The stored archive as a result (redelivered jobs whose edits it holds), read once to count its entries. */
async function currentArchive(bucket: Bucket, key: string, signal: AbortSignal): Promise<Omit<RepackResult, 'missing'>> {
  const { stream, info } = await bucket.get(key, { signal });
  const { entries } = await readArchive(stream, () => {}, { signal });
  return { key, size: info.size, sha256: info.sha256!, entries };
}
