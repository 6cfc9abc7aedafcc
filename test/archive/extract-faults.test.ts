// Durability of `extract`: every file and directory of the tree is fsynced before it is renamed
// into place, and a failed fsync (EIO) fails the extraction with nothing at `dest`. The fsyncs go
// through node:fs/promises' FileHandle and, for dest's folder, syncDir; both are wrapped here to
// record each and fail one on demand.
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { extractArchive } from '../../src/archive/extract.js';
import { ErrorCode, StorageError } from '../../src/errors.js';
import { exists, listAll, packed, sandbox, streamOf } from './tarballs.js';

const io = vi.hoisted(() => ({ armed: false, synced: [] as string[], failAt: 0 }));

vi.mock('node:fs/promises', async (importOriginal) => {
  const real = await importOriginal<typeof import('node:fs/promises')>();
  const open = async (...args: Parameters<typeof real.open>) => {
    const fh = await real.open(...args);
    if (!io.armed) return fh;
    const sync = fh.sync.bind(fh);
    fh.sync = async () => {
      io.synced.push(String(args[0]));
      if (io.synced.length === io.failAt) throw Object.assign(new Error('EIO: injected into fsync'), { code: 'EIO', syscall: 'fsync' });
      return sync();
    };
    return fh;
  };
  return { ...real, open, default: { ...real, open } };
});

// dest's folder is fsynced through the shared syncDir (group commit), after the rename.
vi.mock('../../src/storage/sync-dir.js', async (importOriginal) => {
  const real = await importOriginal<typeof import('../../src/storage/sync-dir.js')>();
  return {
    ...real,
    syncDir: async (dir: string) => {
      if (io.armed) {
        io.synced.push(dir);
        if (io.synced.length === io.failAt) throw Object.assign(new Error('EIO: injected into fsync'), { code: 'EIO', syscall: 'fsync' });
      }
      return real.syncDir(dir);
    },
  };
});

let box: Awaited<ReturnType<typeof sandbox>>;
beforeEach(async () => { box = await sandbox(); });
afterEach(async () => {
  io.armed = false;
  await box.remove();
});

const archive = () => packed([
  { name: 'site/index.html', data: '<h1>hi</h1>' },
  { name: 'site/assets/app.css', data: 'body{}' },
  ...Array.from({ length: 40 }, (_, i) => ({ name: `site/many/f${i}.txt`, data: `file ${i}` })),
]);

describe('extract durability', () => {
  it('fsyncs every file and every directory of the tree before it appears at dest', async () => {
    Object.assign(io, { armed: true, synced: [], failAt: 0 });
    await extractArchive(streamOf(await archive()), box.dest);
    io.armed = false;
    const entries = await listAll(box.dest);
    // The tree was built in a temp folder beside dest, then renamed; its paths, relative to it:
    const index = io.synced.find((p) => p.endsWith('/site/index.html'))!;
    const tmpRoot = index.slice(0, -'/site/index.html'.length);
    expect(tmpRoot.startsWith(`${box.parent}/`)).toBe(true);
    // Each file and folder once, the tree's root too, and dest's folder after the rename.
    const expected = [...entries.map((e) => `${tmpRoot}/${e}`), tmpRoot, box.parent];
    expect([...io.synced].sort()).toEqual(expected.sort());
    expect(io.synced.at(-1)).toBe(box.parent);
  });

  // 42 files, then 4 folders (the tree's root included), then dest's folder after the rename: 47.
  it.each([
    ['the first file', 1], ['a file among others', 20], ['a folder', 44], ["dest's folder after the rename", 47],
  ])('fails Transient and leaves nothing at dest when the fsync of %s fails', async (_what, n) => {
    Object.assign(io, { armed: true, synced: [], failAt: n });
    const err = await extractArchive(streamOf(await archive()), box.dest).catch((e: unknown) => e);
    io.armed = false;
    expect(io.synced.length).toBeGreaterThanOrEqual(n);
    if (n === 47) expect(io.synced.at(-1)).toBe(box.parent);
    expect(err).toBeInstanceOf(StorageError);
    expect((err as StorageError).code).toBe(ErrorCode.Transient);
    expect(await exists(box.dest)).toBe(false);
    // No temp tree left behind in the staging folder either.
    expect(await listAll(box.parent)).toEqual([]);
  });
});
