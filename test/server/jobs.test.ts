import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { sessionLockName } from '../../src/session/ids.js';
import { send } from './http.js';
import { eventually, testServer, TOKEN, type TestServer } from './harness.js';

// One Redis and one server (with its in-process worker) for the file; each test its own jobs.
let redis: TestRedis;
let t: TestServer;
beforeAll(async () => {
  redis = await startRedis();
  t = await testServer(redis.url);
});
afterAll(async () => {
  await t?.close();
  await redis?.stop();
});

describe('HTTP jobs API', () => {

  const inline = (s: string) => ({ key: `inline/${s}`, source: { base64: Buffer.from(s).toString('base64') } });

  it('enqueues a job (202 { id }) and reports its state and result', async () => {
    const res = await t.server.inject({ method: 'POST', url: '/jobs/store', headers: t.auth, payload: inline('hello') });
    expect(res.statusCode).toBe(202);
    const { id } = res.json() as { id: string };
    await t.app.client().result(id);
    const got = await t.server.inject({ method: 'GET', url: `/jobs/${id}`, headers: t.auth });
    expect(got.statusCode).toBe(200);
    expect(got.json()).toMatchObject({ id, type: 'store', state: 'completed', attemptsMade: 1, result: { key: 'inline/hello', size: 5 } });
  });

  it('?wait answers 200 with the result, the code\'s status on failure', async () => {
    const ok = await t.server.inject({ method: 'POST', url: '/jobs/store?wait=30', headers: t.auth, payload: inline('waited') });
    expect(ok.statusCode).toBe(200);
    expect(ok.json()).toMatchObject({ key: 'inline/waited', size: 6, backend: 'default' });
    const bad = await t.server.inject({ method: 'POST', url: '/jobs/store?wait=30', headers: t.auth, payload: { ...inline('x'), sha256: '0'.repeat(64) } });
    expect(bad.statusCode).toBe(422);
    expect(bad.json()).toMatchObject({ error: 'ChecksumMismatch' });
    const missing = await t.server.inject({ method: 'POST', url: '/jobs/fetch-to-staging?wait=30', headers: t.auth, payload: { key: 'no/such', dest: 'out' } });
    expect(missing.statusCode).toBe(404);
    expect(missing.json()).toMatchObject({ error: 'NotFound' });
  });

  it('?wait that runs out answers 202 { id } and the job goes on', async () => {
    await t.app.client().queue.pause();
    try {
      const res = await t.server.inject({ method: 'POST', url: '/jobs/store?wait=0.2', headers: t.auth, payload: inline('later') });
      expect(res.statusCode).toBe(202);
      const { id } = res.json() as { id: string };
      const state = await t.server.inject({ method: 'GET', url: `/jobs/${id}`, headers: t.auth });
      expect(state.json()).toMatchObject({ id, state: 'waiting' });
      await t.app.client().queue.resume();
      await expect(t.app.client().result(id)).resolves.toMatchObject({ key: 'inline/later' });
    } finally {
      await t.app.client().queue.resume();
    }
  });

  it('refuses invalid payloads with 400 naming the field, before enqueueing', async () => {
    // Every job in any state: one an earlier test left running may finish meanwhile, and still counts.
    const everyJob = () => t.app.client().queue.getJobCountByTypes('waiting', 'active', 'delayed', 'prioritized', 'completed', 'failed');
    const before = await everyJob();
    const res = await t.server.inject({ method: 'POST', url: '/jobs/store', headers: t.auth, payload: { key: '../x', source: { base64: 'aGk=' } } });
    expect(res.statusCode).toBe(400);
    expect(res.json()).toMatchObject({ error: 'InvalidInput' });
    expect((res.json() as { message: string }).message).toMatch(/key/);
    const extra = await t.server.inject({ method: 'POST', url: '/jobs/log', headers: t.auth, payload: { site: 's', build: 'b', action: 'a', status: 'ok', surprise: 1 } });
    expect(extra.statusCode).toBe(400);
    expect((extra.json() as { message: string }).message).toMatch(/surprise/);
    const type = await t.server.inject({ method: 'POST', url: '/jobs/nope', headers: t.auth, payload: {} });
    expect(type.statusCode).toBe(400);
    expect((type.json() as { message: string }).message).toMatch(/type/);
    const json = await t.server.inject({ method: 'POST', url: '/jobs/store', headers: { ...t.auth, 'content-type': 'application/json' }, payload: '{not json' });
    expect(json.statusCode).toBe(400);
    expect(json.json()).toMatchObject({ error: 'InvalidInput' });
    const wait = await t.server.inject({ method: 'POST', url: '/jobs/store?wait=soon', headers: t.auth, payload: inline('w') });
    expect(wait.statusCode).toBe(400);
    expect(await everyJob()).toBe(before);
  });

  it('serves the jobs API over a real socket too', async () => {
    const url = await t.listen();
    const res = await send(`${url}/jobs/store?wait=30`, 'POST', Buffer.from(JSON.stringify(inline('socket'))), { ...t.auth, 'content-type': 'application/json' });
    expect(res.status, res.body).toBe(200);
    expect(JSON.parse(res.body)).toMatchObject({ key: 'inline/socket', size: 6 });
    const bad = await send(`${url}/jobs/store`, 'POST', Buffer.from('{"key":1}'), { ...t.auth, 'content-type': 'application/json' });
    expect(bad.status).toBe(400);
    expect(JSON.parse(bad.body)).toMatchObject({ error: 'InvalidInput' });
  });

  it('GET /jobs/<id> of an unknown job is 404', async () => {
    const res = await t.server.inject({ method: 'GET', url: '/jobs/does-not-exist', headers: t.auth });
    expect(res.statusCode).toBe(404);
    expect(res.json()).toMatchObject({ error: 'NotFound' });
  });

  it('POST /jobs enqueues a batch in one addBulk, with per-item results in order', async () => {
    const jobs = Array.from({ length: 1000 }, (_, i) => (i % 250 === 7
      ? { type: 'log', data: { site: 'bad/site', build: 'b', action: 'a', status: 's' } }
      : { type: 'log', data: { site: 'batch', build: `b${i}`, action: 'deploy', status: 'ok' }, opts: { priority: 1 } }));
    jobs.push({ type: 'migrate?', data: {} } as never);
    const res = await t.server.inject({ method: 'POST', url: '/jobs', headers: t.auth, payload: { jobs } });
    expect(res.statusCode).toBe(200);
    const { results } = res.json() as { results: Array<{ id?: string; error?: string; message?: string }> };
    expect(results).toHaveLength(1001);
    results.forEach((r, i) => {
      if (i % 250 === 7 || i === 1000) expect(r).toMatchObject({ error: 'InvalidInput' });
      else expect(r.id).toMatch(/\S/);
    });
    expect(results[7]!.message).toMatch(/jobs\.7\.data\.site/);
    const ids = results.filter((r) => r.id).map((r) => r.id!);
    expect(new Set(ids).size).toBe(ids.length);
    const job = await t.app.client().getJob(ids[3]!);
    expect(job?.data).toMatchObject({ build: 'b3' });
    const badOpts = await t.server.inject({ method: 'POST', url: '/jobs', headers: t.auth, payload: { jobs: [{ type: 'log', data: jobs[0]!.data, opts: { repeat: { every: 1 } } }] } });
    expect((badOpts.json() as { results: Array<{ message: string }> }).results[0]!.message).toMatch(/jobs\.0\.opts.*repeat/);
  });

  it('needs the bearer token on every route but GET /health (401 { error, message })', async () => {
    for (const [method, url] of [['POST', '/jobs/store'], ['GET', '/jobs/1'], ['POST', '/jobs'], ['GET', '/sites/s/versions'], ['PUT', '/sites/s/artifacts/b'], ['GET', '/api/storage-worker/sessions']] as const) {
      const none = await t.server.inject({ method, url, payload: method === 'GET' ? undefined : {} });
      expect(none.statusCode, `${method} ${url}`).toBe(401);
      expect(Object.keys(none.json() as object).sort()).toEqual(['error', 'message']);
      const wrong = await t.server.inject({ method, url, headers: { authorization: 'Bearer wrong-token-0000000000' }, payload: method === 'GET' ? undefined : {} });
      expect(wrong.statusCode).toBe(401);
    }
    const basic = `Basic ${Buffer.from(`admin:${TOKEN}`).toString('base64')}`;
    // Basic auth is the dashboard's only: the API refuses it.
    expect((await t.server.inject({ method: 'GET', url: '/jobs/1', headers: { authorization: basic } })).statusCode).toBe(401);
    // The operator's plugins sit behind the same hook; the dashboard also takes basic auth.
    for (const url of ['/events', '/metrics', '/admin/queues', '/admin/queues/api/queues']) {
      const none = await t.server.inject({ method: 'GET', url });
      expect(none.statusCode, url).toBe(401);
      expect(Object.keys(none.json() as object).sort()).toEqual(['error', 'message']);
    }
    expect((await t.server.inject({ method: 'GET', url: '/admin/queues' })).headers['www-authenticate']).toMatch(/^Basic /);
    const board = await t.server.inject({ method: 'GET', url: '/admin/queues/api/queues', headers: { authorization: basic } });
    expect(board.statusCode).toBe(200);
    expect(JSON.stringify(board.json())).toContain(t.app.config.queue);
    const metrics = await t.server.inject({ method: 'GET', url: '/metrics', headers: t.auth });
    expect(metrics.statusCode).toBe(200);
    expect(metrics.body).toMatch(/^# HELP stevedore_/m);
    const health = await t.server.inject({ method: 'GET', url: '/health' });
    expect(health.json()).toMatchObject({ status: 'ok', redis: 'ok', backends: { default: 'ok' } });
    expect(health.statusCode).toBe(200);
    expect((await t.server.inject({ method: 'HEAD', url: '/health' })).statusCode).toBe(200);
  });
});

describe('DELETE /jobs/<id> (cancel)', () => {

  it('removes a waiting job', async () => {
    await t.app.client().queue.pause();
    try {
      const { id } = (await t.server.inject({ method: 'POST', url: '/jobs/log', headers: t.auth, payload: { site: 's', build: 'b', action: 'a', status: 'ok' } })).json() as { id: string };
      const del = await t.server.inject({ method: 'DELETE', url: `/jobs/${id}`, headers: t.auth });
      expect(del.statusCode).toBe(200);
      expect(del.json()).toEqual({ id, outcome: 'removed' });
      expect((await t.server.inject({ method: 'GET', url: `/jobs/${id}`, headers: t.auth })).statusCode).toBe(404);
    } finally {
      await t.app.client().queue.resume();
    }
  });

  it('stops a running job, which fails Cancelled (410 to a waiting caller) and is never retried', async () => {
    // A repack that waits for a session lock held here: running, and stoppable only by its signal.
    const lease = await t.app.locks().acquire(sessionLockName('o__r__cancel'), new AbortController().signal);
    try {
      const waiting = t.server.inject({ method: 'POST', url: '/jobs/repack-session?wait=30', headers: t.auth, payload: { session: 'o__r__cancel', ops: [{ op: 'put', path: 'f', text: 'x' }] } });
      let id: string | undefined;
      await eventually(async () => {
        // This test's repack, not a job an earlier test left running on the shared queue.
        const job = (await t.app.client().queue.getJobs(['active'])).find((j) => j.name === 'repack-session' && (j.data as { session?: string }).session === 'o__r__cancel');
        id = job?.id;
        return id !== undefined;
      }, 'the repack is running');
      const del = await t.server.inject({ method: 'DELETE', url: `/jobs/${id!}`, headers: t.auth });
      expect(del.statusCode).toBe(202);
      expect(del.json()).toEqual({ id, outcome: 'cancelling' });
      const answer = await waiting;
      expect(answer.statusCode).toBe(410);
      expect(answer.json()).toMatchObject({ error: 'Cancelled' });
      const state = (await t.server.inject({ method: 'GET', url: `/jobs/${id!}`, headers: t.auth })).json() as { state: string; attemptsMade: number; failedReason: string };
      expect(state).toMatchObject({ state: 'failed', attemptsMade: 1 });
      expect(state.failedReason).toMatch(/^Cancelled:/);
      expect((await t.server.inject({ method: 'DELETE', url: `/jobs/${id!}`, headers: t.auth })).json()).toEqual({ id, outcome: 'cancelled' });
    } finally {
      await lease.release();
    }
    // Nothing of it was applied.
    expect((await t.server.inject({ method: 'HEAD', url: '/api/storage-worker/sessions/o__r__cancel', headers: t.auth })).statusCode).toBe(404);
  });

  it('a finished job is 409, an unknown one 404', async () => {
    const done = (await t.server.inject({ method: 'POST', url: '/jobs/log?wait=30', headers: t.auth, payload: { site: 's', build: 'b', action: 'a', status: 'ok' } }));
    expect(done.statusCode).toBe(200);
    const [job] = await t.app.client().queue.getJobs(['completed']);
    const del = await t.server.inject({ method: 'DELETE', url: `/jobs/${job!.id!}`, headers: t.auth });
    expect(del.statusCode).toBe(409);
    expect(del.json()).toMatchObject({ error: 'PreconditionFailed' });
    expect((await t.server.inject({ method: 'DELETE', url: '/jobs/nope', headers: t.auth })).statusCode).toBe(404);
  });
});
