import { join } from 'node:path';
import type { AddressInfo } from 'node:net';
import Fastify, { type FastifyInstance } from 'fastify';
import { Redis } from 'ioredis';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FsDriver } from '../../src/backends/fs.js';
import { compareStreamIds } from '../../src/events/job-events.js';
import { redisConnection } from '../../src/queue/connection.js';
import { eventsPlugin } from '../../src/server/events.js';
import { Bucket } from '../../src/storage/bucket.js';
import { tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { openSse, type SseEvent } from '../harness/sse.js';
import { inProcessWorker, type InProcessWorker } from '../harness/worker.js';

const silent = pino({ level: 'silent' });
const jobEvents = (es: SseEvent[]) => es.filter((e) => e.event === 'completed' || e.event === 'failed');
const ids = (es: SseEvent[]) => jobEvents(es).map((e) => (JSON.parse(e.data) as { jobId: string }).jobId);

describe('GET /events', () => {
  let redis: TestRedis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let w: InProcessWorker;
  let admin: Redis;
  const servers: FastifyInstance[] = [];

  async function server(): Promise<{ app: FastifyInstance; url: string }> {
    const app = Fastify({ logger: process.env.DEBUG_EVENTS ? { level: 'warn' } : false });
    await app.register(eventsPlugin, { queue: w.queue, keyPrefix: 'bull', connect: () => redisConnection(redis.url, 'worker'), log: silent, heartbeatMs: 300, blockMs: 1000, types: ['store', 'log', 'fetch-to-staging', 'repack-session'] });
    await app.listen({ port: 0, host: '127.0.0.1' });
    servers.push(app);
    return { app, url: `http://127.0.0.1:${(app.server.address() as AddressInfo).port}/events` };
  }
  const log = (build: string) => w.client.log({ site: 'web', build, action: 'deploy', status: 'ok' });

  beforeAll(async () => {
    redis = await startRedis();
    tmp = await tempDir();
    const buckets = new Map([['default', new Bucket(new FsDriver({ root: join(tmp.path, 'objects') }), { name: 'default' })]]);
    w = await inProcessWorker(redis.url, buckets, join(tmp.path, 'staging'));
    admin = new Redis(redis.url);
    admin.on('error', () => {});
  });
  afterAll(async () => {
    for (const s of servers) await s.close();
    admin?.disconnect();
    await w?.close();
    await redis?.stop();
    await tmp?.remove();
  });

  it('streams completions and failures with their type and result, and heartbeats', async () => {
    const { url } = await server();
    const c = await openSse(url);
    expect(c.status).toBe(200);
    expect(c.headers['content-type']).toMatch(/^text\/event-stream/);
    const ok = await log('b1');
    const bad = await w.client.add('store', { key: '../x', source: { base64: '' } } as never, { attempts: 1 });
    await c.until((es) => ids(es).includes(ok) && ids(es).includes(bad));
    const done = c.events.find((e) => e.event === 'completed')!;
    expect(JSON.parse(done.data)).toEqual({ jobId: ok, type: 'log', result: { key: expect.stringMatching(/^sites\/web\/logs\/.*-b1\.json$/), timestamp: expect.any(String) } });
    const failed = c.events.find((e) => e.event === 'failed')!;
    expect(JSON.parse(failed.data)).toMatchObject({ jobId: bad, type: 'store', failedReason: expect.stringMatching(/^InvalidInput: .*key/) });
    // Every event's id is its entry in BullMQ's stream.
    const [entry] = await admin.xrange(`bull:${w.queue}:events`, done.id!, done.id!);
    expect(entry![1]).toEqual(expect.arrayContaining(['event', 'completed', 'jobId', ok]));
    await c.until(() => c.comments.length > 0);
    c.close();
  });

  it('resumes with Last-Event-ID across a server restart without losing or repeating an event', async () => {
    const first = await server();
    const c1 = await openSse(first.url);
    const before = [await log('r1'), await log('r2'), await log('r3')];
    await c1.until((es) => before.every((id) => ids(es).includes(id)));
    const lastId = jobEvents(c1.events).at(-1)!.id!;
    await first.app.close();
    await c1.ended;
    // Finished while no server runs.
    const gap = [await log('r4'), await log('r5'), await log('r6')];
    await Promise.all(gap.map((id) => w.client.result(id)));
    const second = await server();
    const c2 = await openSse(second.url, { 'last-event-id': lastId });
    await c2.until((es) => gap.every((id) => ids(es).includes(id)));
    const after = [await log('r7'), await log('r8')];
    await c2.until((es) => after.every((id) => ids(es).includes(id)));
    const seen = [...ids(c1.events), ...ids(c2.events)];
    const mine = seen.filter((id) => [...before, ...gap, ...after].includes(id));
    // Each exactly once (jobs run concurrently, so completions need not follow enqueue order).
    expect(mine.length).toBe(8);
    expect(new Set(mine)).toEqual(new Set([...before, ...gap, ...after]));
    // Ids only grow: nothing replayed twice, nothing out of order.
    const streamIds = [...jobEvents(c1.events), ...jobEvents(c2.events)].map((e) => e.id!);
    expect([...streamIds].sort(compareStreamIds)).toEqual(streamIds);
    expect(new Set(streamIds).size).toBe(streamIds.length);
    c2.close();
  });

  it('sends a reset for an id the stream trimmed away, or one it never made, then goes live', async () => {
    const { url } = await server();
    const c0 = await openSse(url);
    const old = await log('t1');
    await c0.until((es) => ids(es).includes(old));
    const oldId = jobEvents(c0.events).at(-1)!.id!;
    c0.close();
    await log('t2').then((id) => w.client.result(id));
    await admin.xtrim(`bull:${w.queue}:events`, 'MAXLEN', 0);
    for (const lastId of [oldId, '99999999999999-0', 'not-an-id']) {
      const c = await openSse(url, { 'last-event-id': lastId });
      const [reset] = await c.until((es) => es.length > 0);
      expect(reset!.event).toBe('reset');
      expect(reset!.id).toMatch(/^\d+-\d+$/);
      expect(JSON.parse(reset!.data)).toMatchObject({ lastEventId: reset!.id, reason: expect.any(String) });
      const next = await log(`t3-${c.events.length}`);
      await c.until((es) => ids(es).includes(next));
      // Nothing from before the reset is replayed.
      expect(ids(c.events)).toEqual([next]);
      c.close();
    }
  });

  it('filters by ?type and refuses an unknown type', async () => {
    const { app, url } = await server();
    const c = await openSse(`${url}?type=store&type=fetch-to-staging`);
    const a = await log('f1');
    const s = await w.client.store({ key: 'f/one', source: { base64: Buffer.from('hello').toString('base64') } });
    await c.until((es) => ids(es).includes(s));
    await w.client.result(a);
    const b = await log('f2');
    const s2 = await w.client.store({ key: 'f/two', source: { base64: Buffer.from('again').toString('base64') } });
    await c.until((es) => ids(es).includes(s2));
    expect(ids(c.events)).toEqual([s, s2]);
    expect(ids(c.events)).not.toContain(b);
    for (const e of c.events.filter((x) => x.event === 'progress')) expect(JSON.parse(e.data)).toMatchObject({ type: 'store', progress: { bytes: expect.any(Number) } });
    c.close();
    const res = await app.inject({ url: '/events?type=nope', headers: { accept: 'text/event-stream' } });
    expect(res.statusCode).toBe(400);
    expect(res.json()).toMatchObject({ error: 'InvalidInput', message: expect.stringContaining('nope') });
  });

  it('keeps streaming across a Redis restart, and a client resuming after it misses nothing', async () => {
    const { url } = await server();
    const c = await openSse(url);
    const a = await log('before-restart');
    await c.until((es) => ids(es).includes(a));
    const lastId = jobEvents(c.events).at(-1)!.id!;
    await redis.restart();
    await w.client.ready(10_000);
    const b = await log('after-restart');
    await c.until((es) => ids(es).includes(b), 30_000);
    const resumed = await openSse(url, { 'last-event-id': lastId });
    await resumed.until((es) => ids(es).includes(b));
    expect(ids(resumed.events)).toEqual([b]);
    c.close();
    resumed.close();
  });

  it('serves every client from one stream reader', async () => {
    const { url } = await server();
    const before = Number(/connected_clients:(\d+)/.exec(await admin.info('clients'))![1]);
    const cs = await Promise.all(Array.from({ length: 20 }, () => openSse(url)));
    const id = await log('many');
    await Promise.all(cs.map((c) => c.until((es) => ids(es).includes(id))));
    const during = Number(/connected_clients:(\d+)/.exec(await admin.info('clients'))![1]);
    // The server's reader and command connections, however many clients.
    expect(during - before).toBeLessThanOrEqual(2);
    for (const c of cs) c.close();
  });
});
