import { createHash, timingSafeEqual } from 'node:crypto';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { SESSION_API } from './errors.js';

/** The dashboard: browsers there send HTTP basic auth (any user, the token as password). */
export const DASHBOARD_PREFIX = '/admin/queues';

const digest = (s: string): Buffer => createHash('sha256').update(s).digest();

/** Constant-time comparison (of digests, so lengths leak nothing either). */
function same(given: string, token: Buffer): boolean {
  return timingSafeEqual(digest(given), token);
}

/** The credential a request carries: a bearer token, or (under the dashboard) basic auth's password. */
function presented(req: FastifyRequest, dashboard: boolean): string | undefined {
  const header = req.headers.authorization;
  if (!header) return undefined;
  const bearer = /^Bearer\s+(\S+)\s*$/i.exec(header);
  if (bearer) return bearer[1];
  const basic = dashboard ? /^Basic\s+([A-Za-z0-9+/=]+)\s*$/i.exec(header) : null;
  if (!basic) return undefined;
  const decoded = Buffer.from(basic[1]!, 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  return colon < 0 ? undefined : decoded.slice(colon + 1);
}

/**
 * With a token, every route but GET/HEAD /health needs `Authorization: Bearer <token>`; the
 * dashboard also takes basic auth with the token as password. Runs first (onRequest), before any
 * body is read.
 */
export function registerAuth(server: FastifyInstance, token: string | undefined): void {
  if (token === undefined) return;
  const want = digest(token);
  server.addHook('onRequest', async (req, reply) => {
    const path = req.url.split('?')[0]!;
    if (path === '/health' && (req.method === 'GET' || req.method === 'HEAD')) return;
    const dashboard = path === DASHBOARD_PREFIX || path.startsWith(`${DASHBOARD_PREFIX}/`);
    const given = presented(req, dashboard);
    if (given !== undefined && same(given, want)) return;
    const session = path.startsWith(SESSION_API);
    const challenge = dashboard ? 'Basic realm="stevedore", charset="UTF-8"' : 'Bearer realm="stevedore"';
    // Answered here, not thrown: a plugin with an error handler of its own (Bull Board's) would
    // turn a thrown refusal into its 500.
    const message = `PermissionDenied: ${given === undefined ? 'this route needs Authorization: Bearer <STEVEDORE_API_TOKEN>' : 'wrong token'}`;
    return reply.code(401).header('www-authenticate', challenge).send({ error: session ? 'unauthorized' : 'PermissionDenied', message });
  });
}
