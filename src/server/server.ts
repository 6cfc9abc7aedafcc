import Fastify, { type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import type { App } from '../app.js';
import { registerAuth } from './auth.js';
import { routeContext } from './context.js';
import { errorHandler, notFoundHandler } from './errors.js';
import { artifactRoutes } from './routes/artifacts.js';
import { healthRoutes } from './routes/health.js';
import { jobRoutes } from './routes/jobs.js';
import { logRoutes } from './routes/logs.js';
import { sessionRoutes } from './routes/sessions.js';
import { JOB_NAMES } from '../../jobs/index.js';
import { dashboardPlugin } from './dashboard.js';
import { eventsPlugin } from './events.js';
import { metricsPlugin } from './metrics.js';

export interface ServerDeps {
  /** The process's composition (buckets, staging, producer client, locks, config, logger). */
  app: App;
  /** @defaultValue app.config.apiToken */
  token?: string | undefined;
  /** @defaultValue app.config.maxUploadBytes */
  maxUploadBytes?: number;
}

/** Largest JSON body (job payloads, batches): a batch of 10,000 small payloads fits. */
const JSON_LIMIT = 16 << 20;

/**
 * The HTTP server, built and not listening (tests `inject` into it; `listenServer` binds it).
 * Routes are plugins by concern; one error handler answers `{ error, message }` everywhere.
 */
export async function buildServer(deps: ServerDeps): Promise<FastifyInstance> {
  const { app } = deps;
  const token = 'token' in deps ? deps.token : app.config.apiToken;
  const log = app.log.child({ module: 'http' });
  const ctx = await routeContext(app, deps.maxUploadBytes ?? app.config.maxUploadBytes, log);
  const server = Fastify({
    loggerInstance: log as FastifyBaseLogger,
    bodyLimit: JSON_LIMIT,
    // HEAD routes are declared where they are cheap (a stat), never a GET that opens the object.
    exposeHeadRoutes: false,
    // Uploads of many GiB take long: no request timeout, only the socket's idle timeout.
    requestTimeout: 0,
    connectionTimeout: 0,
    keepAliveTimeout: 30_000,
    routerOptions: { maxParamLength: 8192 },
  });
  server.setErrorHandler(errorHandler);
  server.setNotFoundHandler(notFoundHandler);
  registerAuth(server, token);
  await server.register(healthRoutes(ctx));
  await server.register(jobRoutes(ctx));
  await server.register(logRoutes(ctx));
  await server.register(artifactRoutes(ctx));
  await server.register(sessionRoutes(ctx), { prefix: '/api/storage-worker/sessions' });
  // The operator's plugins, behind the same auth hook. The events reader blocks on its Redis
  // connection, so it takes a worker-role one (it waits out a Redis restart); a scrape or a
  // dashboard page fails after 2 s instead (producer role).
  const c = app.config;
  const queue = { queue: c.queue, keyPrefix: c.prefix };
  await server.register(eventsPlugin, { ...queue, connect: () => app.connect('worker'), types: [...JOB_NAMES], log });
  await server.register(metricsPlugin, { ...queue, connect: () => app.connect('producer') });
  await server.register(dashboardPlugin, { ...queue, connect: () => app.connect('producer') });
  return server;
}
