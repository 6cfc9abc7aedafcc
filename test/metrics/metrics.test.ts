import { join } from 'node:path';
import type { AddressInfo } from 'node:net';
import Fastify, { type FastifyInstance } from 'fastify';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FsDriver } from '../../src/backends/fs.js';
import { MemoryDriver } from '../../src/backends/memory.js';
import { METRICS } from '../../src/metrics/catalog.js';
import { MetricsRecorder } from '../../src/metrics/recorder.js';
import { redisConnection } from '../../src/queue/connection.js';
import { metricsPlugin } from '../../src/server/metrics.js';
import { Bucket } from '../../src/storage/bucket.js';
import type { Driver } from '../../src/storage/driver.js';
import { hangingPuts } from '../fixtures/hanging-puts.js';
import { overrideDriver } from '../fixtures/override-driver.js';
import { tempDir } from '../harness/process.js';
import { parsePrometheus, valueOf } from '../harness/prometheus.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { inProcessWorker, type InProcessWorker } from '../harness/worker.js';
import { spawnWorker } from '../harness/worker-process.js';

function failingPuts(driver: Driver, n: number): Driver {
  let left = n;
  return overrideDriver(driver, { put: async () => { left--; throw Object.assign(new Error('no space left on device'), { code: 'ENOSPC' }); } }, () => left > 0);
}
const b64 = (s: string) => Buffer.from(s).toString('base64');

