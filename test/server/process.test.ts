import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort, startServerProcess, tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { randomBody, send } from './http.js';
import { TOKEN } from './harness.js';

const BIN = ['--import', 'tsx', 'src/bin/stevedore.ts'];

describe('stevedore server and npm start (processes)', () => {
  let redis: TestRedis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let env: NodeJS.ProcessEnv;
  beforeAll(async () => {
    [redis, tmp] = await Promise.all([startRedis(), tempDir('stevedore-serverproc-')]);
    env = {
      REDIS_URL: redis.url, STEVEDORE_QUEUE: 'proc', STEVEDORE_BACKENDS: `default=file://${join(tmp.path, 'objects')}`,
      STEVEDORE_STAGING_DIR: join(tmp.path, 'staging'), LOG_LEVEL: 'warn',
    };
  });
  afterAll(async () => {
    await redis?.stop();
    await tmp?.remove();
  });

  it('refuses to listen on a non-loopback address without a token', async () => {
    const child = spawn(process.execPath, [...BIN, 'server'], { env: { ...process.env, ...env, STEVEDORE_HTTP_HOST: '0.0.0.0', STEVEDORE_HTTP_PORT: String(await freePort()) }, stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    child.stderr.on('data', (b: Buffer) => { err += b.toString(); });
    const code = await new Promise<number | null>((resolve) => child.on('exit', resolve));
    expect(code).not.toBe(0);
    expect(err).toMatch(/refusing to listen on 0\.0\.0\.0 without STEVEDORE_API_TOKEN/);
  });

  it('stevedore start serves HTTP and runs jobs in one process; SIGTERM closes both', async () => {
    const port = await freePort();
    const proc = await startServerProcess({ command: process.execPath, args: [...BIN, 'start'], port, env: { ...env, STEVEDORE_HTTP_PORT: String(port), STEVEDORE_API_TOKEN: TOKEN } });
    const url = `http://127.0.0.1:${port}`;
    try {
      const health = await send(`${url}/health`, 'GET', undefined);
      expect(health.status, health.body).toBe(200);
      const body = randomBody(1 << 20);
      const put = await send(`${url}/sites/proc/artifacts/b1?wait=30`, 'PUT', body.stream, { authorization: `Bearer ${TOKEN}` });
      expect(put.status, put.body).toBe(200);
      expect(JSON.parse(put.body)).toMatchObject({ sha256: body.sha256() });
      expect((await send(`${url}/sites/proc/artifacts/b1`, 'GET', undefined)).status).toBe(401);
    } finally {
      await proc.stop('SIGTERM');
    }
    expect(proc.child.exitCode, proc.output()).toBe(0);
    await expect(send(`${url}/health`, 'GET', undefined)).rejects.toThrow(/ECONNREFUSED/);
  });
});
