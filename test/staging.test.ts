import { mkdir, readdir, rename, symlink, utimes, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { ErrorCode, StorageError, classifyCommon } from '../src/errors.js';
import { STAGING_INCOMING, STAGING_RECORDS, STAGING_TMP, Staging } from '../src/staging.js';
import { tempDir } from './harness/process.js';

const codeOf = (p: Promise<unknown>) => p.then(() => 'resolved', (e: unknown) => (e as StorageError).code);

describe('the staging area', () => {
  let dir: Awaited<ReturnType<typeof tempDir>>;
  let staging: Staging;
  let outside: string;
  beforeEach(async () => {
    dir = await tempDir();
    outside = join(dir.path, 'outside');
    await mkdir(outside);
    await mkdir(join(dir.path, 'staging'));
    staging = new Staging(join(dir.path, 'staging'));
  });
  afterEach(() => dir.remove());

  it.each(['/etc/passwd', '../outside/x', 'a/../../outside/x', 'a\\..\\..\\x', '', 'nul\0', '.'])('refuses %j as a staging path', async (rel) => {
    expect(await codeOf(staging.resolve(rel))).toBe(ErrorCode.InvalidInput);
  });

  it('refuses paths that lead outside through a symlinked folder, even below missing folders', async () => {
    await symlink(outside, join(dir.path, 'staging', 'link'));
    expect(await codeOf(staging.resolve('link/x'))).toBe(ErrorCode.InvalidInput);
    expect(await codeOf(staging.resolve('link/deeper/still/x'))).toBe(ErrorCode.InvalidInput);
    expect(await readdir(outside)).toEqual([]);
  });

  it('reads only regular files as sources: a symlink to a file outside is refused', async () => {
    await writeFile(join(outside, 'secret'), 's');
    await symlink(join(outside, 'secret'), join(dir.path, 'staging', 'innocent'));
    expect(await codeOf(staging.source('innocent'))).toBe(ErrorCode.InvalidInput);
    expect(await codeOf(staging.source('missing'))).toBe(ErrorCode.NotFound);
    await writeFile(join(dir.path, 'staging', 'ok'), 'x');
    expect(await staging.source('ok')).toBe(join(dir.path, 'staging', 'ok'));
  });

  it('finds a staged file that becomes visible only after the lookup began (an NFS negative cache)', async () => {
    const started = Date.now();
    const found = staging.sourceFile('late.bin');
    await new Promise((r) => setTimeout(r, 300));
    await writeFile(join(dir.path, 'tmp-late'), 'late bytes');
    await rename(join(dir.path, 'tmp-late'), join(dir.path, 'staging', 'late.bin'));
    expect(await found).toEqual({ path: join(dir.path, 'staging', 'late.bin'), size: 10 });
    expect(Date.now() - started).toBeGreaterThanOrEqual(300);
  });

  it('fails NotFound once the bounded wait is over', async () => {
    const quick = new Staging(join(dir.path, 'staging'), { sourceWaitMs: 300 });
    const started = Date.now();
    expect(await codeOf(quick.source('never'))).toBe(ErrorCode.NotFound);
    expect(Date.now() - started).toBeGreaterThanOrEqual(300);
    expect(Date.now() - started).toBeLessThan(1500);
  });

  it('checks containment again while it waits: a symlinked folder that appears meanwhile is refused', async () => {
    await writeFile(join(outside, 'x'), 'secret');
    const found = codeOf(staging.source('link/x'));
    await new Promise((r) => setTimeout(r, 200));
    await symlink(outside, join(dir.path, 'staging', 'link'));
    expect(await found).toBe(ErrorCode.InvalidInput);
  });

  it('gives a temp name that fits beside a dest whose name is near the 255-byte limit', async () => {
    const dest = await staging.resolve(`out/${'n'.repeat(250)}`);
    const tmp = await staging.tempBeside(dest);
    expect(Buffer.byteLength(basename(tmp))).toBeLessThanOrEqual(255);
    await writeFile(tmp, 'x');
    await staging.commitFile(tmp, dest);
    expect(await readdir(join(dir.path, 'staging', 'out'))).toEqual(['n'.repeat(250)]);
  });

  it('calls a dest the filesystem cannot hold InvalidInput, not a retryable error', async () => {
    // A dest below a file: its folder cannot be made.
    await writeFile(join(dir.path, 'staging', 'file'), 'x');
    const below = await staging.resolve('file/below');
    expect(await codeOf(staging.ensureParent(below))).toBe(ErrorCode.InvalidInput);
    // A fetched file committed onto a folder: EISDIR from the rename.
    await mkdir(join(dir.path, 'staging', 'folder'));
    const folder = await staging.resolve('folder');
    const tmp = await staging.tempBeside(folder);
    await writeFile(tmp, 'x');
    expect(classifyCommon(await staging.commitFile(tmp, folder).catch((e: unknown) => e))).toBe(ErrorCode.InvalidInput);
    expect(classifyCommon(Object.assign(new Error('name too long'), { code: 'ENAMETOOLONG' }))).toBe(ErrorCode.InvalidInput);
  });

  it('names the field in its message', async () => {
    const err = await staging.resolve('/abs', 'dest').catch((e: unknown) => e as StorageError);
    expect((err as StorageError).message).toMatch(/^InvalidInput: .*dest: must be relative/);
  });
});

describe('sweeping the staging area', () => {
  let dir: Awaited<ReturnType<typeof tempDir>>;
  beforeEach(async () => { dir = await tempDir(); });
  afterEach(async () => {
    vi.useRealTimers();
    await dir.remove();
  });
  /** Sweeps as if the clock read `ms` later: ages are ctimes, which no test can set back. */
  const sweepLater = async (staging: Staging, ms: number, opts?: Parameters<Staging['sweep']>[0]) => {
    vi.useFakeTimers({ toFake: ['Date'] });
    vi.setSystemTime(Date.now() + ms);
    try {
      return await staging.sweep(opts);
    } finally {
      vi.useRealTimers();
    }
  };

  it('removes temp files and trees a killed worker left, once nothing in them changed for the age given', async () => {
    const root = join(dir.path, 'staging');
    const staging = new Staging(root);
    const at = (...p: string[]) => join(root, ...p);
    await mkdir(at('jobs/a'), { recursive: true });
    // Left by a killed fetch and a killed extraction.
    await writeFile(at('jobs/a', `${STAGING_TMP}out.bin-1`), 'partial');
    await mkdir(at('jobs', `${STAGING_TMP}tree.extract-1`, 'site'), { recursive: true });
    await writeFile(at('jobs', `${STAGING_TMP}tree.extract-1`, 'site', 'f'), 'x');
    // An extraction still running: its top folder is old, a file deep inside is fresh.
    await mkdir(at(`${STAGING_TMP}live.extract-2`, 'deep'), { recursive: true });
    // A user's own file.
    await writeFile(at('jobs/a/keep.bin'), 'mine');
    const oldDone = Date.now();
    await new Promise((r) => setTimeout(r, 100));
    await writeFile(at(`${STAGING_TMP}live.extract-2`, 'deep', 'fresh'), 'x');
    await writeFile(at('jobs/a', `${STAGING_TMP}new.bin-3`), 'writing');

    // The clock at 50 ms past the old entries' age: they are over it, the fresh ones are not.
    expect(await sweepLater(staging, oldDone + 50 + 60_000 - Date.now(), 60_000)).toBe(2);
    expect((await readdir(root, { recursive: true })).sort()).toEqual([
      `${STAGING_TMP}live.extract-2`, `${STAGING_TMP}live.extract-2/deep`, `${STAGING_TMP}live.extract-2/deep/fresh`,
      'jobs', 'jobs/a', `jobs/a/${STAGING_TMP}new.bin-3`, 'jobs/a/keep.bin',
    ].sort());
  });

  it('judges age by ctime: a live tree whose mtimes are the archive\'s (1970) is not swept', async () => {
    const root = join(dir.path, 'staging');
    const staging = new Staging(root);
    const tree = join(root, 'out', `${STAGING_TMP}site.extract-1`);
    await mkdir(join(tree, 'app', 'lib'), { recursive: true });
    await writeFile(join(tree, 'app', 'lib', 'index.js'), 'x');
    await writeFile(join(root, 'out', `${STAGING_TMP}file.bin-2`), 'x');
    const epoch = new Date(0);
    for (const p of [join(tree, 'app', 'lib', 'index.js'), join(tree, 'app', 'lib'), join(tree, 'app'), tree, join(root, 'out', `${STAGING_TMP}file.bin-2`)]) await utimes(p, epoch, epoch);
    expect(await staging.sweep()).toBe(0);
    expect(await staging.sweep(60_000)).toBe(0);
    expect((await readdir(join(root, 'out'))).sort()).toEqual([`${STAGING_TMP}file.bin-2`, `${STAGING_TMP}site.extract-1`]);
  });

  it("removes the CLI's staged copies under incoming/ only after the longer age (24 h), and nothing of the user's", async () => {
    const root = join(dir.path, 'staging');
    const staging = new Staging(root);
    await mkdir(join(root, STAGING_INCOMING), { recursive: true });
    await mkdir(join(root, 'mine', STAGING_INCOMING), { recursive: true });
    await writeFile(join(root, STAGING_INCOMING, '5b2f-build.tar.gz'), 'queued');
    await writeFile(join(root, STAGING_INCOMING, `${STAGING_TMP}copy-1`), 'half a copy');
    await writeFile(join(root, 'mine', STAGING_INCOMING, 'own.bin'), 'user');
    await writeFile(join(root, 'own.bin'), 'user');
    // mtimes do not count here either.
    await utimes(join(root, STAGING_INCOMING, '5b2f-build.tar.gz'), new Date(0), new Date(0));

    // Two hours on: the half copy is a temp file (1 h); the queued copy may still be waiting for its job.
    expect(await sweepLater(staging, 2 * 3600_000)).toBe(1);
    expect(await readdir(join(root, STAGING_INCOMING))).toEqual(['5b2f-build.tar.gz']);
    expect(await sweepLater(staging, 23 * 3600_000)).toBe(0);
    expect(await sweepLater(staging, 25 * 3600_000, { incomingMaxAgeMs: 48 * 3600_000 })).toBe(0);
    expect(await sweepLater(staging, 25 * 3600_000)).toBe(1);
    expect(await readdir(join(root, STAGING_INCOMING))).toEqual([]);
    expect((await readdir(root, { recursive: true })).sort()).toEqual([STAGING_INCOMING, 'mine', `mine/${STAGING_INCOMING}`, `mine/${STAGING_INCOMING}/own.bin`, 'own.bin']);
  });

  it('removes migration records not written for the records age (30 days), by mtime, and nothing else', async () => {
    const root = join(dir.path, 'staging');
    const staging = new Staging(root);
    const pair = join(root, STAGING_RECORDS, '0123456789abcdef');
    await mkdir(pair, { recursive: true });
    await mkdir(join(root, 'mine'), { recursive: true });
    await writeFile(join(pair, 'old.json'), '{}');
    await writeFile(join(pair, 'fresh.json'), '{}');
    await writeFile(join(root, 'mine', 'old.bin'), 'user');
    // mtime is what our record writer sets (each write is a whole new file): set back, it reads as a record last written then.
    const days = (n: number) => new Date(Date.now() - n * 86_400_000);
    await utimes(join(pair, 'old.json'), days(31), days(31));
    await utimes(join(pair, 'fresh.json'), days(29), days(29));
    await utimes(join(root, 'mine', 'old.bin'), days(400), days(400));

    expect(await staging.sweep({ recordsMaxAgeMs: 40 * 86_400_000 })).toBe(0);
    expect(await staging.sweep()).toBe(1);
    expect((await readdir(root, { recursive: true })).sort()).toEqual([STAGING_RECORDS, `${STAGING_RECORDS}/0123456789abcdef`, `${STAGING_RECORDS}/0123456789abcdef/fresh.json`, 'mine', 'mine/old.bin']);
    expect(await staging.sweep({ recordsMaxAgeMs: 86_400_000 })).toBe(1);
    expect(await readdir(pair)).toEqual([]);
  });
});
