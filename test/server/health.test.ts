import { join } from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { composeApp } from '../../src/app.js';
import { loadConfig } from '../../src/config.js';
import { createLogger } from '../../src/logger.js';
import { buildServer } from '../../src/server/server.js';
import { freePort, tempDir } from '../harness/process.js';
import { TOKEN } from './harness.js';

describe('GET /health with Redis down (RELIABILITY #24)', () => {
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  beforeAll(async () => { tmp = await tempDir('stevedore-health-'); });
  afterAll(async () => { await tmp?.remove(); });

  it('answers 503 naming the part that is down, without the Redis password in the answer or the logs', async () => {
    const password = 'redis-secret-pw-42';
    const env = {
      REDIS_URL: `redis://:${password}@127.0.0.1:${await freePort()}`, STEVEDORE_BACKENDS: `default=file://${join(tmp.path, 'objects')}`,
      STEVEDORE_STAGING_DIR: join(tmp.path, 'staging'), STEVEDORE_API_TOKEN: TOKEN,
    };
    let lines = '';
    const log = createLogger('debug', new Writable({ write(c, _e, cb) { lines += String(c); cb(); } }));
    const app = composeApp(loadConfig(env, tmp.path), { cwd: tmp.path, env, log });
    const server = await buildServer({ app });
    try {
      const res = await server.inject({ method: 'GET', url: '/health' });
      expect(res.statusCode).toBe(503);
      const body = res.json() as { status: string; redis: string; backends: Record<string, string> };
      expect(body.status).toBe('down');
      expect(body.redis).not.toBe('ok');
      expect(body.backends).toEqual({ default: 'ok' });
      // A job cannot be enqueued either: an error answer, not a hang.
      const job = await server.inject({ method: 'POST', url: '/jobs/log', headers: { authorization: `Bearer ${TOKEN}` }, payload: { site: 's', build: 'b', action: 'a', status: 'ok' } });
      expect(job.statusCode).toBe(503);
      expect(job.json()).toMatchObject({ error: 'Transient' });
      expect(Object.keys(job.json() as object).sort()).toEqual(['error', 'message']);
      expect(res.body + job.body).not.toContain(password);
      expect(lines).not.toContain(password);
      expect(lines + res.body + job.body).not.toContain(TOKEN);
    } finally {
      await server.close();
      await app.close({ force: true });
    }
  });

  it('the dashboard prefix takes basic auth with the token as password, the API does not', async () => {
    const env = { REDIS_URL: `redis://127.0.0.1:${await freePort()}`, STEVEDORE_BACKENDS: `default=file://${join(tmp.path, 'objects')}`, STEVEDORE_STAGING_DIR: join(tmp.path, 'staging'), STEVEDORE_API_TOKEN: TOKEN };
    const app = composeApp(loadConfig(env, tmp.path), { cwd: tmp.path, env, log: createLogger('silent') });
    const server = await buildServer({ app });
    // Where the dashboard plugin mounts (another engineer's; any route under the prefix will do).
    server.get('/admin/queues/ping', async () => ({ ok: true }));
    try {
      const basic = (pw: string) => ({ authorization: `Basic ${Buffer.from(`admin:${pw}`).toString('base64')}` });
      expect((await server.inject({ method: 'GET', url: '/admin/queues/ping', headers: basic(TOKEN) })).json()).toEqual({ ok: true });
      expect((await server.inject({ method: 'GET', url: '/admin/queues/ping', headers: { authorization: `Bearer ${TOKEN}` } })).statusCode).toBe(200);
      const wrong = await server.inject({ method: 'GET', url: '/admin/queues/ping', headers: basic('nope-nope-nope-nope') });
      expect(wrong.statusCode).toBe(401);
      expect(wrong.headers['www-authenticate']).toMatch(/^Basic /);
      const none = await server.inject({ method: 'GET', url: '/admin/queues/ping' });
      expect(none.statusCode).toBe(401);
      expect(none.json()).toMatchObject({ error: 'PermissionDenied' });
      // Outside the dashboard, basic auth is no credential.
      expect((await server.inject({ method: 'GET', url: '/sites/s/versions', headers: basic(TOKEN) })).statusCode).toBe(401);
    } finally {
      await server.close();
      await app.close({ force: true });
    }
  });
});
