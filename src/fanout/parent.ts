import { ErrorCode, StorageError } from '../errors.js';
import type { Counters, FanOut, FanOutLimits, JobDeps } from '../payload.js';
import { chunked } from './listing.js';
import { mergeFailures, type Failure } from './failures.js';

/** A fanned-out job's result: counters summed over its chunks, and up to MAX_FAILURES failures. */
export type Summary<C extends string> = Record<C, number> & { failures: Failure[] };

/** What every chunk returns (and what its parent keeps of it): counters, failures, the last key. */
export type ChunkResult<C extends string> = Summary<C> & { last: string };

/**
 * The migration aborts once, past ABORT_MIN_SCANNED objects finished (FanOutLimits.abortAfter),
 * more than ABORT_RATIO of them failed: S3 Batch Operations' rule (50% after 1,000 tasks). Below
 * that a run always finishes and reports what failed. Checked by each chunk as it finishes
 * (reportChunk) and by the parent while it lists and when it wakes.
 */
export const ABORT_MIN_SCANNED = 1000;
export const ABORT_RATIO = 0.5;

/**
 * @defaultValue of FanOutLimits. Chunks of 250 keys or 64 MiB: small enough that a tree spreads
 * over every worker process and slot (2,000 small objects are 8 chunks, 8 of 32 MiB are 4, where
 * chunks of 1,000 keys or 1 GiB made 3, of which one process got most), large enough that a
 * chunk's own cost (its job, its record file, its report) stays a few percent of its objects'.
 * Redis holds at most a window of them (16 x 250 keys x ~120 bytes), and a finished chunk leaves
 * a summary of ~250 bytes: 4,000 for a million objects.
 */
export const DEFAULT_FANOUT_LIMITS: FanOutLimits = { chunkKeys: 250, chunkBytes: 64 * 1024 * 1024, window: 16, lanes: 8, abortAfter: ABORT_MIN_SCANNED };

export interface ParentSpec<I, C extends string> {
  /** Internal job name of the chunks (same queue). */
  child: string;
  /** Counter names of the result, `scanned` among them. */
  counters: readonly C[];
  /** The counter objects of a failed chunk are added to (migrate: `failed`); none adds them to no counter. */
  lostInto?: C | undefined;
  /** Counter checked against the abort threshold (migrate: `failed`). */
  abortOn?: C | undefined;
  /** The listing, past `after` (a restarted parent's last chunk's last key). */
  items(after: string | undefined): AsyncIterable<I>;
  key(i: I): string;
  size(i: I): number;
  /** A chunk's payload for these items. */
  chunk(items: I[]): { items: unknown[] } & object;
}

const POLL_MS = 250;
const PROGRESS_MS = 1000;

/**
 * Runs a parent job: lists page by page, cuts chunks of FanOutLimits.chunkKeys keys or chunkBytes
 * bytes, and adds each as a child job with a deterministic id (`<parent>-<child>-<n>`) while at
 * most `window` are unfinished. A checkpoint after each chunk (its index, last key, keys so far)
 * lets a restarted parent (stalled, retried, or woken from waiting-children) go on from there.
 * Once all are added it parks until they finish, then sums their results.
 */
export async function runParent<I, C extends string>(spec: ParentSpec<I, C>, d: JobDeps): Promise<Summary<C>> {
  const fan = d.fanout;
  if (!fan) throw new StorageError(ErrorCode.Unknown, `${spec.child}: this worker cannot fan out (no FanOut in its job dependencies)`);
  const cp = await fan.checkpoint();
  let next = Number(cp.next ?? 0);
  let listed = Number(cp.listed ?? 0);
  let after = cp.after;
  let lastProgress = 0;
  // The checkpoint carries `listed` and `done`; publish turns the state into the progress.
  const progress = async () => {
    lastProgress = Date.now();
    await fan.publish(zero(spec.counters));
  };
  const checkAbort = async () => {
    if (!spec.abortOn) return;
    const tally = await fan.tally();
    if (!overThreshold(fan.limits, tally, spec.abortOn)) return;
    await fan.removePending().catch(() => {});
    const { completed } = await fan.children();
    throw aborted(fan.limits, tally.scanned ?? 0, tally[spec.abortOn] ?? 0, (completed as Array<Partial<ChunkResult<C>>>).flatMap((r) => r.failures ?? []));
  };
  const stopIfAborted = async () => {
    if (!d.signal.aborted) return;
    // Cancelled by a request: its chunks not started yet go too; what verified stays. A worker's
    // own stop hands the parent back instead, and its chunks stay for the next run of it.
    if (String(d.signal.reason).startsWith(ErrorCode.Cancelled)) await fan.removePending().catch(() => {});
    throw new StorageError(ErrorCode.Transient, `stopped: ${String(d.signal.reason)}`, { op: d.jobId });
  };
  if (cp.done !== '1') {
    let relist = true;
    while (relist) {
      relist = false;
      for await (const items of chunked(spec.items(after), spec.size, fan.limits.chunkKeys, fan.limits.chunkBytes)) {
        await stopIfAborted();
        while ((await fan.pending()) >= fan.limits.window) {
          await sleep(POLL_MS, d.signal);
          await stopIfAborted();
          if (Date.now() - lastProgress >= PROGRESS_MS) {
            await progress();
            await checkAbort();
          }
        }
        // A chunk may have found the run past the threshold: no chunk is added after that.
        await checkAbort();
        const ours = spec.key(items[items.length - 1]!);
        const added = await fan.addChild(spec.child, `${d.jobId}-${spec.child}-${next}`, spec.chunk(items));
        // A chunk of that number exists (a parent restarted between adding it and its checkpoint):
        // it stands with its own keys, and the listing resumes after its last one.
        const theirs = added.existed ? (added.data as { items?: unknown[][] }).items ?? [] : undefined;
        const last = theirs ? String(theirs[theirs.length - 1]?.[0] ?? ours) : ours;
        listed += theirs ? theirs.length : items.length;
        next += 1;
        after = last;
        await fan.setCheckpoint({ next: String(next), after: last, listed: String(listed) });
        if (Date.now() - lastProgress >= PROGRESS_MS) await progress();
        if (last !== ours) {
          relist = true;
          break;
        }
      }
    }
    await fan.setCheckpoint({ done: '1', listed: String(listed) });
    d.log.info({ listed, chunks: next }, 'listing done');
  }
  await progress();
  await checkAbort();
  // Parks here (the worker slot is freed) until every chunk finished; then this handler runs again.
  await fan.waitForChildren();
  return finish(spec, fan, listed);
}

