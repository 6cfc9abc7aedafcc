import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FsDriver } from '../src/backends/fs.js';
import { Bucket } from '../src/storage/bucket.js';
import { sha } from './conformance/suite.js';
import { runCli, type CliRun } from './harness/cli.js';
import { freePort, tempDir } from './harness/process.js';
import { startRedis, type TestRedis } from './harness/redis.js';
import { inProcessWorker, type InProcessWorker } from './harness/worker.js';

describe('the stevedore command', () => {
  let redis: TestRedis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let w: InProcessWorker;
  let env: NodeJS.ProcessEnv;

  const cliIn = runCli;
  const cli = (...args: string[]): Promise<CliRun> => cliIn(env, ...args);

  beforeAll(async () => {
    redis = await startRedis();
    tmp = await tempDir();
    const root = join(tmp.path, 'objects');
    const staging = join(tmp.path, 'staging');
    w = await inProcessWorker(redis.url, new Map([['default', new Bucket(new FsDriver({ root }))]]), staging);
    env = { PATH: process.env.PATH, REDIS_URL: redis.url, STEVEDORE_QUEUE: w.queue, STEVEDORE_STAGING_DIR: staging, STEVEDORE_BACKENDS: `default=file://${root}`, LOG_LEVEL: 'silent' };
  });
  afterAll(async () => {
    await w?.close();
    await redis?.stop();
    await tmp?.remove();
  });

  it('stores a file and prints the result with --wait, leaving no staged copy behind', async () => {
    const file = join(tmp.path, 'build.tar.gz');
    await writeFile(file, 'artifact bytes');
    const run = await cli('store', file, '--site', 'web', '--build', '42', '--wait');
    expect(run.code).toBe(0);
    expect(JSON.parse(run.out)).toEqual({ backend: 'default', key: 'sites/web/artifacts/42.tar.gz', size: 14, sha256: sha(Buffer.from('artifact bytes')) });
    expect(await readdir(join(tmp.path, 'staging', 'incoming'))).toEqual([]);
  });

  it('logs, fetches and lists versions', async () => {
    const logged = await cli('log', '--site', 'web', '--build', '42', '--action', 'deploy', '--status', 'ok', '--metadata', '{"by":"cli"}', '--wait');
    expect(logged.code).toBe(0);
    expect(JSON.parse(logged.out).key).toMatch(/^sites\/web\/logs\/\d{4}-.*Z-42\.json$/);
    const fetched = await cli('fetch', 'sites/web/artifacts/42.tar.gz', 'back/42.tgz', '--wait');
    expect(fetched.code).toBe(0);
    expect(await readFile(join(tmp.path, 'staging', 'back/42.tgz'), 'utf8')).toBe('artifact bytes');
    const listed = await cli('versions', 'web');
    expect(listed.code).toBe(0);
    expect(listed.out).toMatch(/^42\t\S+\t14 bytes\t1 log entries\n$/);
  });

  it('keeps the staged copy when --wait runs out before the job does: the job still needs it', async () => {
    const file = join(tmp.path, 'slow.tar.gz');
    await writeFile(file, 'waiting bytes');
    // A queue no worker serves: the job waits, the CLI's wait runs out.
    const unserved = { ...env, STEVEDORE_QUEUE: `${w.queue}-unserved` };
    const before = await readdir(join(tmp.path, 'staging', 'incoming')).catch(() => [] as string[]);
    const run = await cliIn(unserved, 'store', file, '--key', 'slow/1', '--wait', '--timeout', '1');
    expect(run.code).toBe(1);
    expect(run.err).toMatch(/did not finish within 1000 ms; it may still be running/);
    const after = await readdir(join(tmp.path, 'staging', 'incoming'));
    const added = after.filter((f) => !before.includes(f));
    expect(added).toHaveLength(1);
    expect(await readFile(join(tmp.path, 'staging', 'incoming', added[0]!), 'utf8')).toBe('waiting bytes');
  });

  it('cancels a waiting job from another process, and exits 1 for one that does not exist', async () => {
    const unserved = { ...env, STEVEDORE_QUEUE: `${w.queue}-cancel` };
    const queued = await cliIn(unserved, 'log', '--site', 'web', '--build', '44', '--action', 'a', '--status', 's');
    const id = queued.out.trim();
    const cancelled = await cliIn(unserved, 'cancel', id);
    expect(cancelled).toMatchObject({ code: 0, out: `${id}\tremoved\n` });
    const again = await cliIn(unserved, 'cancel', id);
    expect(again).toMatchObject({ code: 1, out: `${id}\tnot-found\n` });
  });

  it('prints the job id without --wait', async () => {
    const run = await cli('log', '--site', 'web', '--build', '43', '--action', 'a', '--status', 's');
    expect(run.code).toBe(0);
    expect(run.out).toMatch(/^\d+\n$/);
  });

  it('exits 2 with the reason on invalid input, and 1 when the job fails', async () => {
    const file = join(tmp.path, 'x');
    await writeFile(file, 'x');
    const bad = await cli('store', file, '--key', 'a/../b', '--wait');
    expect(bad.code).toBe(2);
    expect(bad.err).toMatch(/^InvalidInput: key: /);
    const missing = await cli('fetch', 'no/such/key', 'dest', '--wait');
    expect(missing.code).toBe(1);
    expect(missing.err).toMatch(/^NotFound: /);
    const usage = await cli('store', file);
    expect(usage.code).toBe(2);
    expect(usage.err).toMatch(/--key, or --site and --build/);
  });

  it('exits 1 naming the Redis it tried, password hidden, when no Redis answers, and keeps no staged copy', async () => {
    const port = await freePort();
    const down = { ...env, REDIS_URL: `redis://:hunter2@127.0.0.1:${port}` };
    const file = join(tmp.path, 'unsent.tar.gz');
    await writeFile(file, 'never enqueued');
    const incoming = () => readdir(join(tmp.path, 'staging', 'incoming')).catch(() => [] as string[]);
    const before = await incoming();
    const started = Date.now();
    const run = await cliIn(down, 'store', file, '--key', 'unsent/1', '--wait');
    expect(run.code).toBe(1);
    expect(run.err).toBe(`Transient: Redis at redis://:***@127.0.0.1:${port} is unreachable: no answer within 5000 ms (connect ECONNREFUSED 127.0.0.1:${port})\n`);
    // Not a hang: the 5 s wait plus a (loaded) start of node and tsx.
    expect(Date.now() - started).toBeLessThan(25_000);
    // The job was never enqueued: nothing will ever read the staged copy.
    expect(await incoming()).toEqual(before);
    const plain = await cliIn(down, 'log', '--site', 'web', '--build', '44', '--action', 'a', '--status', 's');
    expect(plain.code).toBe(1);
    expect(plain.err).toMatch(/^Transient: Redis at redis:\/\/:\*\*\*@127\.0\.0\.1:\d+ is unreachable/);
    expect(plain.out).toBe('');
  });
});
