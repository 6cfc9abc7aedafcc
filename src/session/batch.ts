import { ErrorCode, StorageError } from '../errors.js';
import { EditPlan, OpFailed, type PlanOp } from './plan.js';

/**
 * Group commit of repack-session jobs: the pieces that do not touch the archive. Several jobs'
 * ops become one plan, their ops one after the other in the jobs' order (the group's queue order:
 * arrival, then the mark's bytes): applying it is applying the jobs one by one, so each job's
 * conditions see the tree the jobs before it left, and its deletes find what they put. A job
 * whose ops cannot apply leaves the batch and the plan is made again without it; so does one that
 * withdrew, and the jobs after it that failed are judged again (`afterLeaving`).
 */

/** One job of a batch, its ops checked and their bodies found. */
export interface BatchJob {
  /** Its id in the batch's queue: the mark. */
  id: string;
  /** `<jobId>@<enqueuedAt>`: recorded in the archive's metadata by the commit that applied it. */
  mark: string;
  enqueuedAt: number;
  ops: PlanOp[];
  /** false: the session must exist already (when the batch reaches this job). */
  create: boolean;
  /** Sealed into a commit by a holder that went away: the archive may hold its edits already (its mark says). */
  unsure?: boolean;
}

/**
 * Most jobs one rewrite applies: half the marks the archive's metadata keeps (APPLIED_KEEP), so a
 * batch never pushes out the marks of the batch before it, whose holder may have died between its
 * commit and recording the outcomes (the next holder takes those jobs first and finds the marks).
 */
export const MAX_BATCH_JOBS = 32;

/** The jobs' ops as one plan, and which job each op came from. */
export class BatchPlan {
  readonly plan: EditPlan;
  /** Index of each job's first op in the plan, and one past its last. */
  private readonly starts: number[] = [];

  constructor(readonly jobs: readonly BatchJob[]) {
    const ops: PlanOp[] = [];
    for (const j of jobs) {
      this.starts.push(ops.length);
      // Each put's new entries carry its own job's enqueue time (the contract's mtime).
      const mtime = new Date(j.enqueuedAt);
      ops.push(...j.ops.map((o) => (o.op === 'put' ? { ...o, mtime } : o)));
    }
    this.starts.push(ops.length);
    this.plan = new EditPlan(ops, new Date(jobs[0]?.enqueuedAt ?? 0));
  }

  /** Ops of job `i`: from, to (excluded). */
  range(i: number): [number, number] {
    return [this.starts[i]!, this.starts[i + 1]!];
  }

  /** The job an op failure belongs to, and the failure as that job alone would have reported it. */
  blame(err: OpFailed): { job: BatchJob; error: OpFailed } {
    let i = 0;
    while (err.index >= this.starts[i + 1]!) i++;
    return { job: this.jobs[i]!, error: err.at(err.index - this.starts[i]!) };
  }
}

/** Jobs that failed while a batch is made, each judged on the tree the jobs before it in the batch then leave. */
export type Failures = Map<BatchJob, StorageError>;

/**
 * The jobs still to apply, in their order, once `gone` left the batch (withdrew, found applied
 * already, or failed). A job after the first of them that failed was judged with it, on a tree
 * that will not be committed: it leaves `failures` and comes back to be judged again; `'all'`
 * (the archive changed under the batch) brings every failure back. So the failures that stand
 * when the batch commits are those of applying its final jobs one after the other.
 */
export function afterLeaving(jobs: readonly BatchJob[], active: readonly BatchJob[], failures: Failures, gone: readonly BatchJob[] | 'all'): BatchJob[] {
  const from = gone === 'all' ? -1 : Math.min(...gone.map((j) => jobs.indexOf(j)));
  const next = new Set(active.filter((j) => gone === 'all' || !gone.includes(j)));
  for (const j of [...failures.keys()]) {
    if (jobs.indexOf(j) <= from) continue;
    failures.delete(j);
    next.add(j);
  }
  return jobs.filter((j) => next.has(j));
}

/**
 * The jobs that fit one rewrite, from jobs in queue order (and kept in it): the unsure ones first
 * (their marks must be looked for while the archive still has them), then a strict prefix of the
 * others, while the batch stays within the bounds a single job has (its ops, its inline bytes
 * several times over) and its marks within `maxMarkChars`. One job is taken whatever its size.
 */
export function fitBatch<T extends BatchJob>(jobs: readonly T[], bounds: { maxOps: number; maxInlineBytes: number; maxMarkChars: number }): { take: T[]; rest: T[] } {
  const taken = new Set<T>();
  let ops = 0;
  let inline = 0;
  let marks = 0;
  const fits = (j: T): boolean => {
    const size = j.ops.reduce((n, o) => n + (o.op === 'put' && 'bytes' in o.body ? o.body.bytes.length : 0), 0);
    const ok = taken.size < MAX_BATCH_JOBS && ops + j.ops.length <= bounds.maxOps && inline + size <= bounds.maxInlineBytes && marks + j.mark.length + 1 <= bounds.maxMarkChars;
    if (!ok && taken.size > 0) return false;
    taken.add(j);
    ops += j.ops.length;
    inline += size;
    marks += j.mark.length + 1;
    return true;
  };
  for (const j of jobs) if (j.unsure) fits(j);
  for (const j of jobs) if (!j.unsure && !fits(j)) break;
  return { take: jobs.filter((j) => taken.has(j)), rest: jobs.filter((j) => !taken.has(j)) };
}

/** What a holder records for a job it finished: its result, or its own error. */
export type Outcome<R> = { result: R } | { error: { code: ErrorCode; detail: string; op?: string | undefined; key?: string | undefined } };

export function encodeOutcome<R>(o: { result: R } | { error: StorageError }): string {
  if ('result' in o) return JSON.stringify(o);
  const e = o.error;
  return JSON.stringify({ error: { code: e.code, detail: e.detail, op: e.op, key: e.key } });
}

/** The job's result, or its error thrown, as the holder recorded it. */
export function decodeOutcome<R>(text: string): R {
  let o: Outcome<R>;
  try {
    o = JSON.parse(text) as Outcome<R>;
  } catch {
    throw new StorageError(ErrorCode.Unknown, 'the outcome another worker recorded for this job is not JSON', { op: 'repack' });
  }
  if ('result' in o) return o.result;
  const code = (Object.values(ErrorCode) as string[]).includes(o.error?.code) ? o.error.code : ErrorCode.Unknown;
  throw new StorageError(code, String(o.error?.detail ?? 'failed in another worker\'s batch'), { ...(o.error?.op ? { op: o.error.op } : {}), ...(o.error?.key ? { key: o.error.key } : {}) });
}

/** Claimed jobs that withdrew (cancelled, or stopped) before the commit: the batch goes on without them. */
export class Withdrawn extends Error {
  constructor(readonly ids: string[]) {
    super(`jobs withdrew from the batch: ${ids.join(', ')}`);
  }
}
