import { mkdir, readdir, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ErrorCode, StorageError } from '../src/errors.js';
import { Staging } from '../src/staging.js';
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

  it('names the field in its message', async () => {
    const err = await staging.resolve('/abs', 'dest').catch((e: unknown) => e as StorageError);
    expect((err as StorageError).message).toMatch(/^InvalidInput: .*dest: must be relative/);
  });
});
