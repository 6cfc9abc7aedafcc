import { mkdir, readdir, symlink, utimes, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ErrorCode, StorageError, classifyCommon } from '../src/errors.js';
import { STAGING_TMP, Staging } from '../src/staging.js';
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
  afterEach(() => dir.remove());

  it('removes temp files and trees a killed worker left, once nothing in them changed for the age given', async () => {
    const root = join(dir.path, 'staging');
    const staging = new Staging(root);
    const old = new Date(Date.now() - 2 * 60_000);
    const at = (...p: string[]) => join(root, ...p);
    await mkdir(at('jobs/a'), { recursive: true });
    // Left by a killed fetch and a killed extraction, both old.
    await writeFile(at('jobs/a', `${STAGING_TMP}out.bin-1`), 'partial');
    await mkdir(at('jobs', `${STAGING_TMP}tree.extract-1`, 'site'), { recursive: true });
    await writeFile(at('jobs', `${STAGING_TMP}tree.extract-1`, 'site', 'f'), 'x');
    // An extraction still running: its top folder is old, a file deep inside is fresh.
    await mkdir(at(`${STAGING_TMP}live.extract-2`, 'deep'), { recursive: true });
    await writeFile(at(`${STAGING_TMP}live.extract-2`, 'deep', 'fresh'), 'x');
    // A user's own file, old, and a fresh temp file.
    await writeFile(at('jobs/a/keep.bin'), 'mine');
    await writeFile(at('jobs/a', `${STAGING_TMP}new.bin-3`), 'writing');
    for (const p of [at('jobs/a', `${STAGING_TMP}out.bin-1`), at('jobs', `${STAGING_TMP}tree.extract-1`, 'site', 'f'), at('jobs', `${STAGING_TMP}tree.extract-1`, 'site'),
      at('jobs', `${STAGING_TMP}tree.extract-1`), at(`${STAGING_TMP}live.extract-2`), at('jobs/a/keep.bin')]) await utimes(p, old, old);

    expect(await staging.sweep(60_000)).toBe(2);
    expect((await readdir(root, { recursive: true })).sort()).toEqual([
      `${STAGING_TMP}live.extract-2`, `${STAGING_TMP}live.extract-2/deep`, `${STAGING_TMP}live.extract-2/deep/fresh`,
      'jobs', 'jobs/a', `jobs/a/${STAGING_TMP}new.bin-3`, 'jobs/a/keep.bin',
    ].sort());
  });
});
