import { createBullBoard } from '@bull-board/api';
import { BullMQAdapter } from '@bull-board/api/bullMQAdapter';
import { FastifyAdapter } from '@bull-board/fastify';
import type { FastifyPluginAsync } from 'fastify';
import type { RedisClient } from '../queue/connection.js';
import { openQueueHandles } from './queue-handles.js';

export interface DashboardPluginOptions {
  /** The public queue's name (STEVEDORE_QUEUE). */
  queue: string;
  /** BullMQ's key prefix (STEVEDORE_PREFIX). Not `prefix`: Fastify takes that as the routes' URL prefix. */
  keyPrefix: string;
  /** A new Redis connection (producer role: a page fails fast while Redis is away); closed by the plugin. */
  connect: () => RedisClient;
  /** Where the board is mounted. @defaultValue '/admin/queues' */
  path?: string;
  /** The path the browser sees, when a proxy mounts the server elsewhere. @defaultValue path */
  publicPath?: string;
}

/** Field names whose values never reach the browser, at any depth of a job's data. */
const SECRET_FIELD = /secret|token|passw|authori[sz]ation|api[-_]?key|access[-_]?key|private[-_]?key|credential|cookie/i;
/** Inline content shown as its size only: it is data, not for reading in a dashboard, and may be large. */
const CONTENT_FIELD = /^(base64|text)$/;

/** Job data as the board shows it: secret-named fields redacted, inline content replaced by its length. */
export function redactJobData(v: unknown, depth = 0): unknown {
  if (depth > 32 || v === null || typeof v !== 'object') return v;
  if (Array.isArray(v)) return v.map((x) => redactJobData(x, depth + 1));
  const out: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(v)) {
    if (SECRET_FIELD.test(k)) out[k] = '[redacted]';
    else if (CONTENT_FIELD.test(k) && typeof x === 'string' && x.length > 256) out[k] = `[${x.length} characters]`;
    else out[k] = redactJobData(x, depth + 1);
  }
  return out;
}

/**
 * Bull Board at `/admin/queues`: the stevedore queue and its webhook deliveries, with retry,
 * promote and clean (Bull Board's own buttons), titled Stevedore. Auth is the server's (its
 * onRequest hook covers these routes like any other), not this plugin's.
 */
export const dashboardPlugin: FastifyPluginAsync<DashboardPluginOptions> = async (app, opts) => {
  const path = opts.path ?? '/admin/queues';
  const h = openQueueHandles(opts.connect, opts.queue, opts.keyPrefix);
  const adapters = h.queues.map((q, i) => {
    const a = new BullMQAdapter(q, {
      allowRetries: true,
      description: i === 0 ? 'Storage jobs' : 'Webhook deliveries (internal)',
    });
    a.setFormatter('data', (data: unknown) => redactJobData(data));
    return a;
  });
  const server = new FastifyAdapter();
  server.setBasePath(opts.publicPath ?? path);
  createBullBoard({ queues: adapters, serverAdapter: server, options: { uiConfig: { boardTitle: 'Stevedore' } } });
  app.addHook('onRequest', async () => { await h.ready(); });
  await app.register(server.registerPlugin(), { prefix: path });
  app.addHook('onClose', () => h.close());
};
