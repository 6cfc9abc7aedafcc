import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FsDriver } from '../../src/backends/fs.js';
import { countersBar } from '../../src/cli/common.js';
import { Bucket } from '../../src/storage/bucket.js';
import { runCli, type CliRun } from '../harness/cli.js';
import { tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { inProcessWorker, type InProcessWorker } from '../harness/worker.js';
import { flipByte, mixedTree, writeLegacyTree } from './fixtures.js';

describe('stevedore migrate and verify', () => {
  let redis: TestRedis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let w: InProcessWorker;
  let env: NodeJS.ProcessEnv;
  const tree = mixedTree(12, 9);

  const cli = (...args: string[]): Promise<CliRun> => runCli(env, ...args);

  beforeAll(async () => {
    [redis, tmp] = await Promise.all([startRedis(), tempDir('stevedore-migrate-cli-')]);
    const legacy = join(tmp.path, 'legacy');
    const out = join(tmp.path, 'out');
    await writeLegacyTree(legacy, tree);
    const buckets = new Map([['legacy', new Bucket(new FsDriver({ root: legacy }), { name: 'legacy' })], ['out', new Bucket(new FsDriver({ root: out }), { name: 'out' })]]);
    w = await inProcessWorker(redis.url, buckets, join(tmp.path, 'staging'), { fanout: { chunkKeys: 5 } });
    env = { PATH: process.env.PATH, REDIS_URL: redis.url, STEVEDORE_QUEUE: w.queue, STEVEDORE_STAGING_DIR: join(tmp.path, 'staging'), STEVEDORE_BACKENDS: `legacy=file://${legacy},out=file://${out}`, LOG_LEVEL: 'silent' };
  });
  afterAll(async () => {
    await w?.close();
    await redis?.stop();
    await tmp?.remove();
  });

  it('migrate --wait prints the summed result; verify exits 0 on good copies and 1 once a byte flipped', async () => {
    const dry = await cli('migrate', '--from', 'legacy', '--to', 'out', '--dry-run', '--wait');
    expect(dry.code).toBe(0);
    expect(JSON.parse(dry.out)).toMatchObject({ scanned: tree.size, copied: tree.size, skipped: 0 });
    const m = await cli('migrate', '--from', 'legacy', '--to', 'out', '--prefix', 'unicode/', '--wait');
    expect(m.code).toBe(0);
    expect(JSON.parse(m.out)).toMatchObject({ scanned: 2, copied: 2, missingDigest: 2, failed: 0 });
    const all = await cli('migrate', '--from', 'legacy', '--to', 'out', '--wait');
    expect(JSON.parse(all.out)).toMatchObject({ scanned: tree.size, copied: tree.size - 2, skipped: 2 });

    const good = await cli('verify', '--backend', 'out', '--wait');
    expect(good.code).toBe(0);
    expect(JSON.parse(good.out)).toMatchObject({ scanned: tree.size, ok: tree.size, mismatched: 0 });
    await flipByte(join(tmp.path, 'out', 'a.txt'), 1);
    const bad = await cli('verify', '--backend', 'out', '--wait');
    expect(bad.code).toBe(1);
    expect(JSON.parse(bad.out)).toMatchObject({ mismatched: 1, failures: [{ key: 'a.txt', code: 'ChecksumMismatch' }] });
    // Objects without a digest are not a mismatch: exit 0, counted.
    const legacy = await cli('verify', '--backend', 'legacy', '--wait');
    expect(legacy.code).toBe(0);
    expect(JSON.parse(legacy.out)).toMatchObject({ ok: 0, missingDigest: tree.size });
  }, 90_000);

  it('draws a migration\'s progress as objects done of those listed, with its counters', () => {
    expect(countersBar({ scanned: 50, copied: 40, skipped: 10, failed: 0, bytes: 2 * 1048576, listed: 100 }, 10)).toBe('[#####.....] 50/100+ copied 40 skipped 10 failed 0 2.0 MiB');
  });
});
