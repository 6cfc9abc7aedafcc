import { createHash, randomBytes } from 'node:crypto';
import { lstat, readdir, readlink, writeFile } from 'node:fs/promises';
import { get as httpGet } from 'node:http';
import { join } from 'node:path';
import { Queue } from 'bullmq';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { webhookQueueName } from '../../src/webhooks/publisher.js';
import { freePort } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { startS3rver, S3RVER_CREDENTIALS, type S3rver } from '../harness/s3.js';
import { startReceiver } from '../harness/webhook-receiver.js';
import { fetchDigest, randomBody, send } from './http.js';
import { eventually, stagedFiles, testServer, TOKEN, type TestServer } from './harness.js';

const SOAK = process.env.STEVEDORE_SOAK === '1';
/** The PageWright artifact: 200 MiB under soak, enough by default for memory to show whether it is held. */
const BIG = SOAK ? 200 << 20 : 96 << 20;
const sha = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

describe('artifact routes (the build service)', () => {
  let redis: TestRedis;
  let s3: S3rver;
  let t: TestServer;
  let root: string;
  beforeAll(async () => {
    [redis, s3] = await Promise.all([startRedis(), startS3rver()]);
    const bucket = await s3.bucket();
    // The S3 SDK reads its credentials from the environment, as in a deployment (this fork's only).
    process.env.AWS_ACCESS_KEY_ID = S3RVER_CREDENTIALS.accessKeyId;
    process.env.AWS_SECRET_ACCESS_KEY = S3RVER_CREDENTIALS.secretAccessKey;
    t = await testServer(redis.url, { backends: `default=file:./objects,s3=s3://${bucket}/pre?endpoint=${s3.endpoint}&forcePathStyle=true` });
    root = join(t.dir, 'objects');
    await t.listen();
  });
  afterAll(async () => {
    await t?.close();
    await Promise.all([redis?.stop(), s3?.stop()]);
  });

  it('the PageWright flow: PUT a large artifact with memory flat, GET it back verified, log, versions', async () => {
    const body = randomBody(BIG);
    const before = process.memoryUsage().rss;
    let peak = before;
    const sampler = setInterval(() => { peak = Math.max(peak, process.memoryUsage().rss); }, 20);
    let put;
    try {
      put = await send(`${t.url}/sites/pagewright/artifacts/build-1?wait=120`, 'PUT', body.stream, { ...t.auth, 'content-type': 'application/gzip' });
    } finally {
      clearInterval(sampler);
    }
    expect(put.status, put.body).toBe(200);
    expect(JSON.parse(put.body)).toEqual({ backend: 'default', key: 'sites/pagewright/artifacts/build-1.tar.gz', size: BIG, sha256: body.sha256() });
    // Streamed through: the process (server, client and worker in one) grew by less than the body,
    // which a buffered request would hold once and a buffered job again. The margin is for the
    // worker's copy buffers and a GC that lags on a loaded machine.
    expect(peak - before).toBeLessThan(BIG * 0.75);
    expect((await lstat(join(root, 'sites/pagewright/artifacts/build-1.tar.gz'))).size).toBe(BIG);

    const got = await fetchDigest(`${t.url}/sites/pagewright/artifacts/build-1`, t.auth);
    expect(got).toMatchObject({ status: 200, size: BIG, sha256: body.sha256() });
    expect(got.broken).toBeUndefined();
    expect(got.headers['content-length']).toBe(String(BIG));
    expect(got.headers.etag).toBe(`"${body.sha256()}"`);
    expect(got.headers['content-type']).toBe('application/gzip');

    const log = await send(`${t.url}/sites/pagewright/logs?wait=30`, 'POST', Buffer.from(JSON.stringify({ build_id: 'build-1', action: 'deploy', status: 'success', metadata: { by: 'ci' } })), { ...t.auth, 'content-type': 'application/json' });
    expect(log.status, log.body).toBe(200);
    expect(JSON.parse(log.body).key).toMatch(/^sites\/pagewright\/logs\/.*-build-1\.json$/);

    const versions = await send(`${t.url}/sites/pagewright/versions`, 'GET', undefined, t.auth);
    expect(versions.status).toBe(200);
    const v = JSON.parse(versions.body) as { site: string; count: number; versions: Array<{ build: string; artifact?: { size: number }; logs: string[] }> };
    expect(v).toMatchObject({ site: 'pagewright', count: 1 });
    expect(v.versions[0]).toMatchObject({ build: 'build-1', artifact: { size: BIG } });
    expect(v.versions[0]!.logs).toHaveLength(1);
    expect(await stagedFiles(t.stagingDir)).toEqual([]);
  });

  it('PUT without ?wait answers 202 { id }; the staged upload is removed once the job is over', async () => {
    const bytes = Buffer.from('artifact without a wait');
    const res = await t.server.inject({ method: 'PUT', url: '/sites/s1/artifacts/b1', headers: { ...t.auth, 'x-content-sha256': sha(bytes) }, payload: bytes });
    expect(res.statusCode, res.body).toBe(202);
    const { id } = res.json() as { id: string };
    await expect(t.app.client().result(id)).resolves.toMatchObject({ sha256: sha(bytes), size: bytes.length });
    await eventually(async () => (await stagedFiles(t.stagingDir)).length === 0, 'staging empty');
  });

  it('GET and HEAD: Range answers 206 as stored, If-None-Match 304, a missing build 404', async () => {
    const bytes = Buffer.from('0123456789abcdefghij');
    expect((await t.server.inject({ method: 'PUT', url: '/sites/s2/artifacts/b?wait=30', headers: t.auth, payload: bytes })).statusCode).toBe(200);
    const head = await t.server.inject({ method: 'HEAD', url: '/sites/s2/artifacts/b', headers: t.auth });
    expect(head.statusCode).toBe(200);
    expect(head.headers).toMatchObject({ 'content-length': '20', etag: `"${sha(bytes)}"`, 'accept-ranges': 'bytes' });
    expect(head.body).toBe('');
    const range = await t.server.inject({ method: 'GET', url: '/sites/s2/artifacts/b', headers: { ...t.auth, range: 'bytes=5-9' } });
    expect(range.statusCode).toBe(206);
    expect(range.body).toBe('56789');
    expect(range.headers).toMatchObject({ 'content-range': 'bytes 5-9/20', 'content-length': '5' });
    const suffix = await t.server.inject({ method: 'GET', url: '/sites/s2/artifacts/b', headers: { ...t.auth, range: 'bytes=-3' } });
    expect(suffix.body).toBe('hij');
    const past = await t.server.inject({ method: 'GET', url: '/sites/s2/artifacts/b', headers: { ...t.auth, range: 'bytes=20-' } });
    expect(past.statusCode).toBe(416);
    expect(past.headers['content-range']).toBe('bytes */20');
    const cached = await t.server.inject({ method: 'GET', url: '/sites/s2/artifacts/b', headers: { ...t.auth, 'if-none-match': `"${sha(bytes)}"` } });
    expect(cached.statusCode).toBe(304);
    const missing = await t.server.inject({ method: 'GET', url: '/sites/s2/artifacts/nope', headers: t.auth });
    expect(missing.statusCode).toBe(404);
    expect(missing.json()).toMatchObject({ error: 'NotFound' });
    // The answer names the key, not where the server keeps it.
    const site = await t.server.inject({ method: 'GET', url: '/sites/never/artifacts/nope', headers: t.auth });
    expect(site.statusCode).toBe(404);
    expect((site.json() as { message: string }).message).toContain('sites/never/artifacts/nope.tar.gz');
    expect((site.json() as { message: string }).message).not.toContain(t.dir);
  });

  it('refuses bad sites, builds and headers with 400 before any I/O', async () => {
    for (const url of ['/sites/%2E%2E/artifacts/x', '/sites/s/artifacts/..', '/sites/s%20t/artifacts/x', '/sites/s/artifacts/b%2Fc', '/sites/s/artifacts/%00', `/sites/${'s'.repeat(129)}/artifacts/b`, '/sites/s/artifacts/b?backend=nope']) {
      for (const method of ['GET', 'PUT'] as const) {
        // Over the socket, so the path reaches the server as sent (an inject would resolve dot segments).
        const res = await send(`${t.url}${url}`, method, method === 'PUT' ? Buffer.from('x') : undefined, t.auth);
        expect(res.status, `${method} ${url}`).toBe(400);
        expect(JSON.parse(res.body)).toMatchObject({ error: 'InvalidInput' });
      }
    }
    const badSha = await t.server.inject({ method: 'PUT', url: '/sites/s/artifacts/b', headers: { ...t.auth, 'x-content-sha256': 'abc' }, payload: 'x' });
    expect(badSha.statusCode).toBe(400);
    const badLog = await t.server.inject({ method: 'POST', url: '/sites/s/logs', headers: t.auth, payload: { build_id: 'b/c', action: 'a', status: 's' } });
    expect(badLog.statusCode).toBe(400);
    expect((badLog.json() as { message: string }).message).toMatch(/build_id/);
    expect(await stagedFiles(t.stagingDir)).toEqual([]);
  });

  it('X-Content-SHA256 that does not match the body: 422, nothing enqueued or stored, staging clean', async () => {
    const before = await t.app.client().queue.count();
    const res = await t.server.inject({ method: 'PUT', url: '/sites/s3/artifacts/b', headers: { ...t.auth, 'x-content-sha256': sha('other') }, payload: 'these bytes' });
    expect(res.statusCode).toBe(422);
    expect(res.json()).toMatchObject({ error: 'ChecksumMismatch' });
    expect(await t.app.client().queue.count()).toBe(before);
    expect((await t.server.inject({ method: 'HEAD', url: '/sites/s3/artifacts/b', headers: t.auth })).statusCode).toBe(404);
    expect(await stagedFiles(t.stagingDir)).toEqual([]);
  });

  it('a digest mismatch found at the end aborts the response: never a clean end on bad bytes (RELIABILITY #28)', async () => {
    const body = randomBody(3 << 20);
    const put = await send(`${t.url}/sites/rot/artifacts/b?wait=30`, 'PUT', body.stream, t.auth);
    expect(put.status).toBe(200);
    // Bit rot on disk, same size and inode: the sidecar still claims the old digest.
    const path = join(root, 'sites/rot/artifacts/b.tar.gz');
    await writeFile(path, Buffer.from('X'), { flag: 'r+' });
    const got = await fetchDigest(`${t.url}/sites/rot/artifacts/b`, t.auth);
    expect(got.status).toBe(200);
    expect(got.broken).toBeDefined();
    expect(got.size).toBeLessThan(3 << 20);
    // A range is served as stored (it cannot be checked against the whole object's digest).
    const range = await fetchDigest(`${t.url}/sites/rot/artifacts/b`, { ...t.auth, range: 'bytes=0-0' });
    expect(range).toMatchObject({ status: 206, size: 1 });
    // The server is unaffected.
    expect((await send(`${t.url}/health`, 'GET', undefined)).status).toBe(200);
  });

  it('a client gone mid-download releases the object: no descriptor stays open on it', async () => {
    await t.server.inject({ method: 'PUT', url: '/sites/s/artifacts/gone?wait=60', headers: t.auth, payload: Buffer.alloc(16 << 20, 3) });
    const openOnObject = async () => {
      let n = 0;
      for (const fd of await readdir('/proc/self/fd')) {
        if ((await readlink(`/proc/self/fd/${fd}`).catch(() => '')).endsWith('artifacts/gone.tar.gz')) n++;
      }
      return n;
    };
    for (const range of [undefined, 'bytes=1-']) {
      for (let i = 0; i < 3; i++) {
        await new Promise<void>((resolve) => {
          const req = httpGet(`${t.url}/sites/s/artifacts/gone`, { headers: { ...t.auth, ...(range ? { range } : {}) } }, (res) => {
            res.once('data', () => { req.destroy(); resolve(); });
          });
          req.on('error', () => {});
        });
      }
      await eventually(async () => (await openOnObject()) === 0, `descriptors on the object released after aborted ${range ? 'ranged ' : ''}GETs`);
    }
  });

  it('round-trips an artifact through s3rver (?backend=s3)', async () => {
    const body = randomBody(6 << 20);
    const put = await send(`${t.url}/sites/cloud/artifacts/b1?backend=s3&wait=60`, 'PUT', body.stream, t.auth);
    expect(put.status, put.body).toBe(200);
    expect(JSON.parse(put.body)).toMatchObject({ backend: 's3', size: 6 << 20, sha256: body.sha256() });
    const got = await fetchDigest(`${t.url}/sites/cloud/artifacts/b1?backend=s3`, t.auth);
    expect(got).toMatchObject({ status: 200, size: 6 << 20, sha256: body.sha256() });
    expect(got.broken).toBeUndefined();
    const versions = await t.server.inject({ method: 'GET', url: '/sites/cloud/versions?backend=s3', headers: t.auth });
    expect((versions.json() as { versions: Array<{ build: string }> }).versions.map((v) => v.build)).toEqual(['b1']);
    const health = await t.server.inject({ method: 'GET', url: '/health' });
    expect(health.json()).toMatchObject({ status: 'ok', backends: { default: 'ok', s3: 'ok' } });
  });

  it('never writes the token, a backend password, cloud keys or the webhook secret into a log line, a failed reason or a response (RELIABILITY #24)', async () => {
    await t.server.inject({ method: 'GET', url: '/jobs/1', headers: { authorization: `Bearer ${TOKEN}` } });
    await t.server.inject({ method: 'GET', url: '/jobs/1', headers: { authorization: 'Bearer not-the-token-123456' } });
    const logs = t.logs();
    expect(logs).toContain('request'); // the server does log requests
    expect(logs).not.toContain(TOKEN);
    expect(logs).not.toContain('not-the-token-123456');
    expect(logs).not.toContain(S3RVER_CREDENTIALS.secretAccessKey);

    // A server of its own: a backend whose endpoint carries a password and answers nobody, and
    // webhooks to a receiver that keeps failing, with a token in its URL.
    const password = 'backend-pw-never-shown-42';
    const secret = `whsec_${randomBytes(32).toString('base64')}`;
    const hookToken = 'hook-query-token-never-shown';
    const rx = await startReceiver();
    rx.answer = () => ({ status: 503 });
    const hookUrl = new URL(rx.url);
    hookUrl.searchParams.set('token', hookToken);
    const u = await testServer(redis.url, {
      backends: `default=file:./objects,locked=s3://b/pre?endpoint=http://locked-user:${password}@127.0.0.1:${await freePort()}&forcePathStyle=true&maxAttempts=1`,
      env: { STEVEDORE_WEBHOOK_URL: hookUrl.toString(), STEVEDORE_WEBHOOK_SECRET: secret, STEVEDORE_WEBHOOK_SCHEDULE_MS: '0,50' },
    });
    try {
      const secrets = [password, secret, secret.slice('whsec_'.length), hookToken, TOKEN, S3RVER_CREDENTIALS.secretAccessKey];
      const clean = (text: string, what: string) => { for (const x of secrets) expect(text, what).not.toContain(x); };
      // A store to that backend fails (its connection refused); its reason names no secret.
      const batch = await u.server.inject({ method: 'POST', url: '/jobs', headers: u.auth, payload: { jobs: [{ type: 'store', data: { backend: 'locked', key: 'k', source: { base64: 'aGk=' } }, opts: { attempts: 1 } }] } });
      const [{ id }] = (batch.json() as { results: Array<{ id: string }> }).results as [{ id: string }];
      let job: { state: string; failedReason?: string } = { state: '' };
      await eventually(async () => (job = (await u.server.inject({ method: 'GET', url: `/jobs/${id}`, headers: u.auth })).json()).state === 'failed', 'the store job failed', 30_000);
      expect(job.failedReason).toMatch(/^Transient: /);
      clean(job.failedReason!, 'failed reason');
      // Its webhook fails twice and gives up: neither the POSTs nor the delivery's reason carry a secret.
      const posts = await rx.until((rs) => rs.length >= 2);
      for (const r of posts) clean(r.body + JSON.stringify(r.headers), 'webhook POST');
      expect(JSON.parse(posts[0]!.body)).toMatchObject({ type: 'job.failed', data: { jobId: id, failedReason: job.failedReason } });
      const deliveries = new Queue(webhookQueueName(u.app.config.queue), { connection: u.app.connect('producer'), prefix: u.app.config.prefix });
      let failed: Awaited<ReturnType<typeof deliveries.getFailed>> = [];
      await eventually(async () => (failed = await deliveries.getFailed()).length === 1, 'the delivery gave up');
      expect(failed[0]!.failedReason).toMatch(/^Transient: webhook endpoint .* answered 503/);
      clean(failed[0]!.failedReason, 'delivery failed reason');
      await deliveries.close();
      // HTTP error answers: that backend down, a read from it, a refused token.
      const answers = await Promise.all([
        u.server.inject({ method: 'GET', url: '/health' }),
        u.server.inject({ method: 'GET', url: '/sites/s/artifacts/b?backend=locked', headers: u.auth }),
        u.server.inject({ method: 'GET', url: '/sites/s/versions?backend=locked', headers: u.auth }),
        u.server.inject({ method: 'GET', url: '/jobs/1', headers: { authorization: `Bearer ${secret}` } }),
      ]);
      expect(answers.map((a) => a.statusCode)).toEqual([503, 503, 503, 401]);
      for (const a of answers) clean(a.body + JSON.stringify(a.headers), `answer ${a.statusCode}`);
      expect(u.logs()).toContain('webhook delivery gave up');
      clean(u.logs(), 'log lines');
    } finally {
      await u.close();
      await rx.close();
    }
  });
});
