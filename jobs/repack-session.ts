import { Transform, type Readable } from 'node:stream';
import { z } from 'zod';
import { ErrorCode, StorageError } from '../src/errors.js';
import { BackendName, Sha256, StagingPath, type JobDeps, type Lease } from '../src/payload.js';
import { CONTENT_TYPE, GZIP_LEVEL, readArchive, rewriteArchive, type SeekableInput } from '../src/session/archive.js';
import { dirtySegments, rewriteSegments } from '../src/session/seek-edit.js';
import { ArchiveReplaced, openSeekable } from '../src/session/seek-read.js';
import { SpliceUnsupported, shouldSplice, spliceRewrite } from '../src/session/seek-splice.js';
import { OpPath, SessionId, sessionKey, sessionLockName } from '../src/session/ids.js';
import { EditPlan, SpoolNeeded, type Body, type PlanOp } from '../src/session/plan.js';
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
const APPLIED_KEEP = 16;
/** Metadata is 2 KB in all on every backend: the list stays well under it whatever the ids' lengths. */
const APPLIED_MAX_CHARS = 1000;
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
}

/**
 * Applies ordered file edits to `sessions/<session>/session.tar.gz` (created if absent), all or
 * none, streaming the stored archive through a rewrite into a new one. Never loses an edit:
 * repacks of one session hold its lock (src/queue/lock.ts) from read to commit, and the commit is
 * conditional on the version read (ifMatch, or ifAbsent for a new session), which stores with
 * atomic conditional writes enforce and the others check by a stat first. A commit that finds
 * the archive replaced anyway (a writer without the lock) reads it again and re-applies.
 */
