import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { log, normalizeTimestamp } from '../../jobs/log.js';
import { FsDriver } from '../../src/backends/fs.js';
import { MemoryDriver } from '../../src/backends/memory.js';
import type { JobDeps } from '../../src/payload.js';
import { Staging } from '../../src/staging.js';
import { Bucket } from '../../src/storage/bucket.js';
import { logKey, parseLogKey, versions } from '../../src/versions.js';
import { readAll } from '../conformance/suite.js';
import { tempDir } from '../harness/process.js';
import { s3ConformanceTarget } from '../harness/s3.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { inProcessWorker, type InProcessWorker } from '../harness/worker.js';

const byteOrder = (a: string, b: string) => Buffer.compare(Buffer.from(a), Buffer.from(b));

async function keysUnder(bucket: Bucket, prefix: string): Promise<string[]> {
  const out: string[] = [];
  for await (const o of bucket.list(prefix)) out.push(o.key);
  return out;
}

async function entry(bucket: Bucket, key: string): Promise<Record<string, unknown>> {
  return JSON.parse((await readAll((await bucket.get(key)).stream)).toString()) as Record<string, unknown>;
}

describe('log entries through Redis', () => {
  let redis: TestRedis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let serial: InProcessWorker;
  let parallel: InProcessWorker;
  const buckets = new Map<string, Bucket>();
  const s3 = s3ConformanceTarget();

  beforeAll(async () => {
    redis = await startRedis();
    tmp = await tempDir();
    buckets.set('fs', new Bucket(new FsDriver({ root: join(tmp.path, 'objects') }), { name: 'fs' }));
    buckets.set('memory', new Bucket(new MemoryDriver(), { name: 'memory' }));
    // s3rver ignores If-None-Match: ifAbsent is a stat first there, which two racing writers both pass.
    buckets.set('s3', new Bucket(await s3.newDriver({ conditionalWrites: false }), { name: 's3' }));
    // One job at a time takes keys in the queue's order; eight at a time race for them.
    serial = await inProcessWorker(redis.url, buckets, join(tmp.path, 'staging'), { concurrency: 1 });
    parallel = await inProcessWorker(redis.url, buckets, join(tmp.path, 'staging'), { concurrency: 8 });
  });
  afterAll(async () => {
    await serial?.close();
    await parallel?.close();
    await s3.teardown();
    await redis?.stop();
    await tmp?.remove();
  });

  describe.each(['fs', 'memory'])('on the %s backend', (backend) => {
    it('gives every entry of one site, build and millisecond its own key, sorting in job order', async () => {
      // 12 entries: the 11th and 12th take `~~10` and `~~11`, which must sort after `~9`.
      const n = 12;
      const jobs = await serial.client.queue.addBulk(Array.from({ length: n }, (_, i) => ({
        name: 'log',
        // Second-precision timestamps from a producer: one millisecond for all, in three spellings.
        data: { backend, site: 'bulk', build: 'b-1.0', action: 'step', status: String(i), timestamp: ['2026-12-02T07:00:00Z', '2026-12-02T08:00:00+01:00', 1796194800000][i % 3] },
      })));
      const results = [];
      for (const j of jobs) results.push(await serial.client.result<'log'>(j.id!, { timeoutMs: 20_000 }));
      const keys = results.map((r) => r.key);
      expect(new Set(keys).size).toBe(n);
      expect(keys[0]).toBe('sites/bulk/logs/2026-12-02T07:00:00.000Z-b-1.0.json');
      expect(keys[10]).toBe('sites/bulk/logs/2026-12-02T07:00:00.000Z-b-1.0~~10.json');
      // Job order is key order, in UTF-8 byte order (every backend's listing order) and in the listing itself.
      expect([...keys].sort(byteOrder)).toEqual(keys);
      const bucket = buckets.get(backend)!;
      expect(await keysUnder(bucket, 'sites/bulk/logs/')).toEqual(keys);
      for (const [i, key] of keys.entries()) {
        expect(await entry(bucket, key)).toEqual({ timestamp: '2026-12-02T07:00:00.000Z', build_id: 'b-1.0', site_id: 'bulk', action: 'step', status: String(i), metadata: {} });
      }
      // The read side sees one build with all its entries, and does not take `~10` for part of the build id.
      const list = await versions(bucket, 'bulk');
      expect(list.map((v) => v.build)).toEqual(['b-1.0']);
      expect(list[0]!.logs).toEqual(keys);
      expect(list[0]!.first).toBe('2026-12-02T07:00:00.000Z');
    });

    it('takes an entry written before job ids were recorded, with the same bytes, for this job\'s own first run', async () => {
      const bucket = buckets.get(backend)!;
      const data = { backend, site: 'legacy', build: 'b', action: 'a', status: 's', timestamp: '2026-12-02T07:00:00Z' };
      const bytes = Buffer.from(`${JSON.stringify({ timestamp: '2026-12-02T07:00:00.000Z', build_id: 'b', site_id: 'legacy', action: 'a', status: 's', metadata: {} })}\n`);
      await bucket.put('sites/legacy/logs/2026-12-02T07:00:00.000Z-b.json', bytes, { contentType: 'application/json' });
      expect(await serial.client.run('log', data)).toMatchObject({ key: 'sites/legacy/logs/2026-12-02T07:00:00.000Z-b.json' });
      // Other bytes at that key are another entry.
      expect(await serial.client.run('log', { ...data, status: 'other' })).toMatchObject({ key: 'sites/legacy/logs/2026-12-02T07:00:00.000Z-b~1.json' });
      expect((await keysUnder(bucket, 'sites/legacy/logs/')).length).toBe(2);
    });

    it('writes one entry for a job id enqueued again after the first run completed', async () => {
      const data = { backend, site: 'idem', build: 'b', action: 'a', status: 's', timestamp: '2026-12-02T07:00:00Z' };
      const a = await serial.client.run('log', data, { jobId: `idem-${backend}` });
      await (await serial.client.getJob(`idem-${backend}`))!.remove();
      const b = await serial.client.run('log', data, { jobId: `idem-${backend}` });
      expect(b).toEqual(a);
      expect(await keysUnder(buckets.get(backend)!, 'sites/idem/logs/')).toEqual([a.key]);
    });
  });

  /** JobDeps for a direct call of the log job, as the runner builds them. */
  const ENQUEUED = Date.parse('2026-12-02T09:00:00.000Z');
  const deps = (bucket: Bucket, jobId: string, enqueuedAt = ENQUEUED): JobDeps => ({
    bucket: () => bucket, staging: new Staging(join(tmp.path, 'staging')), log: pino({ level: 'silent' }), signal: new AbortController().signal,
    progress: () => {}, enqueuedAt, jobId, limits: { maxInlineBytes: 1024 },
  });

  describe.each(['fs', 'memory', 's3'])('on the %s backend, atomic ifAbsent or not', (backend) => {
    it('loses no entry when many jobs race for one key', async () => {
      const n = 24;
      const jobs = await parallel.client.queue.addBulk(Array.from({ length: n }, (_, i) => ({
        name: 'log', data: { backend, site: 'race', build: 'b', action: 'a', status: String(i), timestamp: '2026-12-02T07:00:00.123Z' },
      })));
      const results = [];
      for (const j of jobs) results.push(await parallel.client.result<'log'>(j.id!, { timeoutMs: 20_000 }));
      expect(new Set(results.map((r) => r.key)).size).toBe(n);
      const bucket = buckets.get(backend)!;
      const keys = await keysUnder(bucket, 'sites/race/logs/');
      expect(keys.length).toBe(n);
      // Every key is this site, build and millisecond's, sorting from the plain key on.
      const plain = logKey('race', '2026-12-02T07:00:00.123Z', 'b');
      for (const k of keys) expect(parseLogKey(k)).toMatchObject({ site: 'race', timestamp: '2026-12-02T07:00:00.123Z', build: 'b' });
      for (const k of keys) expect(byteOrder(k, plain)).toBeGreaterThanOrEqual(0);
      expect((await versions(bucket, 'race'))[0]!.logs).toEqual(keys);
      const statuses = await Promise.all(keys.map(async (k) => (await entry(bucket, k)).status as string));
      expect(statuses.map(Number).sort((a, b) => a - b)).toEqual(Array.from({ length: n }, (_, i) => i));
    });

    it('writes one entry when one job runs twice, in turn or at once', async () => {
      const bucket = buckets.get(backend)!;
      const payload = { backend, site: 'again', build: 'b', action: 'deploy', status: 'ok' };
      // Another job's entry is already there: the redelivered job must find its own, not take that one.
      const other = await log(payload, deps(bucket, 'other'));
      const first = await log(payload, deps(bucket, '42'));
      const second = await log(payload, deps(bucket, '42'));
      const [third, fourth] = await Promise.all([log(payload, deps(bucket, '43')), log(payload, deps(bucket, '43'))]);
      expect(second).toEqual(first);
      expect(fourth).toEqual(third);
      expect(new Set([other.key, first.key, third.key]).size).toBe(3);
      expect(await keysUnder(bucket, 'sites/again/logs/')).toEqual([other.key, first.key, third.key].sort(byteOrder));
      if (bucket.atomicIfAbsent) {
        expect([other.key, first.key, third.key]).toEqual(['', '~1', '~2'].map((s) => `sites/again/logs/2026-12-02T09:00:00.000Z-b${s}.json`));
      } else {
        // No key is shared between jobs here: each entry's suffix is its job's own, after the plain key.
        for (const k of [other.key, first.key, third.key]) expect(parseLogKey(k)!.seq).toBeGreaterThanOrEqual(10 ** 15);
      }
      // The job's identity is in the object's metadata, not in the entry (the seed format stays as it
      // was): a counter id with its enqueue time, a custom id alone.
      expect((await bucket.stat(first.key)).metadata).toEqual({ job_id: `42@${ENQUEUED}` });
      expect((await bucket.stat(other.key)).metadata).toEqual({ job_id: 'other' });
      expect(Object.keys(await entry(bucket, first.key)).sort()).toEqual(['action', 'build_id', 'metadata', 'site_id', 'status', 'timestamp']);
    });

    it('writes an entry for each of two jobs with one counter id but different enqueue times (a Redis flush, a second deployment)', async () => {
      const bucket = buckets.get(backend)!;
      const payload = { backend, site: 'flush', build: 'b', action: 'deploy', status: 'ok', timestamp: '2026-12-02T07:00:00Z' };
      // Job 17 before the flush, job 17 after it, and a redelivery of each: two entries.
      const before = await log(payload, deps(bucket, '17', ENQUEUED));
      const after = await log(payload, deps(bucket, '17', ENQUEUED + 3_600_000));
      expect(await log(payload, deps(bucket, '17', ENQUEUED))).toEqual(before);
      expect(await log(payload, deps(bucket, '17', ENQUEUED + 3_600_000))).toEqual(after);
      expect(after.key).not.toBe(before.key);
      expect(await keysUnder(bucket, 'sites/flush/logs/')).toEqual([before.key, after.key].sort(byteOrder));
    });

    it('takes an entry an earlier version wrote with the plain counter id for this job\'s own only when it holds the same bytes', async () => {
      const bucket = buckets.get(backend)!;
      const data = { backend, site: 'upgrade', build: 'b', action: 'a', status: 's', timestamp: '2026-12-02T07:00:00Z' };
      const bytes = Buffer.from(`${JSON.stringify({ timestamp: '2026-12-02T07:00:00.000Z', build_id: 'b', site_id: 'upgrade', action: 'a', status: 's', metadata: {} })}\n`);
      const old = 'sites/upgrade/logs/2026-12-02T07:00:00.000Z-b.json';
      await bucket.put(old, bytes, { contentType: 'application/json', metadata: { job_id: '7' } });
      expect(await log(data, deps(bucket, '7'))).toMatchObject({ key: old });
      // The same counter id with other bytes is another job (ids restarted): its own entry.
      expect((await log({ ...data, status: 'other' }, deps(bucket, '7'))).key).not.toBe(old);
      expect((await keysUnder(bucket, 'sites/upgrade/logs/')).length).toBe(2);
    });
  });

  it.each([
    ['without a zone', '2026-12-02T07:00:00'],
    ['as a digit string', '1'],
    ['with month 13', '2026-13-01T00:00:00Z'],
    ['as free text', 'yesterday'],
  ])('fails a log job with a timestamp %s at once, naming the field', async (_what, timestamp) => {
    const id = await serial.client.log({ backend: 'memory', site: 's', build: 'b', action: 'a', status: 's', timestamp }, { attempts: 3 });
    await expect(serial.client.result(id, { timeoutMs: 20_000 })).rejects.toThrow(/^InvalidInput: timestamp: /);
    expect((await serial.client.getJob(id))?.attemptsMade).toBe(1);
  });
});

