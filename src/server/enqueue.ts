import type { JobsOptions } from 'bullmq';
import type { Logger } from 'pino';
import type { JobName, Payloads, StevedoreClient } from '../queue/client.js';
import { HttpError, jobFailure } from './errors.js';

/** Longest `?wait=` honoured, in seconds (an hour: past that a client should poll GET /jobs/<id>). */
export const MAX_WAIT_SECONDS = 3600;

/** `?wait=<seconds>`: undefined when absent; 400 when not a positive number of seconds. */
export function parseWait(query: unknown): number | undefined {
  const raw = (query as Record<string, unknown> | undefined)?.wait;
  if (raw === undefined) return undefined;
  const n = Number(raw);
  if (typeof raw !== 'string' || raw.trim() === '' || !Number.isFinite(n) || n < 0 || n > MAX_WAIT_SECONDS) {
    throw new HttpError(400, 'InvalidInput', `InvalidInput: wait: must be a number of seconds from 0 to ${MAX_WAIT_SECONDS}`);
  }
  return n;
}

/**
 * Enqueues a job and, with `waitSeconds`, awaits it: `done` with its result, `done: false` when
 * the wait ran out first (the job goes on). A failure throws the contract's answer for its code.
 * `onFinished` runs once the job is over, however long that takes (removing a staged upload).
 */
export async function enqueue<N extends JobName>(client: StevedoreClient, name: N, data: Payloads[N], opts: {
  waitSeconds?: number | undefined; job?: JobsOptions; onFinished?: () => Promise<void>; log: Logger;
}): Promise<{ id: string; result?: unknown }> {
  let id: string | undefined;
  const finished = opts.onFinished;
  try {
    if (opts.waitSeconds === undefined) {
      id = await client.add(name, data, opts.job);
      if (finished) follow(client, id, finished, opts.log);
      return { id };
    }
    const result = await client.run(name, data, { ...opts.job, timeoutMs: Math.max(1, opts.waitSeconds * 1000), onAdded: (added) => { id = added; } });
    await finished?.();
    return { id: id!, result };
  } catch (err) {
    if (id === undefined) {
      await finished?.();
      throw err;
    }
    if ((err as { pending?: boolean }).pending) {
      if (finished) follow(client, id, finished, opts.log);
      return { id };
    }
    await finished?.();
    throw jobFailure((err as Error).message);
  }
}

/** Runs `then` once the job is over (completed or failed for good), in the background. */
function follow(client: StevedoreClient, id: string, then: () => Promise<void>, log: Logger): void {
  client.result(id).catch(() => {}).then(then).catch((err: unknown) => log.warn({ err, jobId: id }, 'cleanup after a job failed'));
}
