import { randomUUID } from 'node:crypto';
import { mkdir, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import type { Worker } from 'bullmq';
import type { FastifyInstance } from 'fastify';
import { composeApp, type App } from '../../src/app.js';
import { loadConfig } from '../../src/config.js';
import { createLogger } from '../../src/logger.js';
import { startWorker } from '../../src/queue/worker.js';
import { buildServer } from '../../src/server/server.js';
import { startWebhooks } from '../../src/webhooks/start.js';
import { tempDir } from '../harness/process.js';

export const TOKEN = 'test-token-0123456789abcdef';

export interface TestServer {
  app: App;
  server: FastifyInstance;
  worker: Worker;
  dir: string;
  stagingDir: string;
  /** Every log line the server and worker wrote. */
  logs(): string;
  /** `http://127.0.0.1:<port>` once `listen` ran. */
  url: string;
  listen(): Promise<string>;
  /** Starts another worker on the same queue (closed with the server): for a server made with `worker: false`. */
  startWorker(): Promise<Worker>;
  auth: { authorization: string };
  close(): Promise<void>;
}

/**
 * A server and an in-process worker on one App (a fresh queue name), against a real Redis and the
 * backends `backends` names (`default` is a filesystem root in a temp dir unless given); with
 * STEVEDORE_WEBHOOK_URL in `env`, the worker's webhooks run too.
 */
export async function testServer(redisUrl: string, opts: { backends?: string; env?: Record<string, string>; token?: string | null; worker?: boolean } = {}): Promise<TestServer> {
  const tmp = await tempDir('stevedore-server-');
  const stagingDir = join(tmp.path, 'staging');
  await mkdir(stagingDir, { recursive: true });
  const token = opts.token === null ? undefined : opts.token ?? TOKEN;
  const env: NodeJS.ProcessEnv = {
    REDIS_URL: redisUrl,
    STEVEDORE_QUEUE: `http-${randomUUID().slice(0, 8)}`,
    STEVEDORE_BACKENDS: opts.backends ?? `default=file://${join(tmp.path, 'objects')}`,
    STEVEDORE_STAGING_DIR: stagingDir,
    LOG_LEVEL: 'info',
    ...(token ? { STEVEDORE_API_TOKEN: token } : {}),
    ...opts.env,
  };
  const config = loadConfig(env, tmp.path);
  let lines = '';
  const sink = new Writable({ write(chunk, _enc, cb) { lines += String(chunk); cb(); } });
  const log = createLogger(config.logLevel, sink);
  const app = composeApp(config, { cwd: tmp.path, env, log });
  const buckets = await app.buckets();
  // As a worker process does when STEVEDORE_WEBHOOK_URL is set: its jobs' ends are delivered.
  const webhooks = startWebhooks(app, log);
  const spawn = () => startWorker(app.connect('worker'), {
    queue: config.queue, prefix: config.prefix, concurrency: 4, stalledIntervalMs: 5_000, retention: app.retention,
    ...(webhooks ? { hooks: [webhooks.hooks] } : {}),
  }, { buckets, staging: app.staging, log, limits: { maxInlineBytes: config.maxInlineBytes }, locks: app.locks(), progressIntervalMs: 0 });
  const worker = spawn();
  const extra: Worker[] = [];
  if (opts.worker === false) await worker.close();
  else await worker.waitUntilReady();
  const server = await buildServer({ app });
  const t: TestServer = {
    app, server, worker, dir: tmp.path, stagingDir, url: '',
    logs: () => lines,
    auth: { authorization: `Bearer ${token ?? ''}` },
    async listen() {
      t.url = await server.listen({ host: '127.0.0.1', port: 0 });
      return t.url;
    },
    async startWorker() {
      const w = spawn();
      extra.push(w);
      await w.waitUntilReady();
      return w;
    },
    async close() {
      await server.close();
      await Promise.all([worker, ...extra].map((w) => w.close()));
      await webhooks?.close(1_000);
      await app.close();
      await tmp.remove();
    },
  };
  return t;
}

/** Files left in the staging area (temp files included). */
export async function stagedFiles(dir: string): Promise<string[]> {
  return (await readdir(dir, { recursive: true, withFileTypes: true })).filter((e) => e.isFile()).map((e) => join(e.parentPath, e.name));
}

/** Polls `check` until it holds (state that settles in the background), failing after `ms`. */
export async function eventually(check: () => Promise<boolean>, what: string, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`still not true after ${ms} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
