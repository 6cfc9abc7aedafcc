import { ErrorCode, StorageError } from '../errors.js';
import { EditPlan, OpFailed, type PlanOp } from './plan.js';

/**
 * Group commit of repack-session jobs: the pieces that do not touch the archive. Several jobs'
 * ops become one plan, their ops one after the other in the jobs' order (enqueue order, then job
 * id): applying it is applying the jobs one by one, so each job's conditions see the tree the
 * jobs before it left, and its deletes find what they put. A job whose ops cannot apply leaves
 * the batch and the plan is made again without it.
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
}

/** Most jobs one rewrite applies; the archive's metadata keeps every one's mark (APPLIED_KEEP is above it). */
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
      ops.push(...j.ops);
    }
    this.starts.push(ops.length);
    // One mtime for the batch's new entries: the newest of its jobs' enqueue times.
    this.plan = new EditPlan(ops, new Date(Math.max(...jobs.map((j) => j.enqueuedAt))));
  }

  /** Ops of job `i`: from, to (excluded). */
  range(i: number): [number, number] {
    return [this.starts[i]!, this.starts[i + 1]!];
  }

  /** The job an op failure belongs to, and the failure as that job alone would have reported it. */
  blame(err: OpFailed): { job: BatchJob; error: StorageError } {
    let i = 0;
    while (err.index >= this.starts[i + 1]!) i++;
    return { job: this.jobs[i]!, error: new OpFailed(err.code, err.index - this.starts[i]!, err.why) };
  }
}

/** Orders jobs by enqueue time, then job id (numeric ids by value): the order their edits apply in. */
export function byEnqueueOrder(a: { enqueuedAt: number; id: string }, b: { enqueuedAt: number; id: string }): number {
  if (a.enqueuedAt !== b.enqueuedAt) return a.enqueuedAt - b.enqueuedAt;
  const [x, y] = [Number(a.id.split('@')[0]), Number(b.id.split('@')[0])];
  if (Number.isSafeInteger(x) && Number.isSafeInteger(y)) return x - y;
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

/**
 * The jobs that fit one rewrite, in order: `first` always, the others while the batch stays within
 * the bounds a single job has (its ops, its inline bytes several times over, its marks in metadata).
 */
export function fitBatch<T extends BatchJob>(jobs: readonly T[], first: string, bounds: { maxOps: number; maxInlineBytes: number; maxMarkChars: number }): { take: T[]; rest: T[] } {
  const take: T[] = [];
  const rest: T[] = [];
  let ops = 0;
  let inline = 0;
  let marks = 0;
  for (const j of jobs) {
    const size = j.ops.reduce((n, o) => n + (o.op === 'put' && 'bytes' in o.body ? o.body.bytes.length : 0), 0);
    const fits = take.length < MAX_BATCH_JOBS && ops + j.ops.length <= bounds.maxOps && inline + size <= bounds.maxInlineBytes && marks + j.mark.length + 1 <= bounds.maxMarkChars;
    if (fits || j.id === first) {
      take.push(j);
      ops += j.ops.length;
      inline += size;
      marks += j.mark.length + 1;
    } else {
      rest.push(j);
    }
  }
  return { take, rest };
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
