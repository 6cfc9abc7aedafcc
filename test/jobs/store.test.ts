import { createHash } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { store } from '../../jobs/store.js';
import { FsDriver } from '../../src/backends/fs.js';
import { MemoryDriver } from '../../src/backends/memory.js';
import type { JobDeps } from '../../src/payload.js';
import { Staging } from '../../src/staging.js';
import { Bucket } from '../../src/storage/bucket.js';
import { readAll } from '../conformance/suite.js';
import { tempDir } from '../harness/process.js';

/** A few MiB: large enough that a put streams for a while, so racing writers overlap. */
const SIZE = 3 * 1024 * 1024;
const WRITERS = 16;
const T0 = Date.parse('2026-12-02T07:00:00.000Z');
const iso = (ms: number) => new Date(ms).toISOString();

describe('store: concurrent plain stores of one key (RELIABILITY #17, #18)', () => {
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let staging: Staging;
  /** Digest of staged file `v<i>`, each with bytes of its own. */
  const digests: string[] = [];
  const buckets = new Map<string, Bucket>();

  beforeAll(async () => {
    tmp = await tempDir();
    const dir = join(tmp.path, 'staging');
    await mkdir(dir, { recursive: true });
    staging = new Staging(dir);
    for (let i = 0; i <= WRITERS; i++) {
      const bytes = Buffer.alloc(SIZE, i + 1);
      bytes.write(`version ${i}`);
      await writeFile(join(dir, `v${i}`), bytes);
      digests.push(createHash('sha256').update(bytes).digest('hex'));
    }
    buckets.set('fs', new Bucket(new FsDriver({ root: join(tmp.path, 'objects') }), { name: 'fs' }));
    buckets.set('memory', new Bucket(new MemoryDriver(), { name: 'memory' }));
  });
  afterAll(async () => {
    await tmp?.remove();
  });

  const deps = (bucket: Bucket, enqueuedAt: number, jobId: string): JobDeps => ({
    bucket: () => bucket, staging, log: pino({ level: 'silent' }), signal: new AbortController().signal,
    progress: () => {}, enqueuedAt, jobId, limits: { maxInlineBytes: 1024 },
  });
  const run = (bucket: Bucket, key: string, version: number, enqueuedAt: number) =>
    store({ backend: 'b', key, source: { path: `v${version}` } }, deps(bucket, enqueuedAt, `job-${version}`));

  /** The object is one writer's version, whole: its bytes hash to that version's digest, which stat records. */
  async function expectOneWholeVersion(bucket: Bucket, key: string): Promise<void> {
    const got = await bucket.get(key);
    const bytes = await readAll(got.stream);
    const digest = createHash('sha256').update(bytes).digest('hex');
    expect(bytes.length).toBe(SIZE);
    expect(digests).toContain(digest);
    expect((await bucket.stat(key)).sha256).toBe(digest);
  }

  describe.each(['fs', 'memory'])('on the %s backend', (backend) => {
    it(`lets ${WRITERS} concurrent re-stores of an existing key all succeed, one whole version winning, keeping the first-store time`, async () => {
      const bucket = buckets.get(backend)!;
      const key = 'sites/race/artifacts/existing.tar.gz';
      await run(bucket, key, 0, T0);
      const results = await Promise.allSettled(Array.from({ length: WRITERS }, (_, i) => run(bucket, key, i + 1, T0 + 1000 + i)));
      expect(results.filter((r) => r.status === 'rejected')).toEqual([]);
      // Each job reports what it stored: its own bytes.
      expect(results.map((r) => (r as PromiseFulfilledResult<{ sha256: string }>).value.sha256)).toEqual(digests.slice(1));
      await expectOneWholeVersion(bucket, key);
      expect((await bucket.stat(key)).metadata.stored_at).toBe(iso(T0));
    });

    it(`lets ${WRITERS} concurrent first stores of a new key all succeed, one whole version winning, with a time from among them`, async () => {
      const bucket = buckets.get(backend)!;
      const key = 'sites/race/artifacts/new.tar.gz';
      const times = Array.from({ length: WRITERS }, (_, i) => T0 + 1000 + i);
      const results = await Promise.allSettled(times.map((t, i) => run(bucket, key, i + 1, t)));
      expect(results.filter((r) => r.status === 'rejected')).toEqual([]);
      await expectOneWholeVersion(bucket, key);
      expect(times.map(iso)).toContain((await bucket.stat(key)).metadata.stored_at);
    });

    it(`lets ${WRITERS} concurrent re-stores enqueued before the object's time all succeed, moving the time earlier, never later`, async () => {
      const bucket = buckets.get(backend)!;
      const key = 'sites/race/artifacts/earlier.tar.gz';
      const late = T0 + 60_000;
      await run(bucket, key, 0, late);
      // Every writer is earlier than the object: each replaces it conditionally, racing the others.
      const times = Array.from({ length: WRITERS }, (_, i) => T0 + i);
      const results = await Promise.allSettled(times.map((t, i) => run(bucket, key, i + 1, t)));
      expect(results.filter((r) => r.status === 'rejected')).toEqual([]);
      await expectOneWholeVersion(bucket, key);
      expect(times.map(iso)).toContain((await bucket.stat(key)).metadata.stored_at);
    });

    it('moves the first-store time earlier for a re-store enqueued before it, and keeps it for one enqueued after', async () => {
      const bucket = buckets.get(backend)!;
      const key = 'sites/race/artifacts/alone.tar.gz';
      await run(bucket, key, 0, T0 + 5000);
      await run(bucket, key, 1, T0 + 1000);
      expect((await bucket.stat(key)).metadata.stored_at).toBe(iso(T0 + 1000));
      await run(bucket, key, 2, T0 + 9000);
      expect((await bucket.stat(key)).metadata.stored_at).toBe(iso(T0 + 1000));
      expect((await bucket.stat(key)).sha256).toBe(digests[2]);
    });
  });
});