export async function repackSession(p: RepackPayload, d: JobDeps): Promise<RepackResult> {
  const bucket = d.bucket(p.backend);
  const key = sessionKey(p.session);
  if (!d.locks) throw new StorageError(ErrorCode.Unknown, 'repack-session needs the worker\'s lock service (JobDeps.locks)', { op: 'repack', key });
  const ops = await planOps(p, d);
  const plan = new EditPlan(ops, new Date(d.enqueuedAt));
  const jobMark = APPLIED_ID.test(`${d.jobId}@${d.enqueuedAt}`) ? `${d.jobId}@${d.enqueuedAt}` : undefined;
  const lease = await d.locks.acquire(sessionLockName(p.session), d.signal);
  try {
    const spool = new Set<string>();
    let splice = true;
    for (let tries = 1, reruns = 0; ;) {
      const signal = AbortSignal.any([d.signal, lease.signal]);
      const outcome = await attempt(bucket, key, plan, spool, jobMark, signal, d, p.create ?? true, splice).catch((err: unknown) => {
        if (err instanceof SpoolNeeded && reruns < MAX_SPOOL_RERUNS && !spool.has(err.target)) return err;
        if (err instanceof SpliceUnsupported && splice) return err;
        throw lostOr(err, lease);
      });
      if (outcome instanceof SpliceUnsupported) {
        d.log.info({ key }, 'the store cannot splice; writing the edit whole');
        splice = false;
        continue;
      }
      if (outcome instanceof SpoolNeeded) {
        spool.add(outcome.target);
        reruns++;
        continue;
      }
      if (outcome !== 'conflict') {
        d.log.info({ key, size: outcome.size, entries: outcome.entries, missing: outcome.missing.length, tries }, 'session repacked');
        return outcome;
      }
      if (++tries > MAX_COMMIT_TRIES) throw new StorageError(ErrorCode.Transient, `the archive was replaced by other writers ${MAX_COMMIT_TRIES} times while repacking`, { op: 'repack', key });
      d.log.warn({ key, tries }, 'session archive replaced while repacking; applying the edits again');
    }
  } finally {
    await lease.release();
  }
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

/**
 * One read-rewrite-commit pass. Resolves with the result, or 'conflict' when the conditional
 * commit found the archive replaced since it was read. An edit the index places is spliced
 * inside the store where it can (`splice`), else streamed to it.
 */
async function attempt(bucket: Bucket, key: string, plan: EditPlan, spool: ReadonlySet<string>, jobMark: string | undefined, signal: AbortSignal, d: JobDeps, create: boolean, splice: boolean): Promise<RepackResult | 'conflict'> {
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
  const current = await bucket.get(key, { signal }).catch(notFound);
  if (view && (!current || current.info.etag !== view.info.etag || current.info.size !== view.info.size)) {
    current?.stream.destroy();
    return 'conflict';
  }
  if (!current && !create) throw new StorageError(ErrorCode.NotFound, 'no such session (the job asked not to create one)', { op: 'session', key });
  const seekable: SeekableInput | undefined = view ? { index: view.index, key } : undefined;
  const applied = (current?.info.metadata[APPLIED_META] ?? '').split(' ').filter(Boolean);
  if (current && jobMark && applied.includes(jobMark)) return alreadyApplied(key, current.stream, current.info, signal);
  if (current && current.info.sha256 === undefined) d.log.warn({ key }, 'session archive has no recorded digest: read unverified (gzip CRC only)');
  const metadata: Record<string, string> = jobMark ? { [APPLIED_META]: appliedList(applied, jobMark) } : {};
  // Edits the index can place rewrite only their segments; anything else goes through the full transform.
  const groups = view && current ? dirtySegments(plan.ops, view.index) : undefined;
  if (splice && groups && current && view && shouldSplice(bucket, current.info, view.index, plan.ops, groups)) {
    try {
      const r = await spliceRewrite(bucket, key, current, view.index, plan.ops, plan.mtime, groups, { metadata, signal, progress: d.progress, warn: (msg, err) => d.log.warn({ key, err }, msg) });
      d.log.info({ key, reused: r.reused, compressed: r.compressed }, 'session segments spliced in the store and compressed');
      return { key, size: r.info.size, sha256: r.info.sha256!, entries: r.entries, missing: [] };
    } catch (err) {
      if (err instanceof StorageError && err.code === ErrorCode.PreconditionFailed) return 'conflict';
      throw err;
    }
  }
  const run = plan.start(spool);
  // The new archive's bytes on their way to the store, counted for the job's progress.
  let written = 0;
  const out = new Transform({
    highWaterMark: 1 << 20,
    transform(chunk: Buffer, _enc, cb) {
      written += chunk.length;
      d.progress(written);
      cb(null, chunk);
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
    if (run.conditionFailed) throw run.conditionFailed;
    if (rewrote.status === 'fulfilled' && info.status === 'fulfilled') {
      d.log.info({ key, reused: rewrote.value.reused, compressed: rewrote.value.compressed }, 'session segments copied and compressed');
      return { key, size: info.value.size, sha256: info.value.sha256!, entries: rewrote.value.entries, missing: run.missing() };
    }
    const err = first === 'put' && info.status === 'rejected' ? info.reason : rewrote.status === 'rejected' ? rewrote.reason : (info as PromiseRejectedResult).reason;
    if (first === 'put' && err instanceof StorageError && err.code === ErrorCode.PreconditionFailed) return 'conflict';
    throw err;
  } finally {
    if (!out.destroyed) out.destroy();
    await run.close();
  }
}

/** The newest job marks, this job's last, bounded in count and length. */
function appliedList(applied: string[], mark: string): string {
  const marks = [...applied.filter((m) => m !== mark && APPLIED_ID.test(m)), mark].slice(-APPLIED_KEEP);
  while (marks.join(' ').length > APPLIED_MAX_CHARS) marks.shift();
  return marks.join(' ');
}

/** A redelivered job whose edits the archive already holds: its result, without writing again. */
async function alreadyApplied(key: string, stream: Readable, info: ObjectInfo, signal: AbortSignal): Promise<RepackResult> {
  const { entries } = await readArchive(stream, () => {}, { signal });
  // The deletes' findings of the first run are not recorded; the edits themselves are there.
  return { key, size: info.size, sha256: info.sha256!, entries, missing: [] };
}