describe('GET /metrics', () => {
  let redis: TestRedis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let w: InProcessWorker;
  let recorder: MetricsRecorder;
  let app: FastifyInstance;
  let url: string;

  beforeAll(async () => {
    redis = await startRedis();
    tmp = await tempDir();
    const queue = `m-${Date.now()}`;
    const conn = redisConnection(redis.url, 'worker');
    conn.on('error', () => {}); // the Redis restart below
    recorder = new MetricsRecorder(conn, { prefix: 'bull', queue, flushMs: 50, log: pino({ level: 'silent' }) });
    const buckets = new Map([
      ['default', new Bucket(new FsDriver({ root: join(tmp.path, 'objects') }), { name: 'default' })],
      ['flaky', new Bucket(failingPuts(new FsDriver({ root: join(tmp.path, 'flaky') }), 1), { name: 'flaky' })],
    ]);
    w = await inProcessWorker(redis.url, buckets, join(tmp.path, 'staging'), { queue, hooks: [recorder], metricsDataPoints: 60 });
    app = Fastify();
    await app.register(metricsPlugin, { queue, keyPrefix: 'bull', connect: () => redisConnection(redis.url, 'producer') });
    await app.listen({ port: 0, host: '127.0.0.1' });
    url = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}/metrics`;
  });
  afterAll(async () => {
    await app?.close();
    await w?.close();
    await recorder?.close();
    await redis?.stop();
    await tmp?.remove();
  });

  const scrape = async () => {
    const res = await fetch(url);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('text/plain; version=0.0.4; charset=utf-8');
    return parsePrometheus(await res.text());
  };

  it('parses strictly before any job, every metric present with its HELP and TYPE', async () => {
    const res = await app.inject({ url: '/metrics' });
    expect(res.statusCode, res.body).toBe(200);
    const fams = parsePrometheus(res.body);
    for (const [name, def] of Object.entries(METRICS)) {
      expect(fams.get(name)?.type).toBe(def.kind);
      if (def.kind === 'counter') expect(name).toMatch(/_total$/);
      else expect(name).toMatch(/_seconds$/);
    }
    expect(valueOf(fams, 'stevedore_lock_losses_total')).toBe(0);
    expect(fams.get('bullmq_job_count')?.type).toBe('gauge');
    expect(valueOf(fams, 'bullmq_job_count', { queue: w.queue, state: 'waiting' })).toBe(0);
    expect(valueOf(fams, 'bullmq_job_count', { queue: `${w.queue}-webhooks`, state: 'waiting' })).toBe(0);
  });

  it('moves the counters with real jobs: outcomes, durations, bytes, mismatches, retries, queue depth', async () => {
    await w.client.run('store', { key: 'm/a', source: { base64: b64('hello') } });
    await w.client.run('store', { key: 'm/b', source: { base64: b64('seven!!') } });
    await w.client.run('store', { backend: 'flaky', key: 'm/c', source: { base64: b64('abc') } });
    await w.client.run('fetch-to-staging', { key: 'm/a', dest: 'out/a' });
    await w.client.run('store', { key: 'm/d', source: { base64: b64('x') }, sha256: 'a'.repeat(64) }).catch(() => {});
    await w.client.run('log', { site: 's', build: '../b', action: 'a', status: 'ok' }).catch(() => {});
    // A name no job has: counted under `other`, so producers' typos add no series.
    await w.client.add('no-such-type-1' as never, {} as never, { attempts: 1 });
    await w.client.add('no-such-type-2' as never, {} as never, { attempts: 1 });
    // The last job's hook runs after its completion reaches the client: flush once it has.
    await expect.poll(async () => { await recorder.flush(); return valueOf(await scrape(), 'stevedore_jobs_total', { type: 'log', outcome: 'failed' }); }).toBe(1);
    await expect.poll(async () => { await recorder.flush(); return valueOf(await scrape(), 'stevedore_jobs_total', { type: 'other', outcome: 'failed' }); }).toBe(2);
    const fams = await scrape();
    expect(valueOf(fams, 'stevedore_jobs_total', { type: 'store', outcome: 'completed' })).toBe(3);
    expect(valueOf(fams, 'stevedore_jobs_total', { type: 'store', outcome: 'failed' })).toBe(1);
    expect(valueOf(fams, 'stevedore_jobs_total', { type: 'fetch-to-staging', outcome: 'completed' })).toBe(1);
    expect(valueOf(fams, 'stevedore_job_duration_seconds_count', { type: 'store', outcome: 'completed' })).toBe(3);
    expect(valueOf(fams, 'stevedore_job_duration_seconds_bucket', { type: 'store', outcome: 'completed', le: '3600' })).toBe(3);
    expect(valueOf(fams, 'stevedore_job_duration_seconds_sum', { type: 'store', outcome: 'completed' })).toBeGreaterThanOrEqual(0);
    expect(valueOf(fams, 'stevedore_bytes_total', { backend: 'default', direction: 'write' })).toBe(12);
    expect(valueOf(fams, 'stevedore_bytes_total', { backend: 'flaky', direction: 'write' })).toBe(3);
    expect(valueOf(fams, 'stevedore_bytes_total', { backend: 'default', direction: 'read' })).toBe(5);
    expect(valueOf(fams, 'stevedore_checksum_mismatches_total', { type: 'store' })).toBe(1);
    expect(valueOf(fams, 'stevedore_job_retries_total', { type: 'store' })).toBe(1);
    expect(valueOf(fams, 'bullmq_job_count', { queue: w.queue, state: 'completed' })).toBe(4);
    expect(valueOf(fams, 'bullmq_job_count', { queue: w.queue, state: 'failed' })).toBe(4);
    // BullMQ's own counters need the worker's `metrics` option, which the worker sets.
    expect(valueOf(fams, 'bullmq_job_completed_total', { queue: w.queue })).toBe(4);
    expect(valueOf(fams, 'bullmq_job_failed_total', { queue: w.queue })).toBe(4);
  });

  it('reaches /metrics from a worker process through Redis', async () => {
    const queue = `mp-${Date.now()}`;
    const proc = await spawnWorker({ REDIS_URL: redis.url, STEVEDORE_QUEUE: queue, STEVEDORE_BACKENDS: `default=file://${join(tmp.path, 'objects3')}`, STEVEDORE_STAGING_DIR: join(tmp.path, 'st3'), STEVEDORE_METRICS_FLUSH_MS: '100' });
    const other = Fastify();
    try {
      await other.register(metricsPlugin, { queue, keyPrefix: 'bull', connect: () => redisConnection(redis.url, 'producer') });
      const { StevedoreClient } = await import('../../src/queue/client.js');
      const client = new StevedoreClient({ redisUrl: redis.url, queue });
      await client.run('log', { site: 's', build: 'b1', action: 'a', status: 'ok' });
      await client.run('log', { site: 's', build: 'b2', action: 'a', status: 'ok' });
      await client.close();
      await expect.poll(async () => valueOf(parsePrometheus((await other.inject({ url: '/metrics' })).body), 'stevedore_jobs_total', { type: 'log', outcome: 'completed' }), { timeout: 10_000 }).toBe(2);
      expect(valueOf(parsePrometheus((await other.inject({ url: '/metrics' })).body), 'bullmq_job_completed_total', { queue })).toBe(2);
    } finally {
      await other.close();
      await proc.stop();
    }
  });

  it('counts a lost lock', async () => {
    const hanging = hangingPuts(new MemoryDriver());
    const queue = `ml-${Date.now()}`;
    const rec = new MetricsRecorder(redisConnection(redis.url, 'worker'), { prefix: 'bull', queue, flushMs: 50, log: pino({ level: 'silent' }) });
    const lw = await inProcessWorker(redis.url, new Map([['default', new Bucket(hanging.proxy)]]), tmp.path, { queue, lockDurationMs: 2_000, hooks: [rec] });
    const other = Fastify();
    try {
      await other.register(metricsPlugin, { queue, keyPrefix: 'bull', connect: () => redisConnection(redis.url, 'producer') });
      const id = await lw.client.store({ key: 'k', source: { base64: 'eHl6' } });
      await hanging.putStarted;
      // What another worker's stalled check, or an expired key, does to the lock.
      const raw = redisConnection(redis.url, 'worker');
      expect(await raw.del(`bull:${queue}:${id}:lock`)).toBe(1);
      await raw.quit();
      await hanging.putAborted;
      await expect.poll(async () => { await rec.flush(); return valueOf(parsePrometheus((await other.inject({ url: '/metrics' })).body), 'stevedore_lock_losses_total'); }).toBe(1);
    } finally {
      lw.worker.cancelAllJobs('test over');
      await lw.close();
      await rec.close();
      await other.close();
    }
  });

  it('loses no count when a flush meets a Redis restart', async () => {
    const before = valueOf(await scrape(), 'stevedore_lock_losses_total')!;
    recorder.lockLost();
    await redis.kill();
    const flushed = recorder.flush();
    await redis.start();
    await flushed;
    await expect.poll(async () => { await recorder.flush(); return valueOf(await scrape(), 'stevedore_lock_losses_total'); }, { timeout: 15_000 }).toBe(before + 1);
  });
});