describe('log keys', () => {
  it('sort every suffix after the ones before it, and parse back', () => {
    const keys = Array.from({ length: 1200 }, (_, seq) => logKey('s', '2026-12-02T07:00:00.000Z', 'b.x-1', seq));
    expect([...keys].sort(byteOrder)).toEqual(keys);
    // Before the next millisecond's entries and another build's, whatever the suffix.
    expect(byteOrder(keys[1199]!, logKey('s', '2026-12-02T07:00:00.001Z', 'a', 0))).toBeLessThan(0);
    for (const [seq, key] of keys.entries()) expect(parseLogKey(key)).toEqual({ site: 's', timestamp: '2026-12-02T07:00:00.000Z', build: 'b.x-1', seq });
    expect(keys[10]).toBe('sites/s/logs/2026-12-02T07:00:00.000Z-b.x-1~~10.json');
    expect(parseLogKey('sites/s/logs/2026-12-02T07:00:00.000Z-b~10.json')).toBeUndefined();
    expect(parseLogKey('sites/s/logs/2026-12-02T07:00:00Z-b.json')).toBeUndefined();
  });
});

describe('log timestamps', () => {
  it.each([
    ['2026-12-02T07:00:00Z', '2026-12-02T07:00:00.000Z'],
    ['2026-12-02T07:00:00.123+01:00', '2026-12-02T06:00:00.123Z'],
    ['2026-12-02T07:00:00.123456789-05:30', '2026-12-02T12:30:00.123Z'],
    ['2026-12-02T07:00:00+0100', '2026-12-02T06:00:00.000Z'],
    ['2024-02-29T23:59:59.9z', '2024-02-29T23:59:59.900Z'],
    ['1970-01-01T01:00:00+01:00', '1970-01-01T00:00:00.000Z'],
    [1796194800000, '2026-12-02T07:00:00.000Z'],
    [0, '1970-01-01T00:00:00.000Z'],
  ])('reads %j as %s', (input, out) => {
    expect(normalizeTimestamp(input)).toBe(out);
  });

  it.each([
    '2026-12-02T07:00:00', '2026-12-02 07:00:00Z', '2026-12-02', '1', '1796194800000', '2026-13-01T00:00:00Z', '2026-02-30T00:00:00Z',
    '2025-02-29T00:00:00Z', '2026-12-02T24:00:00Z', '2026-12-02T07:60:00Z', '2026-12-02T07:00:60Z', '2026-12-02T07:00:00+24:00',
    '1969-12-31T23:59:59Z', '1970-01-01T00:30:00+01:00', 'Wed, 02 Dec 2026 07:00:00 GMT', 'yesterday', '', ' 2026-12-02T07:00:00Z',
    1.5, -1, Number.MAX_SAFE_INTEGER,
  ])('refuses %j as InvalidInput naming timestamp', (input) => {
    expect(() => normalizeTimestamp(input)).toThrow(/^InvalidInput: log: timestamp: /);
  });

  it("does not depend on the worker's time zone", () => {
    const inputs = ['2026-12-02T07:00:00Z', '2026-06-01T12:00:00.5+05:45', '2026-03-29T01:30:00-03:00', 1796194800000];
    const inUtc = inputs.map(normalizeTimestamp);
    const before = process.env.TZ;
    try {
      for (const tz of ['Pacific/Kiritimati', 'America/St_Johns', 'Asia/Kathmandu', 'Europe/Berlin']) {
        process.env.TZ = tz;
        // Node follows TZ as soon as it is set: local time differs here, so a local-time parse would show.
        expect(new Date(Date.UTC(2026, 11, 2)).getHours()).not.toBe(0);
        expect(inputs.map(normalizeTimestamp)).toEqual(inUtc);
        expect(() => normalizeTimestamp('2026-12-02T07:00:00')).toThrow(/^InvalidInput/);
      }
    } finally {
      if (before === undefined) delete process.env.TZ;
      else process.env.TZ = before;
    }
  });
});