async function finish<I, C extends string>(spec: ParentSpec<I, C>, fan: FanOut, listed: number): Promise<Summary<C>> {
  const { completed, failed } = await fan.children();
  const out = zero(spec.counters) as Record<string, number>;
  let failures: Failure[] = [];
  for (const r of completed as Array<Partial<ChunkResult<C>>>) {
    for (const c of spec.counters) out[c]! += Number(r[c] ?? 0);
    failures = mergeFailures(failures, r.failures ?? []);
  }
  // Objects of a chunk that failed for good (every attempt) are not lost from the count.
  const lost = Math.max(0, listed - out.scanned!);
  if (spec.lostInto) out[spec.lostInto]! += lost;
  out.scanned = listed;
  failures = mergeFailures(failures, failed.map((reason) => ({ key: '', code: codeOf(reason), message: `a chunk failed: ${reason}`.slice(0, 500) })));
  const result = { ...out, failures } as Summary<C>;
  if (spec.abortOn && overThreshold(fan.limits, out, spec.abortOn)) throw aborted(fan.limits, out.scanned, out[spec.abortOn]!, failures);
  await fan.progress({ ...out, listed, listingDone: true });
  await fan.clear();
  return result;
}

/**
 * A chunk's end: adds its counters to its parent's tally (FanOut.report) and, when the tally that
 * report made is past the abort threshold, removes its siblings not started yet. The parent,
 * asleep in waiting-children once its listing is done, then wakes as soon as the chunks still
 * running finish, instead of after every remaining chunk ran, and fails as checkAbort says.
 */
export async function reportChunk<C extends string>(d: JobDeps, counters: Record<C, number>, abortOn?: C): Promise<void> {
  const fan = d.fanout;
  if (!fan) return;
  const tally = await fan.report(counters);
  if (!abortOn || !overThreshold(fan.limits, tally, abortOn)) return;
  d.log.warn({ scanned: tally.scanned, [abortOn]: tally[abortOn] }, 'migration past its abort threshold: removing its chunks not started');
  await fan.removePendingSiblings();
}

function overThreshold(limits: FanOutLimits, tally: Counters, on: string): boolean {
  const scanned = tally.scanned ?? 0;
  return scanned >= limits.abortAfter && (tally[on] ?? 0) > ABORT_RATIO * scanned;
}

/** The error an aborted run fails with: the code most of its failures had. */
function aborted(limits: FanOutLimits, scanned: number, failed: number, failures: Failure[]): StorageError {
  const first = failures[0] ? `${failures[0].key}: ${failures[0].message}` : 'none recorded';
  return new StorageError(dominantCode(failures), `aborted: ${failed} of ${scanned} objects failed (more than ${ABORT_RATIO * 100}% after ${limits.abortAfter}); first: ${first}`);
}

function zero<C extends string>(counters: readonly C[]): Record<C, number> {
  return Object.fromEntries(counters.map((c) => [c, 0])) as Record<C, number>;
}

function codeOf(reason: string): string {
  const code = /^(\w+):/.exec(reason)?.[1];
  return code && code in ErrorCode ? code : ErrorCode.Unknown;
}

/** The code most failures had: what the aborted run fails with. */
function dominantCode(failures: Failure[]): ErrorCode {
  const counts = new Map<string, number>();
  for (const f of failures) counts.set(f.code, (counts.get(f.code) ?? 0) + 1);
  const top = [...counts.entries()].sort((a, b) => b[1] - a[1])[0]?.[0];
  return (top && top in ErrorCode ? top : ErrorCode.Unknown) as ErrorCode;
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal.removeEventListener('abort', done);
      resolve();
    }
    signal.addEventListener('abort', done, { once: true });
  });
}
