import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, readdir, rename, stat, writeFile } from 'node:fs/promises';
import { createGzip } from 'node:zlib';
import tar from 'tar-stream';
import { join } from 'node:path';
import { Queue, QueueEvents } from 'bullmq';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FsDriver } from '../../src/backends/fs.js';
import type { Progress } from '../../src/queue/client.js';
import { Bucket } from '../../src/storage/bucket.js';
import type { Driver } from '../../src/storage/driver.js';
import { versions } from '../../src/versions.js';
import { readAll } from '../conformance/suite.js';
import { gcsConformanceTarget } from '../harness/gcs.js';
import { tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { overrideDriver } from '../fixtures/override-driver.js';
import { inProcessWorker, type InProcessWorker } from '../harness/worker.js';

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

/** Fails the first `n` puts with ENOSPC, as a full disk would: the job must retry and then succeed. */
function failingPuts(driver: Driver, n: number): Driver {
  let left = n;
  return overrideDriver(driver, {
    put: async () => { left--; throw Object.assign(new Error('no space left on device'), { code: 'ENOSPC' }); },
  }, () => left > 0);
}

describe('jobs through Redis', () => {
  let redis: TestRedis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let w: InProcessWorker;
  let stagingDir: string;
  const gcs = gcsConformanceTarget();
  const buckets = new Map<string, Bucket>();

  beforeAll(async () => {
    redis = await startRedis();
    tmp = await tempDir();
    stagingDir = join(tmp.path, 'staging');
    const fs = new FsDriver({ root: join(tmp.path, 'objects') });
    buckets.set('default', new Bucket(fs, { name: 'default' }));
    buckets.set('gcs', new Bucket(await gcs.driver(), { name: 'gcs', prefix: 'jobs' }));
    buckets.set('flaky', new Bucket(failingPuts(new FsDriver({ root: join(tmp.path, 'flaky') }), 2), { name: 'flaky' }));
    w = await inProcessWorker(redis.url, buckets, stagingDir, { maxInlineBytes: 1024 });
    await mkdir(stagingDir, { recursive: true });
  });
  afterAll(async () => {
    await w?.close();
    await gcs.teardown();
    await redis?.stop();
    await tmp?.remove();
  });

  describe.each(['default', 'gcs'])('on the %s backend', (backend) => {
    it('stores a staged file, fetches it back verified, and reports progress', async () => {
      const bytes = randomBytes(3 << 20);
      await writeFile(join(stagingDir, `in-${backend}.bin`), bytes);
      const progress: Progress[] = [];
      const stored = await w.client.run('store', { backend, key: `sites/web/artifacts/b1-${backend}.tar.gz`, source: { path: `in-${backend}.bin` } }, { onProgress: (p) => progress.push(p) });
      expect(stored).toEqual({ backend, key: `sites/web/artifacts/b1-${backend}.tar.gz`, size: bytes.length, sha256: sha(bytes) });
      // A store from a staged file knows its total from the start, as one from inline bytes does.
      expect(progress.length).toBeGreaterThan(0);
      for (const p of progress) expect(p.total).toBe(bytes.length);
      expect(progress.at(-1)).toEqual({ bytes: bytes.length, total: bytes.length });
      const fetched = await w.client.run('fetch-to-staging', { backend, key: stored.key, dest: `out/${backend}/a.bin`, sha256: stored.sha256 });
      expect(fetched).toEqual({ path: `out/${backend}/a.bin`, size: bytes.length, sha256: sha(bytes), verified: true });
      expect(sha(await readFile(join(stagingDir, 'out', backend, 'a.bin')))).toBe(sha(bytes));
    });

    it('writes a log entry as one JSON object, at a key that sorts by time', async () => {
      const res = await w.client.run('log', { backend, site: 'web', build: 'b7', action: 'deploy', status: 'ok', metadata: { by: 'ci' }, timestamp: '2026-11-24T10:00:00Z' });
      expect(res).toEqual({ key: 'sites/web/logs/2026-11-24T10:00:00.000Z-b7.json', timestamp: '2026-11-24T10:00:00.000Z' });
      const got = await buckets.get(backend)!.get(res.key);
      expect(JSON.parse((await readAll(got.stream)).toString())).toEqual({
        timestamp: '2026-11-24T10:00:00.000Z', build_id: 'b7', site_id: 'web', action: 'deploy', status: 'ok', metadata: { by: 'ci' },
      });
      expect(got.info.contentType).toBe('application/json');
    });
  });

  it('fetches a tar.gz and unpacks it safely into dest, which appears only when complete', async () => {
    const pack = tar.pack();
    pack.entry({ name: 'app/index.js', mode: 0o644 }, 'console.log(1)\n');
    pack.entry({ name: 'app/bin', type: 'directory', mode: 0o755 });
    pack.entry({ name: 'app/bin/run', mode: 0o755 }, '#!/bin/sh\n');
    pack.finalize();
    const archive = await readAll(pack.pipe(createGzip()));
    const stored = await w.client.run('store', { key: 'sites/web/artifacts/tgz.tar.gz', source: { base64: archive.toString('base64') } });
    const res = await w.client.run('fetch-to-staging', { key: stored.key, dest: 'unpacked/tgz', extract: true, sha256: stored.sha256 });
    expect(res).toEqual({ path: 'unpacked/tgz', size: archive.length, sha256: sha(archive), verified: true, entries: 3 });
    expect(await readFile(join(stagingDir, 'unpacked/tgz/app/index.js'), 'utf8')).toBe('console.log(1)\n');
    expect((await stat(join(stagingDir, 'unpacked/tgz/app/bin/run'))).mode & 0o777).toBe(0o755);

    // A valid archive whose digest is not the expected one: the check at the stream's end must
    // stop the rename, even though every entry extracted cleanly.
    await expect(w.client.run('fetch-to-staging', { key: stored.key, dest: 'unpacked/wrong', extract: true, sha256: sha(Buffer.from('x')) }))
      .rejects.toMatchObject({ code: 'ChecksumMismatch' });
    await expect(stat(join(stagingDir, 'unpacked/wrong'))).rejects.toMatchObject({ code: 'ENOENT' });

    const evil = tar.pack();
    evil.entry({ name: '../../escape.txt' }, 'x');
    evil.finalize();
    const bad = await readAll(evil.pipe(createGzip()));
    await w.client.run('store', { key: 'evil.tar.gz', source: { base64: bad.toString('base64') } });
    await expect(w.client.run('fetch-to-staging', { key: 'evil.tar.gz', dest: 'unpacked/evil', extract: true }, { attempts: 3 })).rejects.toMatchObject({ code: 'InvalidInput' });
    await expect(stat(join(stagingDir, 'unpacked/evil'))).rejects.toMatchObject({ code: 'ENOENT' });
    await expect(stat(join(tmp.path, 'escape.txt'))).rejects.toMatchObject({ code: 'ENOENT' });
    expect((await readdir(join(stagingDir, 'unpacked'))).sort()).toEqual(['tgz']);
  });

  it('serves a producer that uses nothing but bullmq exactly like the client', async () => {
    const queue = new Queue(w.queue, { connection: { host: '127.0.0.1', port: redis.port } });
    const events = new QueueEvents(w.queue, { connection: { host: '127.0.0.1', port: redis.port } });
    try {
      await events.waitUntilReady();
      const job = await queue.add('store', { key: 'plain/bullmq.txt', source: { base64: Buffer.from('plain').toString('base64') } });
      const result = await job.waitUntilFinished(events, 20_000);
      expect(result).toEqual({ backend: 'default', key: 'plain/bullmq.txt', size: 5, sha256: sha(Buffer.from('plain')) });
      expect((await queue.getJob(job.id!))?.returnvalue).toEqual(result);
      const viaClient = await w.client.run('store', { key: 'plain/bullmq.txt', source: { base64: Buffer.from('plain').toString('base64') } });
      expect(viaClient).toEqual(result);
    } finally {
      await events.close();
      await queue.close();
    }
  });

  it.each([
    ['an unknown field', { key: 'k', source: { base64: '' }, extra: 1 }, /^InvalidInput: payload: unknown field\(s\) "extra"/],
    ['a key with ..', { key: 'a/../b', source: { base64: '' } }, /^InvalidInput: key: /],
    ['a wrong type', { key: 'k', source: { base64: '' }, ifAbsent: 'yes' }, /^InvalidInput: ifAbsent: /],
    ['a staging path outside the area', { key: 'k', source: { path: '../../etc/passwd' } }, /^InvalidInput: .*source\.path: must not contain "\.\."/],
    ['an absolute staging path', { key: 'k', source: { path: '/etc/passwd' } }, /^InvalidInput: .*source\.path: must be relative/],
    ['a __proto__ field', JSON.parse('{"key":"k","source":{"base64":""},"__proto__":{"polluted":true}}') as object, /^InvalidInput: payload: unknown field\(s\) "__proto__"/],
    ['an unknown backend', { backend: 'nope', key: 'k', source: { base64: '' } }, /^InvalidInput: backend: no backend named "nope"/],
    ['inline bytes over the limit', { key: 'k', source: { base64: randomBytes(2048).toString('base64') } }, /^InvalidInput: .*over the inline limit/],
  ])('fails a payload with %s at once, naming the field, and keeps serving', async (_what, data, reason) => {
    const queue = new Queue(w.queue, { connection: { host: '127.0.0.1', port: redis.port } });
    const events = new QueueEvents(w.queue, { connection: { host: '127.0.0.1', port: redis.port } });
    try {
      await events.waitUntilReady();
      const job = await queue.add('store', data, { attempts: 3, backoff: { type: 'fixed', delay: 10 } });
      await expect(job.waitUntilFinished(events, 20_000)).rejects.toThrow(reason);
      const after = await queue.getJob(job.id!);
      expect(after?.attemptsMade).toBe(1);
      expect(({} as Record<string, unknown>).polluted).toBeUndefined();
      await expect(w.client.run('store', { key: 'still/serving', source: { base64: 'eA==' } })).resolves.toMatchObject({ size: 1 });
    } finally {
      await events.close();
      await queue.close();
    }
  });

  it('fails an unknown job name without retry', async () => {
    const queue = new Queue(w.queue, { connection: { host: '127.0.0.1', port: redis.port } });
    const events = new QueueEvents(w.queue, { connection: { host: '127.0.0.1', port: redis.port } });
    try {
      await events.waitUntilReady();
      const job = await queue.add('frobnicate', {}, { attempts: 3 });
      await expect(job.waitUntilFinished(events, 20_000)).rejects.toThrow(/^InvalidInput: name: unknown job type "frobnicate"/);
    } finally {
      await events.close();
      await queue.close();
    }
  });

  it('reports a failed job\'s own reason when it was removed on failure, even with a timeout set', async () => {
    // With timeoutMs given, a wait that ran out is reported as pending; a removed failed job is not
    // that. Delayed, so the wait is under way before the job fails and is removed.
    await expect(w.client.run('store', { key: 'a/../b', source: { base64: '' } }, { delay: 300, removeOnFail: true, timeoutMs: 20_000 }))
      .rejects.toMatchObject({ code: 'InvalidInput', message: expect.stringMatching(/^InvalidInput: key: /) });
  });

  it('retries a Transient failure (ENOSPC) with backoff, then succeeds', async () => {
    const id = await w.client.store({ backend: 'flaky', key: 'k', source: { base64: 'eHl6' } }, { attempts: 4 });
    const res = await w.client.result<'store'>(id, { timeoutMs: 20_000 });
    expect(res.sha256).toBe(sha(Buffer.from('xyz')));
    expect((await w.client.getJob(id))?.attemptsMade).toBe(3);
  });

  it('does not retry a checksum mismatch, and stores nothing', async () => {
    const id = await w.client.store({ key: 'mismatch', source: { base64: 'eHl6' }, sha256: sha(Buffer.from('other')) }, { attempts: 4 });
    await expect(w.client.result(id, { timeoutMs: 20_000 })).rejects.toMatchObject({ code: 'ChecksumMismatch' });
    expect((await w.client.getJob(id))?.attemptsMade).toBe(1);
    await expect(buckets.get('default')!.stat('mismatch')).rejects.toMatchObject({ code: 'NotFound' });
  });

  it('fails a fetch of rotten bytes with ChecksumMismatch and never creates dest', async () => {
    const root = (buckets.get('default')!.driver as FsDriver).root;
    await w.client.run('store', { key: 'rot/obj', source: { base64: Buffer.from('good bytes').toString('base64') } });
    await writeFile(join(root, 'rot/obj'), 'evil bytes', { flag: 'r+' });
    await expect(w.client.run('fetch-to-staging', { key: 'rot/obj', dest: 'rot.bin' }, { attempts: 3 })).rejects.toMatchObject({ code: 'ChecksumMismatch' });
    await expect(stat(join(stagingDir, 'rot.bin'))).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('reports an object without a recorded digest (written by another tool) as not verified', async () => {
    const root = (buckets.get('default')!.driver as FsDriver).root;
    const bytes = Buffer.from('copied in by rsync, no sidecar');
    await mkdir(join(root, 'foreign'), { recursive: true });
    await writeFile(join(root, 'foreign', 'plain.bin'), bytes);
    expect(await w.client.run('fetch-to-staging', { key: 'foreign/plain.bin', dest: 'foreign/a.bin' }))
      .toEqual({ path: 'foreign/a.bin', size: bytes.length, sha256: sha(bytes), verified: false });
    // The payload's digest matching does not vouch for the stored object: still not verified.
    expect(await w.client.run('fetch-to-staging', { key: 'foreign/plain.bin', dest: 'foreign/b.bin', sha256: sha(bytes) }))
      .toMatchObject({ sha256: sha(bytes), verified: false });
    await expect(w.client.run('fetch-to-staging', { key: 'foreign/plain.bin', dest: 'foreign/c.bin', sha256: sha(Buffer.from('x')) }))
      .rejects.toMatchObject({ code: 'ChecksumMismatch' });
    expect((await readdir(join(stagingDir, 'foreign'))).sort()).toEqual(['a.bin', 'b.bin']);
    // Stored by us, it carries its digest and is.
    await w.client.run('store', { key: 'foreign/ours.bin', source: { base64: bytes.toString('base64') } });
    expect(await w.client.run('fetch-to-staging', { key: 'foreign/ours.bin', dest: 'foreign/d.bin' })).toMatchObject({ verified: true });
  });

  it('stores a staged file that becomes visible only after the job started', async () => {
    const bytes = randomBytes(4096);
    const id = await w.client.store({ key: 'late/file.bin', source: { path: 'late/file.bin' } }, { attempts: 1 });
    await new Promise((r) => setTimeout(r, 300));
    await mkdir(join(stagingDir, 'late'), { recursive: true });
    await writeFile(join(stagingDir, 'late.tmp'), bytes);
    await rename(join(stagingDir, 'late.tmp'), join(stagingDir, 'late', 'file.bin'));
    expect(await w.client.result<'store'>(id, { timeoutMs: 20_000 })).toMatchObject({ size: bytes.length, sha256: sha(bytes) });
    expect((await w.client.getJob(id))?.attemptsMade).toBe(1);
  });

  it('runs the same ifAbsent store twice harmlessly', async () => {
    const payload = { key: 'twice', source: { base64: 'dHdpY2U=' }, ifAbsent: true };
    const [a, b] = await Promise.all([w.client.run('store', payload), w.client.run('store', payload)]);
    expect(a).toEqual(b);
    await expect(w.client.run('store', { ...payload, source: { base64: 'b3RoZXI=' } })).rejects.toMatchObject({ code: 'PreconditionFailed' });
  });

  it('works under a hash-tagged key prefix, as Redis Cluster needs', async () => {
    const tagged = await inProcessWorker(redis.url, buckets, stagingDir, { prefix: '{stevedore}' });
    try {
      await expect(tagged.client.run('store', { key: 'tagged', source: { base64: 'dGFn' } })).resolves.toMatchObject({ size: 3 });
      const conn = new Redis(redis.url);
      expect((await conn.keys('{stevedore}:*')).length).toBeGreaterThan(0);
      await conn.quit();
    } finally {
      await tagged.close();
    }
  });

  it("lists a site's builds from artifacts and logs, newest first", async () => {
    for (const [build, ts] of [['b1', '2026-01-01T00:00:00Z'], ['b2', '2026-03-01T00:00:00Z'], ['b3', '2026-02-01T00:00:00Z']] as const) {
      await w.client.run('log', { site: 'ver', build, action: 'build', status: 'ok', timestamp: ts });
    }
    const list = await versions(buckets.get('default')!, 'ver');
    expect(list.map((v) => v.build)).toEqual(['b2', 'b3', 'b1']);
    expect(list[0]?.logs).toEqual(['sites/ver/logs/2026-03-01T00:00:00.000Z-b2.json']);
  });
});
