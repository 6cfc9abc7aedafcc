import { spawn } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { Redis } from 'ioredis';
import type { Logger } from 'pino';
import { redactUrl } from '../logger.js';

/** True when something answers PING at `url` within `timeoutMs`. */
export async function redisAnswers(url: string, timeoutMs = 1500): Promise<boolean> {
  const r = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, enableOfflineQueue: false, retryStrategy: () => null, connectTimeout: timeoutMs });
  r.on('error', () => {});
  try {
    await r.connect();
    return (await r.ping()) === 'PONG';
  } catch {
    return false;
  } finally {
    r.disconnect();
  }
}

/**
 * For `npm start` on a machine with no Redis running: a private redis-server bound to loopback,
 * keeping its data (append-only file) under `dir` so queued jobs survive a restart.
 * Returns its URL and a stop function; throws a readable message when the binary is missing.
 */
export async function startPrivateRedis(url: string, dir: string, log: Logger): Promise<{ url: string; stop(): Promise<void> }> {
  const port = new URL(url).port || '6379';
  await mkdir(dir, { recursive: true });
  const child = spawn('redis-server', ['--port', port, '--bind', '127.0.0.1', '--dir', dir, '--appendonly', 'yes', '--save', '', '--protected-mode', 'yes'], { stdio: ['ignore', 'ignore', 'pipe'] });
  const spawned = await new Promise<Error | undefined>((resolve) => {
    child.once('error', (err) => resolve(err));
    child.once('spawn', () => resolve(undefined));
  });
  if (spawned) {
    const missing = (spawned as NodeJS.ErrnoException).code === 'ENOENT';
    throw new Error(missing
      ? `no Redis answers at ${redactUrl(url)} and redis-server is not installed. Install it (e.g. "apt-get install redis-server" or "brew install redis") or set REDIS_URL to a running Redis.`
      : `could not start redis-server: ${spawned.message}`);
  }
  const local = `redis://127.0.0.1:${port}`;
  for (let i = 0; i < 100 && !(await redisAnswers(local, 200)); i++) {
    if (child.exitCode !== null) throw new Error(`redis-server exited with code ${child.exitCode} (port ${port} in use?)`);
    await new Promise((r) => setTimeout(r, 100));
  }
  log.info({ port, dir }, 'started a private redis-server');
  return {
    url: local,
    stop: async () => {
      if (child.exitCode !== null) return;
      child.kill('SIGTERM');
      await new Promise((r) => child.once('exit', r));
    },
  };
}
