import { createHmac, randomBytes, randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { Queue, type Worker } from 'bullmq';
import { Redis } from 'ioredis';
import { pino } from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { FsDriver } from '../../src/backends/fs.js';
import { loadConfig } from '../../src/config.js';
import { redisConnection } from '../../src/queue/connection.js';
import { StevedoreClient } from '../../src/queue/client.js';
import { Bucket } from '../../src/storage/bucket.js';
import { disabledKey, endpointHash, startWebhookWorker } from '../../src/webhooks/delivery.js';
import { WebhookPublisher, webhookQueueName, type WebhookMessage } from '../../src/webhooks/publisher.js';
import { sign, secretKey } from '../../src/webhooks/signature.js';
import { freePort, tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { startReceiver, type Received, type Receiver } from '../harness/webhook-receiver.js';
import { inProcessWorker, type InProcessWorker } from '../harness/worker.js';
import { spawnWorker, stopAllWorkers } from '../harness/worker-process.js';

const SECRET = `whsec_${randomBytes(32).toString('base64')}`;
const SCHEDULE = [0, 100, 100, 100, 100];

/** Standard Webhooks verification, written from the spec, independent of src/webhooks. */
function verify(r: Received, secret: string): boolean {
  const key = Buffer.from(secret.slice('whsec_'.length), 'base64');
  const expected = createHmac('sha256', key).update(`${String(r.headers['webhook-id'])}.${String(r.headers['webhook-timestamp'])}.${r.body}`).digest('base64');
  return String(r.headers['webhook-signature']).split(' ').some((s) => s === `v1,${expected}`);
}
const msg = (r: Received) => JSON.parse(r.body) as WebhookMessage;
const forJob = (id: string) => (r: Received) => msg(r).data.jobId === id;

describe('Standard Webhooks signature', () => {
  it('matches the spec\'s test vector', () => {
    const key = secretKey('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
    expect(sign(key, 'msg_p5jXN8AQM9LWM0D4loKWxJek', 1614265330, '{"test": 2432232314}')).toBe('v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=');
  });

  it('config refuses a URL without a secret, a malformed secret, and a bad schedule, without echoing the secret', () => {
    expect(() => loadConfig({ STEVEDORE_WEBHOOK_URL: 'https://h/x' })).toThrow(/STEVEDORE_WEBHOOK_SECRET: is required/);
    expect(() => loadConfig({ STEVEDORE_WEBHOOK_URL: 'https://h/x', STEVEDORE_WEBHOOK_SECRET: 'sekrit-value' })).toThrow(/STEVEDORE_WEBHOOK_SECRET: must be "whsec_"/);
    expect(() => loadConfig({ STEVEDORE_WEBHOOK_URL: 'https://h/x', STEVEDORE_WEBHOOK_SECRET: 'sekrit-value' })).not.toThrow(/sekrit/);
    expect(() => loadConfig({ STEVEDORE_WEBHOOK_URL: 'ftp://h', STEVEDORE_WEBHOOK_SECRET: SECRET })).toThrow(/STEVEDORE_WEBHOOK_URL: must be an http/);
    expect(() => loadConfig({ STEVEDORE_WEBHOOK_SCHEDULE_MS: '0,x' })).toThrow(/STEVEDORE_WEBHOOK_SCHEDULE_MS/);
    const c = loadConfig({ STEVEDORE_WEBHOOK_URL: 'https://h/x', STEVEDORE_WEBHOOK_SECRET: SECRET, STEVEDORE_WEBHOOK_SCHEDULE_MS: '0, 50,50' });
    expect(c).toMatchObject({ webhookUrl: 'https://h/x', webhookSecret: SECRET, webhookScheduleMs: [0, 50, 50] });
    expect(loadConfig({}).webhookScheduleMs).toEqual([0, 5_000, 300_000, 1_800_000, 7_200_000, 18_000_000, 36_000_000, 36_000_000]);
  });
});

describe('webhooks', () => {
  let redis: TestRedis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let rx: Receiver;
  let w: InProcessWorker;
  let publisher: WebhookPublisher;
  let delivery: Worker;
  let admin: Redis;
  const queue = `wh-${randomUUID().slice(0, 8)}`;
  const deliveries = () => new Queue(webhookQueueName(queue), { connection: admin });

  beforeAll(async () => {
    redis = await startRedis();
    tmp = await tempDir();
    rx = await startReceiver();
    admin = new Redis(redis.url, { maxRetriesPerRequest: null });
    const retention = { keepCompleted: 100, keepFailed: 100 };
    publisher = new WebhookPublisher(redisConnection(redis.url, 'worker'), { queue, prefix: 'bull', retention, attempts: SCHEDULE.length });
    const buckets = new Map([['default', new Bucket(new FsDriver({ root: join(tmp.path, 'objects') }), { name: 'default' })]]);
    w = await inProcessWorker(redis.url, buckets, join(tmp.path, 'staging'), { queue, hooks: [publisher] });
    delivery = startWebhookWorker(redisConnection(redis.url, 'worker'), { queue, prefix: 'bull', url: rx.url, secret: SECRET, scheduleMs: SCHEDULE, retention, log: pino({ level: 'silent' }), timeoutMs: 2_000 });
  });
  afterEach(() => { rx.answer = () => ({ status: 204 }); });
  afterAll(async () => {
    await stopAllWorkers();
    await delivery?.close();
    await w?.close();
    await publisher?.close();
    await rx?.close();
    admin?.disconnect();
    await redis?.stop();
    await tmp?.remove();
  });

  const log = (build: string) => w.client.log({ site: 'web', build, action: 'deploy', status: 'ok' });

  it('posts a completion and a failure, signed as Standard Webhooks says', async () => {
    const ok = await log('w1');
    const result = await w.client.result<'log'>(ok);
    const bad = await w.client.add('store', { key: '/abs', source: { base64: '' } } as never, { attempts: 1 });
    await rx.until((rs) => rs.some(forJob(ok)) && rs.some(forJob(bad)));
    const done = rx.received.find(forJob(ok))!;
    const failed = rx.received.find(forJob(bad))!;
    for (const r of [done, failed]) {
      expect(r.headers['content-type']).toBe('application/json');
      expect(r.headers['webhook-id']).toMatch(/^msg_[A-Za-z0-9_-]{32}$/);
      expect(Math.abs(Number(r.headers['webhook-timestamp']) - Date.now() / 1000)).toBeLessThan(300);
      expect(verify(r, SECRET)).toBe(true);
      expect(verify(r, `whsec_${randomBytes(32).toString('base64')}`)).toBe(false);
    }
    expect(msg(done)).toEqual({ type: 'job.completed', timestamp: expect.any(String), data: { queue, jobId: ok, type: 'log', attemptsMade: 1, result } });
    expect(msg(failed)).toMatchObject({ type: 'job.failed', data: { queue, jobId: bad, type: 'store', failedReason: expect.stringMatching(/^InvalidInput: /) } });
    // Neither the secret nor its key sits in Redis with the delivery.
    const job = await deliveries().getJob(String(done.headers['webhook-id']));
    expect(JSON.stringify(job!.data)).not.toContain(SECRET.slice(6, 20));
  });

  it('retries a failed delivery with the same webhook-id, a fresh signature each time, never delaying the job', async () => {
    let failures = 0;
    rx.answer = (r) => (msg(r).data.jobId === target && failures++ < 3 ? { status: 500 } : { status: 200 });
    let target = '';
    target = await log('w2');
    await w.client.result(target);
    // The job is done while its webhook still fails.
    expect(await (await w.client.getJob(target))!.getState()).toBe('completed');
    const rs = (await rx.until((all) => all.filter(forJob(target)).length === 4)).filter(forJob(target));
    expect(new Set(rs.map((r) => r.headers['webhook-id'])).size).toBe(1);
    for (const r of rs) expect(verify(r, SECRET)).toBe(true);
    const dj = await deliveries().getJob(String(rs[0]!.headers['webhook-id']));
    await expect.poll(async () => (await dj!.getState())).toBe('completed');
    expect((await deliveries().getJob(dj!.id!))!.attemptsMade).toBe(4);
  });

  it('a receiver that hangs delays neither the job nor the next one', async () => {
    let hung = '';
    // Every delivery for this job is answered only after 8 s (past the POST's 2 s limit: each
    // attempt hangs, then is retried), so it never succeeds while the jobs below run.
    rx.answer = (r) => (msg(r).data.jobId === hung ? { status: 200, delayMs: 8_000 } : { status: 200 });
    hung = await log('w-hang');
    await w.client.result(hung, { timeoutMs: 10_000 });
    // Its delivery has been sent and is still waiting for the receiver's answer.
    await rx.until((all) => all.some(forJob(hung)), 5_000);
    const dj = await deliveries().getJob(String(rx.received.find(forJob(hung))!.headers['webhook-id']));
    const pending = ['active', 'delayed', 'waiting'];
    expect(pending).toContain(await dj!.getState());
    // Another job completes meanwhile: the worker that runs jobs never waits on a delivery.
    const next = await log('w-after');
    await expect(w.client.result(next, { timeoutMs: 5_000 })).resolves.toMatchObject({ key: expect.stringContaining('w-after') });
    expect(pending).toContain(await dj!.getState());
  });

  it('waits as long as a retry-after asks before the next attempt', async () => {
    let target = '';
    let n = 0;
    rx.answer = (r) => (msg(r).data.jobId === target && n++ === 0 ? { status: 503, headers: { 'retry-after': '2' } } : { status: 204 });
    target = await log('w3');
    const rs = (await rx.until((all) => all.filter(forJob(target)).length === 2)).filter(forJob(target));
    expect(rs[1]!.at - rs[0]!.at).toBeGreaterThanOrEqual(1_900);
  });

  it('retries a delivery whose receiver is too slow (past the timeout) or down, with the same webhook-id', async () => {
    let target = '';
    let n = 0;
    rx.answer = (r) => (msg(r).data.jobId === target && n++ === 0 ? { status: 200, delayMs: 3_000 } : { status: 204 });
    target = await log('slow');
    const rs = (await rx.until((all) => all.filter(forJob(target)).length === 2)).filter(forJob(target));
    expect(rs[0]!.headers['webhook-id']).toBe(rs[1]!.headers['webhook-id']);
    const job = await deliveries().getJob(String(rs[0]!.headers['webhook-id']));
    await expect.poll(async () => (await deliveries().getJob(job!.id!))?.returnvalue).toEqual({ status: 204 });
    expect((await deliveries().getJob(job!.id!))!.attemptsMade).toBe(2);
    // Down: nothing listens at the URL. The attempts fail and are retried; the job it reports is done.
    const q3 = `wh3-${randomUUID().slice(0, 8)}`;
    const dead = startWebhookWorker(redisConnection(redis.url, 'worker'), { queue: q3, prefix: 'bull', url: `http://127.0.0.1:${await freePort()}/hooks`, secret: SECRET, scheduleMs: [0, 50, 50], retention: { keepCompleted: 10, keepFailed: 10 }, log: pino({ level: 'silent' }) });
    const pub = new WebhookPublisher(redisConnection(redis.url, 'worker'), { queue: q3, prefix: 'bull', retention: { keepCompleted: 10, keepFailed: 10 }, attempts: 3 });
    try {
      await pub.completed({ id: 'down-1', name: 'log', timestamp: 1, finishedOn: 2, attemptsMade: 1 } as never, { ok: true });
      const dq = new Queue(webhookQueueName(q3), { connection: admin });
      await expect.poll(async () => (await dq.getJobs(['failed']))[0]?.failedReason, { timeout: 10_000 }).toMatch(/^Transient: webhook POST to http:\/\/127\.0\.0\.1:\d+\/hooks failed: ECONNREFUSED$/);
      expect((await dq.getJobs(['failed']))[0]!.attemptsMade).toBe(3);
    } finally {
      await dead.close();
      await pub.close();
    }
  });

  it('keeps only the retention counts of finished deliveries', async () => {
    const q4 = `wh4-${randomUUID().slice(0, 8)}`;
    const retention = { keepCompleted: 2, keepFailed: 2 };
    const worker = startWebhookWorker(redisConnection(redis.url, 'worker'), { queue: q4, prefix: 'bull', url: rx.url, secret: SECRET, scheduleMs: [0], retention, log: pino({ level: 'silent' }) });
    const pub = new WebhookPublisher(redisConnection(redis.url, 'worker'), { queue: q4, prefix: 'bull', retention, attempts: 1 });
    try {
      for (let i = 1; i <= 6; i++) await pub.completed({ id: `kept-${i}`, name: 'log', timestamp: 1, finishedOn: 2, attemptsMade: 1 } as never, {});
      await rx.until((all) => all.filter((r) => msg(r).data.queue === q4).length === 6);
      const dq = new Queue(webhookQueueName(q4), { connection: admin });
      await expect.poll(async () => (await dq.getJobCounts('completed')).completed).toBe(2);
    } finally {
      await worker.close();
      await pub.close();
    }
  });

  it('disables the endpoint on 410: that delivery ends and later ones are skipped', async () => {
    let target = '';
    rx.answer = (r) => (msg(r).data.jobId === target ? { status: 410 } : { status: 204 });
    target = await log('w4');
    const [gone] = (await rx.until((all) => all.some(forJob(target)))).filter(forJob(target));
    const dq = deliveries();
    await expect.poll(async () => (await dq.getJob(String(gone!.headers['webhook-id'])))?.returnvalue).toEqual({ status: 410, disabled: true });
    expect(await admin.hexists(disabledKey('bull', queue), endpointHash(rx.url))).toBe(1);
    const before = rx.received.length;
    const later = await log('w5');
    await w.client.result(later);
    const skipped = async () => (await dq.getJobs(['completed'])).find((j) => JSON.parse(j.data.body as string).data.jobId === later);
    await expect.poll(async () => (await skipped())?.returnvalue).toEqual({ skipped: 'endpoint disabled' });
    expect(rx.received.length).toBe(before);
    await admin.del(disabledKey('bull', queue));
  });

  it('delivers each event once with two worker processes (RELIABILITY #30)', async () => {
    const q2 = `wh2-${randomUUID().slice(0, 8)}`;
    const rx2 = await startReceiver();
    const env = {
      REDIS_URL: redis.url, STEVEDORE_QUEUE: q2, STEVEDORE_BACKENDS: `default=file://${join(tmp.path, 'objects2')}`, STEVEDORE_STAGING_DIR: join(tmp.path, 'staging2'),
      STEVEDORE_WEBHOOK_URL: rx2.url, STEVEDORE_WEBHOOK_SECRET: SECRET, STEVEDORE_WEBHOOK_SCHEDULE_MS: '0,100,100',
    };
    const procs = await Promise.all([spawnWorker(env), spawnWorker(env)]);
    const client = new StevedoreClient({ redisUrl: redis.url, queue: q2 });
    try {
      // A failure first for every fourth delivery: it is retried, and still arrives once as a 2xx.
      // (Decided per webhook-id, not per request: with two processes racing, a per-request pattern
      // could fail one delivery on every attempt of its schedule.)
      const seen = new Set<string>();
      rx2.answer = (r) => {
        const id = String(r.headers['webhook-id']);
        const first = !seen.has(id);
        seen.add(id);
        return first && seen.size % 4 === 1 ? { status: 502 } : { status: 204 };
      };
      const ids = await Promise.all(Array.from({ length: 30 }, (_, i) => client.log({ site: 's', build: `b${i}`, action: 'a', status: 'ok' })));
      await rx2.until((rs) => ids.every((id) => rs.some((r) => forJob(id)(r))), 60_000);
      const dq = new Queue(webhookQueueName(q2), { connection: admin });
      await expect.poll(async () => Object.values(await dq.getJobCounts('waiting', 'active', 'delayed')).reduce((a, b) => a + b, 0), { timeout: 30_000 }).toBe(0);
      const ok = rx2.received.filter((r) => verify(r, SECRET));
      expect(ok.length).toBe(rx2.received.length);
      const idsPerJob = new Map<string, Set<string>>();
      for (const r of ok) {
        const set = idsPerJob.get(msg(r).data.jobId) ?? new Set();
        set.add(String(r.headers['webhook-id']));
        idsPerJob.set(msg(r).data.jobId, set);
      }
      expect(idsPerJob.size).toBe(30);
      for (const s of idsPerJob.values()) expect(s.size).toBe(1);
      // One 2xx per webhook-id: none delivered twice.
      const accepted = rx2.received.filter((r) => r.status === 204).map((r) => String(r.headers['webhook-id']));
      expect(accepted.length).toBe(30);
      expect(new Set(accepted).size).toBe(30);
      expect(rx2.received.some((r) => r.status === 502)).toBe(true);
      // Both processes did work, so the once-only is not one worker's luck.
      const served = new Set((await Promise.all(ids.map((id) => client.getJob(id)))).map((j) => j!.processedBy));
      expect(served.size).toBe(2);
      // SIGTERM: the worker, its delivery worker, publisher and counters stop, and the process exits 0.
      procs[0]!.kill('SIGTERM');
      expect(await procs[0]!.exited).toEqual({ code: 0, signal: null });
      expect(procs[0]!.logs().some((l) => l.msg === 'stopped')).toBe(true);
    } finally {
      await client.close();
      await Promise.all(procs.map((p) => p.stop()));
      await rx2.close();
    }
  });

  it('a job whose worker died before queuing its webhook is delivered by the sweep, once; jobs whose worker queued theirs are not delivered again', async () => {
    const q3 = `wh3-${randomUUID().slice(0, 8)}`;
    const rx3 = await startReceiver();
    const env = {
      REDIS_URL: redis.url, STEVEDORE_QUEUE: q3, STEVEDORE_BACKENDS: `default=file://${join(tmp.path, 'objects3')}`, STEVEDORE_STAGING_DIR: join(tmp.path, 'staging3'),
      STEVEDORE_WEBHOOK_URL: rx3.url, STEVEDORE_WEBHOOK_SECRET: SECRET, STEVEDORE_WEBHOOK_SCHEDULE_MS: '0,100,100', STEVEDORE_WEBHOOK_SWEEP_MS: '200',
    };
    const cursor = `bull:${webhookQueueName(q3)}:swept`;
    // A deployment whose sweep has been running: its cursor stands before the jobs below.
    const first = await spawnWorker(env);
    await expect.poll(() => admin.exists(cursor), { timeout: 10_000 }).toBe(1);
    await first.stop();
    // Jobs finished by a worker whose hook never ran (as one killed between BullMQ recording the outcome and the hook).
    const buckets = new Map([['default', new Bucket(new FsDriver({ root: join(tmp.path, 'objects3') }), { name: 'default' })]]);
    const silent = await inProcessWorker(redis.url, buckets, join(tmp.path, 'staging3'), { queue: q3 });
    const lost = await Promise.all(Array.from({ length: 3 }, (_, i) => silent.client.log({ site: 's', build: `lost${i}`, action: 'a', status: 'ok' })));
    const lostFail = await silent.client.add('store', { key: '/abs', source: { base64: '' } } as never, { attempts: 1 });
    await Promise.all(lost.map((id) => silent.client.result(id)));
    await expect.poll(async () => (await silent.client.getJob(lostFail))?.getState(), { timeout: 10_000 }).toBe('failed');
    await silent.close();
    expect(await new Queue(webhookQueueName(q3), { connection: admin }).getJobCountByTypes('waiting', 'active', 'delayed', 'completed', 'failed')).toBe(0);
    const proc = await spawnWorker(env);
    const client = new StevedoreClient({ redisUrl: redis.url, queue: q3 });
    try {
      // And jobs the new process finishes itself: its hook queues them, the sweep meets them queued.
      const own = await Promise.all(Array.from({ length: 5 }, (_, i) => client.log({ site: 's', build: `own${i}`, action: 'a', status: 'ok' })));
      const all = [...lost, lostFail, ...own];
      await rx3.until((rs) => all.every((id) => rs.some(forJob(id))), 30_000);
      // Past several more sweeps: nothing arrives twice.
      const swept = Number(await admin.hget(cursor, 'completed'));
      await expect.poll(async () => Number(await admin.hget(cursor, 'completed')), { timeout: 10_000 }).toBeGreaterThan(swept + 600);
      expect(rx3.received.every((r) => verify(r, SECRET))).toBe(true);
      const perJob = all.map((id) => rx3.received.filter(forJob(id)).length);
      expect(perJob).toEqual(all.map(() => 1));
      expect(msg(rx3.received.find(forJob(lostFail))!)).toMatchObject({ type: 'job.failed', data: { queue: q3, jobId: lostFail, failedReason: expect.stringMatching(/^InvalidInput: /) } });
      expect(msg(rx3.received.find(forJob(lost[0]!))!)).toMatchObject({ type: 'job.completed', data: { queue: q3, jobId: lost[0], type: 'log', attemptsMade: 1 } });
      const bySweep = proc.logs().filter((l) => l.msg === 'webhook queued by the sweep: the job\'s own worker did not').map((l) => String((l as { jobId?: string }).jobId));
      expect(bySweep.sort()).toEqual([...lost, lostFail].sort());
    } finally {
      await client.close();
      await proc.stop();
      await rx3.close();
    }
  });
});
