import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Bucket } from '../../src/storage/bucket.js';
import { azureConformanceTarget } from '../harness/azure.js';
import { gcsConformanceTarget } from '../harness/gcs.js';
import { tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { s3ConformanceTarget } from '../harness/s3.js';
import { inProcessWorker, type InProcessWorker } from '../harness/worker.js';
import { contents, mixedTree, putTree, sha } from './fixtures.js';

// Migrations between the clouds' emulators: S3 (s3rver) -> Azure (azurite) -> GCS (the suite's
// JSON-API server) -> Azure again, each leg checked byte for byte and by recorded digest, with
// content type and user metadata carried along, then verified.

describe('migrate between clouds', () => {
  let redis: TestRedis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let w: InProcessWorker;
  const s3 = s3ConformanceTarget();
  const az = azureConformanceTarget();
  const gcs = gcsConformanceTarget();
  const buckets = new Map<string, Bucket>();
  const tree = mixedTree(24, 3);

  beforeAll(async () => {
    [redis, tmp] = await Promise.all([startRedis(), tempDir('stevedore-clouds-')]);
    const [s3d, az1, az2, g] = await Promise.all([s3.newDriver({ conditionalWrites: false }), az.newDriver(), az.newDriver(), gcs.newDriver()]);
    buckets.set('s3', new Bucket(s3d, { name: 's3' }));
    buckets.set('az', new Bucket(az1, { name: 'az' }));
    buckets.set('az2', new Bucket(az2, { name: 'az2', prefix: 'back/here' }));
    buckets.set('gcs', new Bucket(g, { name: 'gcs' }));
    w = await inProcessWorker(redis.url, buckets, join(tmp.path, 'staging'), { concurrency: 4, fanout: { chunkKeys: 5, window: 3, lanes: 4 } });
    await putTree(buckets.get('s3')!, tree);
  }, 120_000);
  afterAll(async () => {
    await w?.close();
    await Promise.all([s3.teardown(), az.teardown(), gcs.teardown()]);
    await redis?.stop();
    await tmp?.remove();
  });

  const expectSame = async (name: string) => {
    const got = await contents(buckets.get(name)!);
    expect([...got.keys()].sort(), name).toEqual([...tree.keys()].sort());
    for (const [k, b] of tree) expect(got.get(k), `${name} ${k}`).toEqual({ sha: sha(b), recorded: sha(b), type: 'application/x-test', meta: { origin: 'fixture' } });
  };

  it('S3 -> Azure -> GCS -> Azure, every object verified on each leg, and a second pass over each leg copies nothing', async () => {
    for (const [from, to] of [['s3', 'az'], ['az', 'gcs'], ['gcs', 'az2']] as const) {
      const r = await w.client.run('migrate', { from, to });
      expect(r, `${from} -> ${to}`).toMatchObject({ scanned: tree.size, copied: tree.size, skipped: 0, failed: 0, missingDigest: 0, failures: [] });
      await expectSame(to);
      const again = await w.client.run('migrate', { from, to });
      expect(again, `${from} -> ${to} again`).toMatchObject({ copied: 0, skipped: tree.size, failed: 0 });
    }
    for (const b of ['s3', 'az', 'gcs', 'az2']) {
      expect(await w.client.run('verify', { backend: b }), b).toMatchObject({ scanned: tree.size, ok: tree.size, mismatched: 0, missingDigest: 0 });
    }
  });

  it('verify finds rot planted in Azure and GCS behind the store\'s back', async () => {
    const key = 'tree/3/obj-0003.bin';
    const bad = Buffer.from(tree.get(key)!);
    bad[0] = bad[0]! ^ 1;
    // Each target's corrupt() rewrites bytes and keeps the recorded digest; the targets' shared
    // buckets are their own, so plant in a fresh copy there.
    for (const [target, name] of [[az, 'az-rot'], [gcs, 'gcs-rot']] as const) {
      const b = new Bucket(await target.driver(), { name });
      buckets.set(name, b);
      await b.put(key, tree.get(key)!);
      await target.corrupt(key, bad);
      const r = await w.client.run('verify', { backend: name, prefix: 'tree/3/' });
      expect(r.mismatched, name).toBe(1);
      expect(r.failures[0]).toMatchObject({ key, code: 'ChecksumMismatch' });
    }
  });
});
