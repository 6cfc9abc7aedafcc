import type { FastifyInstance } from 'fastify';
import { z } from 'zod';
import { ErrorCode, StorageError } from '../../errors.js';
import { parsePayload } from '../../payload.js';
import { JOBS } from '../../../jobs/index.js';
import { versions } from '../../versions.js';
import { queryParam, type RouteContext } from '../context.js';
import { enqueue, parseWait } from '../enqueue.js';
import { siteAndBuild } from './artifacts.js';

/** The seed service's log body; the build is `build_id` there. */
const LogBody = z.strictObject({
  build_id: z.unknown(),
  action: z.unknown(),
  status: z.unknown(),
  metadata: z.unknown().optional(),
  timestamp: z.unknown().optional(),
});

/** `POST /sites/<site>/logs` (enqueues `log`) and `GET /sites/<site>/versions`. */
export function logRoutes(ctx: RouteContext) {
  return async (server: FastifyInstance): Promise<void> => {
    server.post('/sites/:site/logs', async (req, reply) => {
      const { site } = siteAndBuild(req.params);
      const waitSeconds = parseWait(req.query);
      const body = LogBody.safeParse(req.body ?? {});
      if (!body.success) {
        const i = body.error.issues[0]!;
        const field = i.code === 'unrecognized_keys' ? `unknown field(s) ${i.keys.join(', ')}` : `${i.path.join('.') || 'body'}: ${i.message}`;
        throw new StorageError(ErrorCode.InvalidInput, field);
      }
      const { build_id: build, ...rest } = body.data;
      const data = { backend: queryParam(req.query, 'backend') ?? 'default', site, build, ...rest };
      try {
        parsePayload(JOBS.log.payload, data);
      } catch (err) {
        // The job's field is `build`; the caller sent `build_id`.
        if (err instanceof StorageError) throw new StorageError(err.code, err.detail.replace(/(^|; )build:/g, '$1build_id:'));
        throw err;
      }
      const out = await enqueue(ctx.client, 'log', data as never, { waitSeconds, log: ctx.log });
      return out.result === undefined ? reply.code(202).send({ id: out.id }) : reply.code(200).send(out.result);
    });

    server.get('/sites/:site/versions', async (req) => {
      const { site } = siteAndBuild(req.params);
      const list = await versions(ctx.bucket(queryParam(req.query, 'backend')), site);
      return { site, count: list.length, versions: list };
    });
  };
}
