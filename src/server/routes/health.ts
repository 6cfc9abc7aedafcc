import type { FastifyInstance } from 'fastify';
import type { RouteContext } from '../context.js';

/** How long one part may take to answer before it counts as down. */
const PROBE_MS = 3_000;

async function probe(check: () => Promise<unknown>): Promise<string> {
  let timer: NodeJS.Timeout | undefined;
  try {
    const timeout = new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`no answer within ${PROBE_MS} ms`)), PROBE_MS); });
    const r = await Promise.race([check(), timeout]);
    return typeof r === 'string' ? r : 'ok';
  } catch (err) {
    // Messages are the Bucket's (code, op, backend name), never a URL with credentials.
    return err instanceof Error ? err.message : String(err);
  } finally {
    clearTimeout(timer);
  }
}

/** `GET /health`: Redis and each backend; 503 when any part is down. Needs no token (load balancers). */
export function healthRoutes(ctx: RouteContext) {
  return async (server: FastifyInstance): Promise<void> => {
    server.get('/health', async (_req, reply) => {
      const names = [...ctx.buckets.keys()];
      const [redis, ...states] = await Promise.all([probe(() => ctx.redisOk()), ...names.map((n) => probe(() => ctx.buckets.get(n)!.health()))]);
      const backends = Object.fromEntries(names.map((n, i) => [n, states[i]!]));
      const ok = redis === 'ok' && states.every((s) => s === 'ok');
      return reply.code(ok ? 200 : 503).send({ status: ok ? 'ok' : 'down', redis, backends });
    });
  };
}
