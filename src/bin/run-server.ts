import type { FastifyInstance } from 'fastify';
import { composeApp, type App } from '../app.js';
import type { Config } from '../config.js';
import { createLogger } from '../logger.js';
import { buildServer } from '../server/server.js';
import { listenServer } from '../server/listen.js';

export interface RunServerOptions {
  env: NodeJS.ProcessEnv;
  cwd: string;
}

/** Builds the HTTP server on `app` and listens where the config says (refusing a bare public address). */
export async function startHttp(app: App): Promise<FastifyInstance> {
  const server = await buildServer({ app });
  const address = await listenServer(server, { host: app.config.httpHost, port: app.config.httpPort, token: app.config.apiToken });
  app.log.info({ address, auth: app.config.apiToken ? 'bearer token' : 'none (loopback only)', maxUploadBytes: app.config.maxUploadBytes }, 'http server listening');
  return server;
}

/** Composition root of `stevedore server`: config -> logger -> app -> HTTP server -> signals. */
export async function runServer(config: Config, opts: RunServerOptions): Promise<FastifyInstance> {
  const log = createLogger(config.logLevel);
  const app = composeApp(config, { cwd: opts.cwd, env: opts.env, log });
  let server: FastifyInstance;
  try {
    server = await startHttp(app);
  } catch (err) {
    await app.close();
    throw err;
  }
  let stopping = false;
  const stop = (signal: string) => () => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, 'stopping: no new connections, finishing requests in flight');
    server.close()
      .then(() => app.close())
      .then(() => { log.info('stopped'); log.flush(); process.exit(0); })
      .catch((err: unknown) => { log.error({ err }, 'stopping failed'); log.flush(); process.exit(1); });
  };
  process.once('SIGTERM', stop('SIGTERM'));
  process.once('SIGINT', stop('SIGINT'));
  return server;
}
