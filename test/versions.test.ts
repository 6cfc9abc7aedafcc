import { mkdir, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FsDriver } from '../src/backends/fs.js';
import { MemoryDriver } from '../src/backends/memory.js';
import { Bucket } from '../src/storage/bucket.js';
import { versions } from '../src/versions.js';
import { tempDir } from './harness/process.js';
import { s3ConformanceTarget } from './harness/s3.js';
import { startRedis, type TestRedis } from './harness/redis.js';
import { inProcessWorker, type InProcessWorker } from './harness/worker.js';

const b64 = (s: string) => Buffer.from(s).toString('base64');

describe('versions', () => {
  let redis: TestRedis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let w: InProcessWorker;
  let fsRoot: string;
  const buckets = new Map<string, Bucket>();
  const s3 = s3ConformanceTarget();

  beforeAll(async () => {
    redis = await startRedis();
    tmp = await tempDir();
    fsRoot = join(tmp.path, 'objects');
    buckets.set('fs', new Bucket(new FsDriver({ root: fsRoot }), { name: 'fs' }));
    buckets.set('memory', new Bucket(new MemoryDriver(), { name: 'memory' }));
    // S3 listings carry no metadata: versions must HEAD the artifacts for their stored_at.
    buckets.set('s3', new Bucket(await s3.newDriver({ conditionalWrites: false }), { name: 's3', prefix: 'v' }));
    w = await inProcessWorker(redis.url, buckets, join(tmp.path, 'staging'), { concurrency: 1 });
  });
  afterAll(async () => {
    await w?.close();
    await s3.teardown();
    await redis?.stop();
    await tmp?.remove();
  });

  /** Runs a store job; resolves to the time it was enqueued, as ISO. */
  const store = async (backend: string, key: string, text: string, metadata?: Record<string, string>) => {
    const id = await w.client.store({ backend, key, source: { base64: b64(text) }, ...(metadata ? { metadata } : {}) });
    await w.client.result(id, { timeoutMs: 20_000 });
    return new Date((await w.client.getJob(id))!.timestamp).toISOString();
  };

  describe.each(['fs', 'memory', 's3'])('on the %s backend', (backend) => {
    it('orders builds by when they were first stored: a re-store does not move a build up', async () => {
      const bucket = buckets.get(backend)!;
      const a = await store(backend, 'sites/re/artifacts/A.tar.gz', 'a, first');
      const b = await store(backend, 'sites/re/artifacts/B.tar.gz', 'b');
      await new Promise((r) => setTimeout(r, 5));
      // A again, later, with other bytes and a stored_at of the producer's own: the first time stands.
      await store(backend, 'sites/re/artifacts/A.tar.gz', 'a, again', { stored_at: '2030-01-01T00:00:00.000Z', by: 'ci' });
      expect(a < b).toBe(true);
      const list = await versions(bucket, 're');
      expect(list.map((v) => v.build)).toEqual(['B', 'A']);
      expect(list[1]!.artifact).toMatchObject({ key: 'sites/re/artifacts/A.tar.gz', size: 8, storedAt: a });
      expect(list[1]!.first).toBe(a);
      // The re-store itself is still visible as the artifact's modified time (S3's is to the second).
      expect(list[1]!.artifact!.modified.slice(0, 19) >= b.slice(0, 19)).toBe(true);
      expect((await bucket.stat('sites/re/artifacts/A.tar.gz')).metadata).toEqual({ stored_at: a, by: 'ci' });
    });

    it('orders a logged build and a stored build by the earliest of their times', async () => {
      const bucket = buckets.get(backend)!;
      // L was logged long ago and stored now; S was stored now and logged (with a future timestamp) after.
      await w.client.run('log', { backend, site: 'mix', build: 'L', action: 'build', status: 'ok', timestamp: '2026-01-01T00:00:00Z' });
      await store(backend, 'sites/mix/artifacts/L.tar.gz', 'l');
      const s = await store(backend, 'sites/mix/artifacts/S.tar.gz', 's');
      await w.client.run('log', { backend, site: 'mix', build: 'S', action: 'deploy', status: 'ok', timestamp: '2099-01-01T00:00:00Z' });
      const list = await versions(bucket, 'mix');
      expect(list.map((v) => [v.build, v.first])).toEqual([['S', s], ['L', '2026-01-01T00:00:00.000Z']]);
      expect(list[0]!.updated).toBe('2099-01-01T00:00:00.000Z');
    });
  });

  it('keeps the order through a copy (as a migration makes), and falls back to the modified time for objects of other tools', async () => {
    const bucket = buckets.get('fs')!;
    const old = await store('fs', 'sites/src/artifacts/old.tar.gz', 'old');
    await store('fs', 'sites/src/artifacts/new.tar.gz', 'new');
    // Copied later, new first: the copies keep their first-store times.
    await bucket.copy('sites/src/artifacts/new.tar.gz', 'sites/dst/artifacts/new.tar.gz');
    await bucket.copy('sites/src/artifacts/old.tar.gz', 'sites/dst/artifacts/old.tar.gz');
    expect((await versions(bucket, 'dst')).map((v) => [v.build, v.first])).toEqual([['new', expect.any(String)], ['old', old]]);
    // A tree another tool wrote: no metadata, so the file's time is all there is.
    await mkdir(join(fsRoot, 'sites/foreign/artifacts'), { recursive: true });
    await writeFile(join(fsRoot, 'sites/foreign/artifacts/x.tar.gz'), 'x');
    await writeFile(join(fsRoot, 'sites/foreign/artifacts/y.tar.gz'), 'y');
    await utimes(join(fsRoot, 'sites/foreign/artifacts/x.tar.gz'), new Date('2026-05-01T00:00:00Z'), new Date('2026-05-01T00:00:00Z'));
    await utimes(join(fsRoot, 'sites/foreign/artifacts/y.tar.gz'), new Date('2026-04-01T00:00:00Z'), new Date('2026-04-01T00:00:00Z'));
    const foreign = await versions(bucket, 'foreign');
    expect(foreign.map((v) => [v.build, v.first])).toEqual([['x', '2026-05-01T00:00:00.000Z'], ['y', '2026-04-01T00:00:00.000Z']]);
    // Stored over by a job: the object keeps the time it was first seen at, not the job's.
    await store('fs', 'sites/foreign/artifacts/y.tar.gz', 'y2');
    expect((await versions(bucket, 'foreign')).map((v) => [v.build, v.first])).toEqual([['x', '2026-05-01T00:00:00.000Z'], ['y', '2026-04-01T00:00:00.000Z']]);
  });
});
