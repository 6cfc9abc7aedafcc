import type { JobsOptions } from 'bullmq';
import type { FastifyInstance } from 'fastify';
import { z } from 'zod';
import { JOBS, JOB_NAMES, type JobName } from '../../../jobs/index.js';
import { ErrorCode, StorageError } from '../../errors.js';
import { parsePayload } from '../../payload.js';
import type { RouteContext } from '../context.js';
import { enqueue, parseWait } from '../enqueue.js';
import { HttpError } from '../errors.js';

/** Most items one `POST /jobs` takes: one addBulk is one Redis transaction, kept bounded. */
export const MAX_BATCH = 10_000;

/** The job options a producer may set over HTTP (the rest are the worker's business). */
const JobOpts = z.strictObject({
  jobId: z.string().min(1).max(256).refine((s) => !/^\d+$/.test(s) && !s.includes(':'), 'must not be all digits or contain ":" (BullMQ reserves them)').optional(),
  priority: z.number().int().min(0).max(2_097_152).optional(),
  attempts: z.number().int().min(1).max(100).optional(),
  delay: z.number().int().min(0).optional(),
  lifo: z.boolean().optional(),
  backoff: z.union([z.number().int().min(0), z.strictObject({ type: z.enum(['fixed', 'exponential']), delay: z.number().int().min(0).optional(), jitter: z.number().min(0).max(1).optional() })]).optional(),
  removeOnComplete: z.union([z.boolean(), z.number().int().min(0)]).optional(),
  removeOnFail: z.union([z.boolean(), z.number().int().min(0)]).optional(),
});

const isJobName = (t: unknown): t is JobName => typeof t === 'string' && (JOB_NAMES as string[]).includes(t);

function checkType(type: unknown, field = 'type'): JobName {
  if (!isJobName(type)) throw new StorageError(ErrorCode.InvalidInput, `${field}: unknown job type ${JSON.stringify(type)}; one of ${JOB_NAMES.join(', ')}`);
  return type;
}

/** Validates with the job's own schema, so the 400 names the field the worker would have failed on. */
function checkPayload(type: JobName, data: unknown, field?: string): void {
  try {
    parsePayload(JOBS[type].payload, data);
  } catch (err) {
    if (field && err instanceof StorageError) throw new StorageError(err.code, `${field}.${err.detail}`);
    throw err;
  }
}

function checkOpts(opts: unknown, field: string): JobsOptions | undefined {
  if (opts === undefined) return undefined;
  const r = JobOpts.safeParse(opts);
  if (r.success) return r.data as JobsOptions;
  const i = r.error.issues[0]!;
  const detail = i.code === 'unrecognized_keys' ? `unknown option(s) ${i.keys.join(', ')}` : i.message;
  throw new StorageError(ErrorCode.InvalidInput, `${[field, ...i.path.map(String)].join('.')}: ${detail}`);
}

/** The jobs API: enqueue one, enqueue many in one addBulk, read a job's state. */
export function jobRoutes(ctx: RouteContext) {
  return async (server: FastifyInstance): Promise<void> => {
    server.post('/jobs/:type', async (req, reply) => {
      const type = checkType((req.params as { type: string }).type);
      const waitSeconds = parseWait(req.query);
      checkPayload(type, req.body);
      const out = await enqueue(ctx.client, type, req.body as never, { waitSeconds, log: ctx.log });
      return out.result === undefined ? reply.code(202).send({ id: out.id }) : reply.code(200).send(out.result);
    });

    server.post('/jobs', async (req) => {
      const body = req.body as { jobs?: unknown } | undefined;
      if (typeof body !== 'object' || body === null || !Array.isArray(body.jobs)) throw new StorageError(ErrorCode.InvalidInput, 'jobs: must be an array of { type, data, opts? }');
      if (body.jobs.length > MAX_BATCH) throw new StorageError(ErrorCode.InvalidInput, `jobs: at most ${MAX_BATCH} items per batch`);
      // Each item is checked on its own; the valid ones go to Redis together, in order.
      const results: Array<{ id: string } | { error: string; message: string } | undefined> = [];
      const valid: Array<{ index: number; name: JobName; data: unknown; opts?: JobsOptions }> = [];
      body.jobs.forEach((item: unknown, index) => {
        try {
          if (typeof item !== 'object' || item === null || Array.isArray(item)) throw new StorageError(ErrorCode.InvalidInput, `jobs.${index}: must be an object { type, data, opts? }`);
          const { type, data, opts, ...extra } = item as Record<string, unknown>;
          const unknown = Object.keys(extra);
          if (unknown.length) throw new StorageError(ErrorCode.InvalidInput, `jobs.${index}: unknown field(s) ${unknown.join(', ')}`);
          const name = checkType(type, `jobs.${index}.type`);
          checkPayload(name, data, `jobs.${index}.data`);
          const o = checkOpts(opts, `jobs.${index}.opts`);
          valid.push({ index, name, data, ...(o ? { opts: o } : {}) });
          results.push(undefined);
        } catch (err) {
          const e = err as StorageError;
          results.push({ error: e.code ?? ErrorCode.InvalidInput, message: e.message });
        }
      });
      if (valid.length) {
        const added = await ctx.client.queue.addBulk(valid.map((v) => ({ name: v.name, data: v.data, ...(v.opts ? { opts: v.opts } : {}) })));
        added.forEach((job, i) => { results[valid[i]!.index] = { id: job.id! }; });
      }
      return { results };
    });

    server.delete('/jobs/:id', async (req, reply) => {
      const id = (req.params as { id: string }).id;
      const outcome = await ctx.client.cancel(id);
      if (outcome === 'not-found') throw new HttpError(404, ErrorCode.NotFound, `NotFound: job ${JSON.stringify(id)} does not exist (or was removed)`);
      // Removed before it ran: done. Running: its worker stops it and it fails Cancelled (GET /jobs/<id> shows when).
      if (outcome === 'removed') return reply.code(200).send({ id, outcome });
      if (outcome === 'cancelling') return reply.code(202).send({ id, outcome });
      const job = await ctx.client.getJob(id);
      // A second DELETE of a job that a first one cancelled is no conflict.
      if (job?.failedReason?.startsWith(`${ErrorCode.Cancelled}:`)) return reply.code(200).send({ id, outcome: 'cancelled' });
      throw new HttpError(409, ErrorCode.PreconditionFailed, `PreconditionFailed: job ${JSON.stringify(id)} already ${job ? await job.getState() : 'finished'}; nothing to cancel`);
    });

    server.get('/jobs/:id', async (req) => {
      const id = (req.params as { id: string }).id;
      const job = await ctx.client.getJob(id);
      if (!job) throw new HttpError(404, ErrorCode.NotFound, `NotFound: job ${JSON.stringify(id)} does not exist (or was removed)`);
      const state = await job.getState();
      return {
        id: job.id, type: job.name, state, progress: job.progress, attemptsMade: job.attemptsMade,
        ...(state === 'completed' ? { result: job.returnvalue } : {}),
        ...(state === 'failed' && job.failedReason ? { failedReason: job.failedReason } : {}),
      };
    });
  };
}
