// A folder fsync that fails after the rename into staging (EIO): the rename is not known to be
// durable, so `dest` is taken back and the error surfaces (the job fails Transient and runs again).
import { readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { Staging } from '../src/staging.js';
import { toBullError } from '../src/queue/runner.js';
import { tempDir } from './harness/process.js';

const io = vi.hoisted(() => ({ fail: false }));
vi.mock('../src/storage/sync-dir.js', async (importOriginal) => {
  const real = await importOriginal<typeof import('../src/storage/sync-dir.js')>();
  return {
    ...real,
    syncDir: async (dir: string) => {
      if (io.fail) throw Object.assign(new Error(`EIO: injected into fsync of ${dir}`), { code: 'EIO', syscall: 'fsync' });
      return real.syncDir(dir);
    },
  };
});

describe('committing a fetched file', () => {
  let dir: Awaited<ReturnType<typeof tempDir>>;
  let staging: Staging;
  beforeEach(async () => {
    dir = await tempDir();
    staging = new Staging(dir.path);
  });
  afterEach(async () => {
    io.fail = false;
    await dir.remove();
  });

  it('takes dest back and fails Transient when the folder fsync after the rename fails', async () => {
    const dest = await staging.resolve('out/file.bin');
    const tmp = await staging.tempBeside(dest);
    await writeFile(tmp, 'bytes');
    io.fail = true;
    const err = await staging.commitFile(tmp, dest).catch((e: unknown) => e);
    expect((err as NodeJS.ErrnoException).code).toBe('EIO');
    expect(toBullError(err).message).toMatch(/^Transient: /);
    expect(await readdir(join(dir.path, 'out'))).toEqual([]);
  });

  it('leaves dest in place when the fsync succeeds', async () => {
    const dest = await staging.resolve('out/file.bin');
    const tmp = await staging.tempBeside(dest);
    await writeFile(tmp, 'bytes');
    await staging.commitFile(tmp, dest);
    expect(await readdir(join(dir.path, 'out'))).toEqual(['file.bin']);
  });
});
