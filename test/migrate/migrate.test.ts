import { readdir, stat, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FsDriver } from '../../src/backends/fs.js';
import { MemoryDriver } from '../../src/backends/memory.js';
import { StorageError } from '../../src/errors.js';
import { S3Driver } from '../../src/backends/s3.js';
import { STAGING_RECORDS } from '../../src/staging.js';
import { Bucket } from '../../src/storage/bucket.js';
import type { Driver } from '../../src/storage/driver.js';
import { overrideDriver } from '../fixtures/override-driver.js';
import { tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { startS3rver, type S3rver } from '../harness/s3.js';
import { inProcessWorker, type InProcessWorker } from '../harness/worker.js';
import { contents, flipByte, mixedTree, putTree, sha, writeLegacyTree } from './fixtures.js';

// migrate and verify end to end through Redis, with an in-process worker cutting chunks of 4 keys
// (2 in flight), against a real filesystem and s3rver.

describe('migrate: filesystem and s3rver', () => {
  let redis: TestRedis;
  let s3: S3rver;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  const buckets = new Map<string, Bucket>();
  /** Calls per backend and method, so a test can say a re-run read nothing. */
  const calls = new Map<string, number>();
  let w: InProcessWorker;
  const tree = mixedTree(21);

  const counted = <D extends Driver>(name: string, d: D): D => overrideDriver(d, Object.fromEntries((['get', 'stat', 'put', 'copy', 'delete'] as const).map((m) => [m, (...a: unknown[]) => {
    calls.set(`${name}.${m}`, (calls.get(`${name}.${m}`) ?? 0) + 1);
    return (d[m] as (...x: unknown[]) => unknown).apply(d, a);
  }])) as Partial<Driver>);
  const count = (k: string) => calls.get(k) ?? 0;

  const add = async (name: string, d: Driver) => buckets.set(name, new Bucket(counted(name, d), { name }));
  beforeAll(async () => {
    [redis, s3, tmp] = await Promise.all([startRedis(), startS3rver(), tempDir('stevedore-migrate-')]);
    await writeLegacyTree(join(tmp.path, 'legacy'), tree);
    await add('legacy', new FsDriver({ root: join(tmp.path, 'legacy') }));
    await add('fs', new FsDriver({ root: join(tmp.path, 'fs') }));
    for (const n of ['s3', 's3b']) await add(n, new S3Driver({ ...s3.driverOptions(await s3.bucket()), conditionalWrites: false }));
    await add('mem', new MemoryDriver());
    await add('mem-out', new MemoryDriver());
    w = await inProcessWorker(redis.url, buckets, join(tmp.path, 'staging'), { concurrency: 4, fanout: { chunkKeys: 4, window: 2, lanes: 3 } });
  });
  afterAll(async () => {
    await w?.close();
    await s3?.stop();
    await redis?.stop();
    await tmp?.remove();
  });

  it('copies a legacy tree (no sidecars) to S3 with awkward keys, each digest computed on the way (one read of each source) and counted missingDigest', async () => {
    calls.clear();
    const r = await w.client.run('migrate', { from: 'legacy', to: 's3' });
    // Objects within the S3 driver's single-PutObject size are hashed as the upload buffers them: no first read.
    expect(count('legacy.get')).toBe(tree.size);
    expect(r).toMatchObject({ scanned: tree.size, copied: tree.size, skipped: 0, failed: 0, missingDigest: tree.size, deleted: 0, failures: [] });
    expect(r.bytes).toBe([...tree.values()].reduce((n, b) => n + b.length, 0));
    const got = await contents(buckets.get('s3')!);
    expect([...got.keys()].sort()).toEqual([...tree.keys()].sort());
    for (const [k, b] of tree) expect(got.get(k), k).toMatchObject({ sha: sha(b), recorded: sha(b) });
  });

  it('re-runs on a complete destination as a listing: no object read, HEADed or written on either side', async () => {
    calls.clear();
    const r = await w.client.run('migrate', { from: 'legacy', to: 's3' });
    expect(r).toMatchObject({ scanned: tree.size, copied: 0, skipped: tree.size, failed: 0, missingDigest: 0 });
    for (const m of ['get', 'stat', 'put', 'copy', 'delete']) {
      expect(count(`legacy.${m}`), `legacy.${m}`).toBe(0);
      expect(count(`s3.${m}`), `s3.${m}`).toBe(0);
    }
  });

  it('a tree with recorded digests to S3 keeps content type and metadata; a differing destination object is copied again, a rotted one found only by recheck', async () => {
    await putTree(buckets.get('fs')!, tree, 'typed/');
    expect(await w.client.run('migrate', { from: 'fs', to: 's3b', prefix: 'typed/' })).toMatchObject({ copied: tree.size, missingDigest: 0, failed: 0 });
    const first = await contents(buckets.get('s3b')!, 'typed/');
    for (const [k, b] of tree) expect(first.get(`typed/${k}`), k).toMatchObject({ sha: sha(b), recorded: sha(b), type: 'application/x-test', meta: { origin: 'fixture' } });

    // Another digest at the destination: re-copied.
    await buckets.get('s3b')!.put('typed/a.txt', Buffer.from('something else'));
    // Rot at the destination: bytes changed, recorded digest kept (s3rver's data file flipped).
    await flipByte(join(s3.dataDir, (buckets.get('s3b')!.driver as unknown as { bucket: string }).bucket ?? '', 'typed', 'tree', '2', 'obj-0009.bin._S3rver_object'), 5).catch(async () => {
      throw new Error('s3rver data file layout changed');
    });
    const plain = await w.client.run('migrate', { from: 'fs', to: 's3b', prefix: 'typed/' });
    expect(plain).toMatchObject({ copied: 1, skipped: tree.size - 1, failed: 0 });
    expect((await contents(buckets.get('s3b')!, 'typed/a.txt')).get('typed/a.txt')!.sha).toBe(sha(tree.get('a.txt')!));
    // The plain re-run trusted the recorded digests: the rotted object is still there, unread.
    await expect(contents(buckets.get('s3b')!, 'typed/tree/2/obj-0009.bin')).rejects.toMatchObject({ code: 'ChecksumMismatch' });

    const rechecked = await w.client.run('migrate', { from: 'fs', to: 's3b', prefix: 'typed/', recheck: true });
    expect(rechecked).toMatchObject({ copied: 1, skipped: tree.size - 1, failed: 0 });
    const after = await contents(buckets.get('s3b')!, 'typed/');
    expect(after.get('typed/tree/2/obj-0009.bin')!.sha).toBe(sha(tree.get('tree/2/obj-0009.bin')!));
  });

  it('dryRun reports what it would copy and delete and writes nothing', async () => {
    calls.clear();
    const before = await readdir(join(tmp.path, 'staging'), { recursive: true }).catch(() => []);
    const r = await w.client.run('migrate', { from: 'legacy', to: 'fs', prefix: 'tree/', dryRun: true, deleteSource: true });
    const n = [...tree.keys()].filter((k) => k.startsWith('tree/')).length;
    expect(r).toMatchObject({ scanned: n, copied: n, skipped: 0, deleted: n, failed: 0 });
    expect(count('fs.put') + count('fs.copy') + count('fs.delete') + count('legacy.put') + count('legacy.delete')).toBe(0);
    const listed: string[] = [];
    for await (const o of buckets.get('fs')!.list('tree/')) listed.push(o.key);
    expect(listed).toEqual([]);
    expect(await readdir(join(tmp.path, 'staging'), { recursive: true }).catch(() => [])).toEqual(before);
  });

  it('deleteSource deletes only verified copies: a rotted source object and one changed after listing stay, and are reported; the rest completes', async () => {
    const src = buckets.get('fs')!;
    const part = new Map([...tree].filter(([k]) => k.startsWith('tree/')));
    await putTree(src, part, 'del/');
    const rotten = 'del/tree/1/obj-0008.bin';
    const changed = 'del/tree/3/obj-0010.bin';
    await flipByte(join(tmp.path, 'fs', rotten), 3);
    // The source changes after the migration copied it, just before its delete.
    const srcDriver = src.driver;
    const watched = new Bucket(overrideDriver(srcDriver, {
      delete: async (key, opts) => {
        if (key === changed) await writeFile(join(tmp.path, 'fs', changed), Buffer.from('rewritten'));
        return srcDriver.delete(key, opts);
      },
    }), { name: 'fs' });
    buckets.set('fs-watched', watched);
    const r = await w.client.run('migrate', { from: 'fs-watched', to: 's3', prefix: 'del/', deleteSource: true });
    expect(r.failed).toBe(2);
    expect(r.failures.map((f) => [f.key, f.code]).sort()).toEqual([[changed, 'PreconditionFailed'], [rotten, 'ChecksumMismatch']].sort());
    expect(r.deleted).toBe(part.size - 2);
    const left: string[] = [];
    for await (const o of src.list('del/')) left.push(o.key);
    expect(left.sort()).toEqual([changed, rotten].sort());
    // Nothing rotten reached the destination.
    await expect(buckets.get('s3')!.stat(rotten)).rejects.toMatchObject({ code: 'NotFound' });
  });

  it('deleteSource on a re-run deletes skipped objects only after reading the destination back: a rotted destination keeps its source', async () => {
    const src = buckets.get('fs')!;
    const part = new Map([...tree].filter(([k]) => k.startsWith('unicode/') || k.startsWith('deep/')));
    await putTree(src, part, 'skipdel/');
    expect(await w.client.run('migrate', { from: 'fs', to: 's3b', prefix: 'skipdel/' })).toMatchObject({ copied: part.size, deleted: 0 });
    const name = (buckets.get('s3b')!.driver as unknown as { bucket: string }).bucket;
    await flipByte(join(s3.dataDir, name, 'skipdel', 'unicode', 'emoji-🚚.bin._S3rver_object'), 4);
    const r = await w.client.run('migrate', { from: 'fs', to: 's3b', prefix: 'skipdel/', deleteSource: true });
    expect(r).toMatchObject({ skipped: part.size, copied: 0, deleted: part.size - 1, failed: 1 });
    expect(r.failures).toEqual([expect.objectContaining({ key: 'skipdel/unicode/emoji-🚚.bin', code: 'ChecksumMismatch' })]);
    const left: string[] = [];
    for await (const o of src.list('skipdel/')) left.push(o.key);
    expect(left).toEqual(['skipdel/unicode/emoji-🚚.bin']);
  });

  it('verify finds flipped bytes on the filesystem and counts objects without a digest as missingDigest, never ok', async () => {
    const fs = buckets.get('fs')!;
    await putTree(fs, tree, 'v/');
    await flipByte(join(tmp.path, 'fs', 'v', 'deep/er/and/deeper/still/leaf.bin'), 0);
    const r = await w.client.run('verify', { backend: 'fs', prefix: 'v/' });
    const nonEmpty = [...tree.values()].filter((b) => b.length > 0).length;
    expect(r).toMatchObject({ scanned: tree.size, mismatched: 1, missingDigest: 0, ok: tree.size - 1 });
    expect(r.failures).toEqual([expect.objectContaining({ key: 'v/deep/er/and/deeper/still/leaf.bin', code: 'ChecksumMismatch' })]);
    expect(nonEmpty).toBeGreaterThan(0);
    const legacy = await w.client.run('verify', { backend: 'legacy' });
    expect(legacy).toMatchObject({ scanned: tree.size, ok: 0, missingDigest: tree.size, mismatched: 0 });
  });

  it('a permanently failing object is reported while the rest completes; past 50% failed after 1,000 objects the migration aborts', async () => {
    const mem = buckets.get('mem')!;
    for (let i = 0; i < 1200; i++) await mem.put(`many/${String(i).padStart(5, '0')}`, Buffer.from(`object ${i}`));
    const inner = mem.driver;
    const denying = (deny: (key: string) => boolean) => new Bucket(overrideDriver(inner, {
      get: async (key, range, signal) => {
        if (deny(key)) throw new StorageError('PermissionDenied', 'denied by the test', { op: 'get', key });
        return inner.get(key, range, signal);
      },
    }), { name: 'mem' });
    buckets.set('mem-one-bad', denying((k) => k === 'many/00007'));
    const some = await w.client.run('migrate', { from: 'mem-one-bad', to: 'mem-out', prefix: 'many/000' });
    expect(some).toMatchObject({ scanned: 100, copied: 99, failed: 1, failures: [{ key: 'many/00007', code: 'PermissionDenied', message: expect.stringContaining('denied by the test') }] });

    buckets.set('mem-all-bad', denying((k) => k >= 'many/00100'));
    // Chunks of 100 here: the threshold needs a thousand objects.
    const big = await inProcessWorker(redis.url, buckets, join(tmp.path, 'staging'), { concurrency: 4, fanout: { chunkKeys: 100, window: 4, lanes: 8 } });
    const err = await big.client.run('migrate', { from: 'mem-all-bad', to: 'mem-out', prefix: 'many/' }).catch((e: unknown) => e as Error & { code?: string });
    expect(err).toBeInstanceOf(Error);
    expect((err as Error & { code?: string }).code).toBe('PermissionDenied');
    expect((err as Error).message).toMatch(/aborted: \d+ of \d+ objects failed/);
    // Its chunks not started yet were removed with it (those already running finish on their own).
    expect(await big.client.queue.getJobCounts('waiting', 'delayed')).toEqual({ waiting: 0, delayed: 0 });
    for (let i = 0; i < 100 && ((await big.client.queue.getJobCounts('active')).active ?? 0) > 0; i++) await new Promise((r) => setTimeout(r, 50));
    await big.close();
  }, 60_000);

  it('cuts chunks by bytes as well as by keys: a chunk ends at the object that reaches chunkBytes, so large objects spread over chunks', async () => {
    const src = new Bucket(new MemoryDriver(), { name: 'by-bytes' });
    // Three of 600 bytes, then ten of 10: with chunks of 1000 bytes (or 100 keys) the first ends at
    // the second object (1200 bytes), the second takes the rest (700 bytes, 11 keys).
    for (let i = 0; i < 3; i++) await src.put(`b/${i}`, Buffer.alloc(600, i));
    for (let i = 0; i < 10; i++) await src.put(`s/${i}`, Buffer.alloc(10, i));
    buckets.set('by-bytes', src);
    buckets.set('by-bytes-out', new Bucket(new MemoryDriver(), { name: 'by-bytes-out' }));
    const cut = await inProcessWorker(redis.url, buckets, join(tmp.path, 'staging'), { concurrency: 4, fanout: { chunkKeys: 100, chunkBytes: 1000, window: 4, lanes: 4 } });
    try {
      let id = '';
      const r = await cut.client.run('migrate', { from: 'by-bytes', to: 'by-bytes-out' }, { onAdded: (added) => { id = added; } });
      expect(r).toMatchObject({ scanned: 13, copied: 13, failed: 0 });
      // Each chunk leaves its summary in the parent: its count and last key, by chunk number.
      const chunks = Object.entries(await (await cut.client.queue.getJob(id))!.getChildrenValues<{ scanned: number; last: string }>())
        .map(([k, v]) => [Number(/-(\d+)$/.exec(k)![1]), v.scanned, v.last] as const).sort((a, b) => a[0] - b[0]);
      expect(chunks).toEqual([[0, 2, 'b/1'], [1, 11, 's/9']]);
    } finally {
      await cut.close();
    }
  });

  it('a failing run aborts as its chunks finish: once the tally crosses the threshold, chunks not started never run, and the parent fails with the dominant code', async () => {
    const src = new MemoryDriver();
    const seed = new Bucket(src, { name: 'ab' });
    const n = 60;
    for (let i = 0; i < n; i++) await seed.put(`ab/${String(i).padStart(2, '0')}`, Buffer.from(`object ${i}`));
    let asleep!: () => void;
    const parentAsleep = new Promise<void>((r) => { asleep = r; });
    const tried = new Set<string>();
    buckets.set('ab-src', new Bucket(overrideDriver(src, {
      // Every object fails for good, and none before the parent has listed everything and sleeps
      // in waiting-children: the case the parent's own checks cannot see.
      get: async (key) => {
        await parentAsleep;
        tried.add(key);
        throw new StorageError('PermissionDenied', 'denied by the test', { op: 'get', key });
      },
    }), { name: 'ab-src' }));
    buckets.set('ab-out', new Bucket(new MemoryDriver(), { name: 'ab-out' }));
    // Chunks of 5 keys, all 12 added at once, 2 jobs at a time, the threshold after 10 objects.
    const ab = await inProcessWorker(redis.url, buckets, join(tmp.path, 'staging'), { concurrency: 2, fanout: { chunkKeys: 5, window: 100, lanes: 5, abortAfter: 10 } });
    const ran = new Set<string>();
    ab.worker.on('active', (job) => { if (job.name === 'migrate-chunk') ran.add(String(job.id)); });
    try {
      await ab.client.ready();
      const id = await ab.client.migrate({ from: 'ab-src', to: 'ab-out' });
      const outcome = ab.client.result(id).then(() => undefined, (e: unknown) => e as Error & { code?: string });
      const parent = (await ab.client.queue.getJob(id))!;
      for (let i = 0; i < 400 && (await parent.getState()) !== 'waiting-children'; i++) await new Promise((r) => setTimeout(r, 25));
      expect(await parent.getState()).toBe('waiting-children');
      asleep();
      const err = await outcome;
      expect(err?.code).toBe('PermissionDenied');
      expect(err?.message).toMatch(/^PermissionDenied: aborted: (\d+) of \1 objects failed \(more than 50% after 10\)/);
      // The two chunks that started first cross it (10 objects); a third may have taken the slot
      // the first freed. No chunk started after the crossing: of 12, at most 3 ever ran.
      expect(ran.size).toBeGreaterThanOrEqual(2);
      expect(ran.size).toBeLessThanOrEqual(3);
      expect(tried.size).toBe(ran.size * 5);
      expect(await ab.client.queue.getJobCounts('waiting', 'delayed', 'active')).toEqual({ waiting: 0, delayed: 0, active: 0 });
    } finally {
      await ab.close();
    }
  });

  it('the staging sweep removes records not written for 30 days and keeps those of a migration running now, which its re-run still trusts', async () => {
    const records = join(tmp.path, 'staging', STAGING_RECORDS);
    const files = async (dir = records) => (await readdir(dir, { recursive: true, withFileTypes: true }).catch(() => [])).filter((e) => e.isFile()).map((e) => join(e.parentPath, e.name));
    const dirs = async () => new Set(await readdir(records).catch(() => [] as string[]));
    const src = new MemoryDriver();
    const out = new MemoryDriver();
    let release!: () => void;
    const gate = new Promise<void>((r) => { release = r; });
    let held!: () => void;
    const blocked = new Promise<void>((r) => { held = r; });
    let gated = false;
    buckets.set('rec', new Bucket(src, { name: 'rec' }));
    buckets.set('rec-elsewhere', new Bucket(new MemoryDriver(), { name: 'rec-elsewhere' }));
    buckets.set('rec-out', new Bucket(overrideDriver(out, {
      put: async (key, body, opts) => {
        if (gated && key === 'k/1') {
          held();
          await gate;
        }
        return out.put(key, body, opts);
      },
    }), { name: 'rec-out' }));
    const rec = buckets.get('rec')!;
    for (let i = 0; i < 4; i++) await rec.put(`k/${i}`, Buffer.from(`record test ${i}`));
    const d0 = await dirs();
    expect(await w.client.run('migrate', { from: 'rec', to: 'rec-elsewhere' })).toMatchObject({ copied: 4 });
    const d1 = await dirs();
    expect(await w.client.run('migrate', { from: 'rec', to: 'rec-out' })).toMatchObject({ copied: 4 });
    const elsewhere = join(records, [...d1].find((d) => !d0.has(d))!);
    const here = join(records, [...await dirs()].find((d) => !d1.has(d))!);
    // Both pairs' records (one chunk of 4 keys each) last written 31 days ago.
    expect((await files(elsewhere)).length).toBe(1);
    expect((await files(here)).length).toBe(1);
    const old = new Date(Date.now() - 31 * 86_400_000);
    for (const f of await files()) await utimes(f, old, old);

    // A re-run, held inside its chunk's copy of a changed object: that chunk is live.
    await rec.put('k/1', Buffer.from('changed'));
    gated = true;
    const run = w.client.run('migrate', { from: 'rec', to: 'rec-out' });
    await blocked;
    expect(await w.staging.sweep()).toBeGreaterThanOrEqual(1);
    expect(await files(elsewhere)).toEqual([]);
    // The live chunk wrote its record as it started.
    const live = await files(here);
    expect(live).toHaveLength(1);
    expect((await stat(live[0]!)).mtimeMs).toBeGreaterThan(Date.now() - 60_000);
    release();
    expect(await run).toMatchObject({ scanned: 4, copied: 1, skipped: 3, failed: 0 });

    // The records still spare the next run every read and HEAD.
    calls.clear();
    buckets.set('rec', new Bucket(counted('rec', src), { name: 'rec' }));
    buckets.set('rec-out', new Bucket(counted('rec-out', out), { name: 'rec-out' }));
    expect(await w.client.run('migrate', { from: 'rec', to: 'rec-out' })).toMatchObject({ scanned: 4, skipped: 4, copied: 0 });
    for (const m of ['get', 'stat', 'put', 'copy']) expect(count(`rec.${m}`) + count(`rec-out.${m}`), m).toBe(0);
  });

  it('verify finds flipped bytes in s3rver\'s data files', async () => {
    const b = buckets.get('s3')!;
    const name = (b.driver as unknown as { bucket: string }).bucket;
    await flipByte(join(s3.dataDir, name, 'unicode', 'emoji-🚚.bin._S3rver_object'), 2);
    const r = await w.client.run('verify', { backend: 's3', prefix: 'unicode/' });
    expect(r).toMatchObject({ scanned: 2, ok: 1, mismatched: 1 });
    expect(r.failures[0]).toMatchObject({ key: 'unicode/emoji-🚚.bin', code: 'ChecksumMismatch' });
  });
});
