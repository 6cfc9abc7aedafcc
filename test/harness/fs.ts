import { lstat, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { FsDriver } from '../../src/backends/fs.js';
import type { ConformanceTarget } from '../conformance/target.js';
import { tempDir } from './process.js';

export async function fsConformanceTarget(): Promise<ConformanceTarget & { root: string }> {
  const dir = await tempDir('stevedore-fs-');
  return {
    name: 'filesystem',
    root: dir.path,
    driver: async () => new FsDriver({ root: dir.path }),
    corrupt: async (key, bytes) => {
      // Rewrite in place (same inode) so the sidecar still claims the old digest: bit rot.
      const path = join(dir.path, key);
      const before = await lstat(path);
      await writeFile(path, bytes, { flag: 'r+' });
      if ((await lstat(path)).ino !== before.ino) throw new Error('corrupt() changed the inode');
    },
    multipartThreshold: 1 << 20,
    teardown: () => dir.remove(),
  };
}

/** Every file under `root`, relative, for tests that look at what the backend left on disk. */
export async function filesUnder(root: string): Promise<string[]> {
  return (await readdir(root, { recursive: true, withFileTypes: true }))
    .filter((e) => e.isFile())
    .map((e) => join(e.parentPath, e.name).slice(root.length + 1))
    .sort();
}

/** Every entry under `root` (folders too, with a trailing `/`), relative: what a test checks nothing was created in. */
export async function entriesUnder(root: string): Promise<string[]> {
  return (await readdir(root, { recursive: true, withFileTypes: true }))
    .map((e) => join(e.parentPath, e.name).slice(root.length + 1) + (e.isDirectory() ? '/' : ''))
    .sort();
}
