import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildProgram, type CliIo } from '../../src/cli/program.js';
import { StorageError } from '../../src/errors.js';
import { FsDriver } from '../../src/backends/fs.js';
import { Bucket } from '../../src/storage/bucket.js';
import { SessionClient } from '../../src/session/client.js';
import { sessionKey } from '../../src/session/ids.js';
import { Redis } from 'ioredis';
import { makeTree, run } from '../archive/corpus.js';
import { tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { inProcessWorker, type InProcessWorker } from '../harness/worker.js';

interface Run { code: number | null; out: Buffer; err: string }
const sha = (b: string | Buffer): string => createHash('sha256').update(b).digest('hex');

describe('stevedore session ls|cat|put|rm', () => {
  let redis: TestRedis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let w: InProcessWorker;
  let env: NodeJS.ProcessEnv;
  let root: string;
  let bucket: Bucket;
  const S = 'octo__repo__main';

  /** The program in this process (fast), with stdout captured as bytes and the bin's exit-code mapping. */
  const cli = async (...args: string[]): Promise<Run> => {
    const out: Buffer[] = [];
    let err = '';
    let code = 0;
    const stdout = new Writable({ write(chunk: Buffer, _enc, cb) { out.push(Buffer.from(chunk)); cb(); } });
    const program = buildProgram({ env, cwd: tmp.path, out: (s) => out.push(Buffer.from(s)), err: (s) => { err += s; }, isTTY: false, stdout } as CliIo, (c) => { code = c; }, { runWorker: () => Promise.reject(new Error('no worker in this test')) });
    program.exitOverride();
    program.configureOutput({ writeErr: (s) => { err += s; }, writeOut: (s) => out.push(Buffer.from(s)) });
    try {
      await program.parseAsync(['node', 'stevedore', ...args]);
    } catch (e) {
      err += `${(e as Error).message}\n`;
      code = e instanceof StorageError && e.code !== 'InvalidInput' ? 1 : 2;
    }
    return { code, out: Buffer.concat(out), err };
  };
  /** The real command, as a process: bytes through a real stdout, the bin's own exit codes. */
  const spawned = (...args: string[]): Promise<Run> => new Promise((resolve) => {
    const child = spawn(process.execPath, ['--import', 'tsx', 'src/bin/stevedore.ts', ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let err = '';
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => { err += b.toString(); });
    child.on('exit', (code) => resolve({ code, out: Buffer.concat(out), err }));
  });

  beforeAll(async () => {
    redis = await startRedis();
    tmp = await tempDir('stevedore-session-cli-');
    root = join(tmp.path, 'objects');
    const staging = join(tmp.path, 'staging');
    bucket = new Bucket(new FsDriver({ root }));
    w = await inProcessWorker(redis.url, new Map([['default', bucket]]), staging);
    env = { PATH: process.env.PATH, REDIS_URL: redis.url, STEVEDORE_QUEUE: w.queue, STEVEDORE_STAGING_DIR: staging, STEVEDORE_BACKENDS: `default=file://${root}`, LOG_LEVEL: 'silent' };
    const src = join(tmp.path, 'src');
    await mkdir(src);
    await makeTree(src);
    const archive = join(tmp.path, 'corpus.tgz');
    await run('tar', ['--format=gnu', '-czf', archive, '-C', src, '.']);
    await bucket.put(sessionKey(S), { path: archive });
  });
  afterAll(async () => {
    await w?.close();
    await redis?.stop();
    await tmp?.remove();
  });

  it('lists entries, as text and as JSON with file digests', async () => {
    const text = await cli('session', 'ls', S);
    expect(text.code).toBe(0);
    expect(text.out.toString()).toMatch(/^file\t0755\t19\t1975-06-01T12:00:00\.000Z\tbin\/run$/m);
    expect(text.out.toString()).toMatch(/^symlink\t0777\t0\t.*\tlink -> bin\/run$/m);
    const json = await cli('session', 'ls', S, '--json');
    expect(json.code).toBe(0);
    const listing = JSON.parse(json.out.toString()) as { verified: boolean; entries: Array<{ path: string; type: string; sha256?: string; mode: number }> };
    expect(listing.verified).toBe(true);
    expect(listing.entries.find((e) => e.path === 'README.md')).toMatchObject({ type: 'file', mode: 0o644, sha256: sha('# session\n') });
    expect(listing.entries.find((e) => e.path === 'sub')).toMatchObject({ type: 'directory' });
    expect(listing.entries.find((e) => e.path === 'sub')?.sha256).toBeUndefined();
  });

  it('cats a file byte for byte, following links inside the archive', async () => {
    const data = await spawned('session', 'cat', S, 'sub/deeper/data.bin');
    expect(data.code).toBe(0);
    expect(Buffer.compare(data.out, Buffer.from(Array.from({ length: 70_000 }, (_, i) => (i * 7) & 0xff)))).toBe(0);
    expect((await cli('session', 'cat', S, 'link')).out.toString()).toBe('#!/bin/sh\necho run\n');
    expect((await cli('session', 'cat', S, 'hard')).out.toString()).toBe('# session\n');
  });

  it('exits 1 with the code on stderr for a missing session or path or a rotten archive, 2 for a bad id', async () => {
    const noPath = await cli('session', 'cat', S, 'nope');
    expect([noPath.code, noPath.out.length]).toEqual([1, 0]);
    expect(noPath.err).toMatch(/^NotFound: /);
    const noSession = await cli('session', 'ls', 'octo__repo__absent');
    expect(noSession.code).toBe(1);
    expect(noSession.err).toMatch(/^NotFound: /);
    expect((await spawned('session', 'cat', 'bad/id', 'x')).code).toBe(2);
    expect((await cli('session', 'cat', S, '../x')).code).toBe(2);
    // Bit rot: the same size, one byte flipped, the recorded digest kept. Not a byte reaches stdout.
    const rotten = 'octo__repo__rotten';
    const good = await readFile(join(root, sessionKey(S)));
    await bucket.put(sessionKey(rotten), good);
    const flipped = Buffer.from(good);
    flipped[flipped.length - 12]! ^= 0x01;
    await writeFile(join(root, sessionKey(rotten)), flipped, { flag: 'r+' });
    const bad = await cli('session', 'cat', rotten, 'README.md');
    expect(bad.code).toBe(1);
    expect(bad.out.length).toBe(0);
    expect(bad.err).toMatch(/^(ChecksumMismatch|InvalidInput): /);
  });

  it('puts a file or text and removes a path through repack-session jobs', async () => {
    const file = join(tmp.path, 'notes.md');
    await writeFile(file, 'from a file\n');
    const put = await cli('session', 'put', S, 'docs/notes.md', file, '--wait');
    expect(put.code).toBe(0);
    expect(JSON.parse(put.out.toString())).toMatchObject({ key: sessionKey(S), missing: [] });
    expect(await readdir(join(tmp.path, 'staging', 'incoming'))).toEqual([]);
    expect((await cli('session', 'cat', S, 'docs/notes.md')).out.toString()).toBe('from a file\n');
    const text = await cli('session', 'put', S, 'run.sh', '--text', 'echo hi\n', '--mode', '755', '--wait');
    expect(text.code).toBe(0);
    const stale = await cli('session', 'put', S, 'run.sh', '--text', 'x', '--if-sha256', sha('not it'), '--wait');
    expect(stale.code).toBe(1);
    expect(stale.err).toMatch(/^PreconditionFailed: /);
    const rm = await cli('session', 'rm', S, 'bin', '--wait');
    expect(rm.code).toBe(0);
    const gone = await cli('session', 'rm', S, 'bin', '--wait');
    expect(JSON.parse(gone.out.toString())).toMatchObject({ missing: ['bin'] });
    const listing = JSON.parse((await cli('session', 'ls', S, '--json')).out.toString()) as { entries: Array<{ path: string; mode: number; sha256?: string }> };
    expect(listing.entries.find((e) => e.path === 'run.sh')).toMatchObject({ mode: 0o755, sha256: sha('echo hi\n') });
    expect(listing.entries.filter((e) => e.path.startsWith('bin'))).toEqual([]);
    // Without --wait: the job id, at once.
    const queued = await cli('session', 'rm', S, 'docs');
    expect(queued.code).toBe(0);
    expect(queued.out.toString()).toMatch(/^\d+\n$/);
    await w.client.result(queued.out.toString().trim(), { timeoutMs: 20_000 });
  });

  it('the producer session client reads and edits the same way', async () => {
    const sc = new SessionClient(w.client, new Map([['default', bucket]]));
    const s = 'octo__repo__client';
    const result = await sc.put(s, 'a/b.txt', { text: 'b' }, { wait: true, timeoutMs: 20_000 });
    expect(result).toMatchObject({ key: sessionKey(s), entries: 2, missing: [] });
    const listing = await sc.ls(s, { digests: true });
    expect(listing.entries.map((e) => [e.path, e.type, e.sha256])).toEqual([['a', 'directory', undefined], ['a/b.txt', 'file', sha('b')]]);
    const chunks: Buffer[] = [];
    await sc.cat(s, 'a/b.txt', new Writable({ write(c: Buffer, _e, cb) { chunks.push(Buffer.from(c)); cb(); } }));
    expect(Buffer.concat(chunks).toString()).toBe('b');
    await expect(sc.rm(s, 'a/b.txt', { wait: true, ifSha256: sha('not b'), timeoutMs: 20_000 })).rejects.toMatchObject({ code: 'PreconditionFailed' });
    expect(await sc.rm(s, 'a', { wait: true, timeoutMs: 20_000 })).toMatchObject({ entries: 0, missing: [] });
  });

  it('fails a job with a malicious path or session id InvalidInput before any I/O: no lock taken, nothing written', async () => {
    const redisClient = new Redis(redis.url);
    try {
      for (const payload of [
        { session: 'octo__repo__evil', ops: [{ op: 'put', path: '../../etc/x', text: 'x' }] },
        { session: 'octo__repo__evil', ops: [{ op: 'delete', path: '/etc' }] },
        { session: 'octo/../repo__x__y', ops: [] },
        { session: 'octo__repo__evil', ops: [{ op: 'put', path: 'a', source: { path: '../outside' } }] },
      ]) {
        await expect(w.client.run('repack-session', payload as never, { timeoutMs: 20_000 })).rejects.toMatchObject({ code: 'InvalidInput' });
      }
      expect(await redisClient.keys('*:lock:*')).toEqual([]);
      await expect(bucket.stat(sessionKey('octo__repo__evil'))).rejects.toMatchObject({ code: 'NotFound' });
    } finally {
      await redisClient.quit();
    }
  });
});
