import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, readFile, readlink, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { transformTar, type Edit, type NewEntry, type TarEntry } from '../../src/archive/transform.js';
import { tempDir } from '../harness/process.js';
import { LONG_FILE, makeTree, members, pythonTar, run, type Member } from './corpus.js';

// Round trips of real archives (GNU tar in both its formats, Python's tarfile in both of its;
// bsdtar is not installed here) through transformTar, read back by Python (random access and the
// streaming `r|gz`) and by GNU tar (listing, extraction, and --compare against the source tree).
let dir: Awaited<ReturnType<typeof tempDir>>;
let src: string;
const archives: Record<string, string> = {};

beforeAll(async () => {
  dir = await tempDir('stevedore-transform-');
  src = join(dir.path, 'src');
  await mkdir(src);
  await makeTree(src);
  for (const format of ['gnu', 'posix']) {
    archives[`GNU tar --format=${format}`] = join(dir.path, `gnu-${format}.tgz`);
    await run('tar', [`--format=${format}`, '-czf', archives[`GNU tar --format=${format}`]!, '-C', src, '.']);
  }
  for (const format of ['GNU', 'PAX'] as const) {
    archives[`python tarfile ${format}_FORMAT`] = join(dir.path, `py-${format}.tgz`);
    await pythonTar(src, archives[`python tarfile ${format}_FORMAT`]!, format);
  }
});
afterAll(() => dir.remove());

async function transformFile(input: string, output: string, edit: (e: TarEntry) => Edit | Promise<Edit> = () => 'keep', append?: () => NewEntry[]) {
  return transformTar(createReadStream(input), createWriteStream(output), edit, append ? { append } : {});
}

/** GNU tar's `--compare` of an archive with a tree: what differs, one line each; '' when nothing does. */
async function compare(archive: string, tree: string): Promise<string> {
  return run('tar', ['-dzf', archive, '-C', tree]).then((r) => r.stdout, (err: { code?: number; stdout?: string }) => {
    if (err.code === 1 && err.stdout) return err.stdout;
    throw err;
  });
}

/**
 * Members without the one PAX record a rewrite may add: `mtime` when it only repeats the mtime
 * field, which ustar's octal field cannot hold before 1970 (GNU tar writes base-256 there,
 * tar-stream writes PAX). The mtime itself is still compared.
 */
const derived = (ms: Member[]): Member[] => ms.map((m) => {
  if (m.pax.mtime === undefined || Number(m.pax.mtime) !== m.mtime || m.mtime >= 0) return m;
  const { mtime: _, ...pax } = m.pax;
  return { ...m, pax };
});

/** Members as Python sees them, with the one field a transform may rename: a PAX entry's name spelling is kept, the rest too. */
const byName = (ms: Member[]): Map<string, Member> => new Map(ms.map((m) => [m.name, m]));

describe('transformTar: keeping every entry', () => {
  it.each(['GNU tar --format=gnu', 'GNU tar --format=posix', 'python tarfile GNU_FORMAT', 'python tarfile PAX_FORMAT'])(
    'rewrites an archive made by %s with every header field and byte intact',
    async (maker) => {
      const input = archives[maker]!;
      const out = join(dir.path, `keep-${maker.replace(/\W+/g, '-')}.tgz`);
      const result = await transformFile(input, out);
      const before = await members(input, 'r:gz');
      expect(result).toMatchObject({ read: before.length, kept: before.length, dropped: 0, entries: before.length, gzip: true });
      // Python, random access and streaming: same members, same order, same fields, same bytes.
      expect(derived(await members(out, 'r:gz'))).toEqual(derived(before));
      expect(derived(await members(out, 'r|gz'))).toEqual(derived(before));
      expect(before.map((m) => m.type)).toEqual(expect.arrayContaining(['symlink', 'link', 'directory', 'file']));
      // GNU tar lists it without a word on stderr; a rewrite of its own PAX archive compares equal
      // to the source tree. (It compares nanoseconds for entries with a PAX header: Python's float
      // mtimes round them, and whole-second mtimes of GNU-format entries that come out as PAX for
      // their long or unicode names differ from the source by the fraction GNU tar dropped.)
      const listed = await run('tar', ['-tvzf', out]);
      expect(listed.stderr).toBe('');
      expect(listed.stdout.split('\n').filter(Boolean)).toHaveLength(before.length);
      if (maker === 'GNU tar --format=posix') expect(await compare(out, src)).toBe('');
      // Extracted by GNU tar, the tree is the one the original archive describes.
      const x = join(dir.path, `x-${maker.replace(/\W+/g, '-')}`);
      await mkdir(x);
      await run('tar', ['-xzf', out, '-C', x]);
      expect(await compare(input, x)).toBe('');
      expect(await readFile(join(x, LONG_FILE), 'utf8')).toBe('long path\n');
      expect(await readlink(join(x, 'sub/long-link'))).toBe(`../${LONG_FILE}`);
      expect((await stat(join(x, 'hard'))).ino).toBe((await stat(join(x, 'README.md'))).ino);
    },
  );

  it('keeps sub-second PAX mtimes and other PAX records exactly', async () => {
    const input = archives['GNU tar --format=posix']!;
    const out = join(dir.path, 'pax-keep.tgz');
    await transformFile(input, out);
    const pick = async (f: string) => (await members(f, 'r:gz')).find((m) => m.name === './sub/deeper/data.bin')!;
    const [was, now] = [await pick(input), await pick(out)];
    expect(was.pax.mtime).toMatch(/^1580608922\.12\d+$/);
    expect(now.pax).toEqual(was.pax);
    expect(Object.keys(now.pax).sort()).toEqual(['atime', 'ctime', 'mtime']);
  });
});

describe('transformTar: edits', () => {
  it('drops, replaces and appends, leaving every other entry as it was', async () => {
    const input = archives['python tarfile PAX_FORMAT']!;
    const out = join(dir.path, 'edited.tgz');
    const mtime = new Date('2026-01-02T03:04:05Z');
    let seen: string[] = [];
    const result = await transformTar(createReadStream(input), createWriteStream(out), (e) => {
      seen.push(e.path);
      if (e.path === 'secret') return 'drop';
      if (e.path === 'README.md') return { replace: { header: { ...e.header, mtime }, data: 'new readme\n' } };
      if (e.path === 'bin/run') return { replace: { header: { ...e.header, mode: 0o700, mtime }, data: '#!/bin/sh\necho new\n' } };
      return 'keep';
    }, {
      append: (tree) => {
        expect(tree.kind('bin')).toBe('directory');
        expect(tree.kind('secret')).toBeUndefined();
        expect(tree.kind('link')).toBe('symlink');
        return [
          { header: { name: 'new', type: 'directory', mtime } },
          { header: { name: 'new/file.txt', mtime, mode: 0o640 }, data: 'added\n' },
          { header: { name: 'secret', mtime }, data: 'not the old one\n' },
        ];
      },
    });
    expect(result).toMatchObject({ dropped: 1, replaced: 2, added: 3 });
    expect(seen).toContain('');
    const before = byName(await members(input, 'r:gz'));
    const after = await members(out, 'r|gz');
    const touched = new Set(['./secret', './README.md', './bin/run', 'new', 'new/file.txt', 'secret']);
    for (const m of after.filter((a) => !touched.has(a.name))) expect(m).toEqual(before.get(m.name));
    expect(after.filter((a) => !touched.has(a.name))).toHaveLength(before.size - 3);
    const readme = after.find((m) => m.name === './README.md')!;
    expect(readme).toMatchObject({ mode: 0o644, mtime: mtime.getTime() / 1000, size: 11, uname: before.get('./README.md')!.uname });
    expect(after.find((m) => m.name === './bin/run')).toMatchObject({ mode: 0o700, size: 19 });
    expect(after.slice(-3).map((m) => m.name)).toEqual(['new', 'new/file.txt', 'secret']);
    // GNU tar extracts it; the hard link follows the replaced README.
    const x = join(dir.path, 'x-edited');
    await mkdir(x);
    await run('tar', ['-xzf', out, '-C', x]);
    expect(await readFile(join(x, 'README.md'), 'utf8')).toBe('new readme\n');
    expect(await readFile(join(x, 'hard'), 'utf8')).toBe('new readme\n');
    expect(await readFile(join(x, 'new/file.txt'), 'utf8')).toBe('added\n');
    expect(await readFile(join(x, 'secret'), 'utf8')).toBe('not the old one\n');
    expect((await stat(join(x, 'new/file.txt'))).mode & 0o777).toBe(0o640);
    seen = [];
  });

  it('lets an edit read an entry before replacing it (a digest check), and streams a replacement', async () => {
    const input = archives['GNU tar --format=gnu']!;
    const out = join(dir.path, 'read-then-replace.tar');
    const big = Buffer.alloc(300_000, 0x5a);
    const result = await transformTar(createReadStream(input), createWriteStream(out), async (e) => {
      if (e.path !== 'sub/deeper/data.bin') return 'keep';
      let n = 0;
      for await (const chunk of e.data) n += chunk.length;
      expect(n).toBe(70_000);
      async function* chunks() { for (let i = 0; i < 3; i++) yield big.subarray(i * 100_000, (i + 1) * 100_000); }
      return { replace: { header: { ...e.header, size: big.length }, data: chunks() } };
    }, { gzip: false });
    expect(result.gzip).toBe(false);
    const data = (await members(out, 'r|')).find((m) => m.name === './sub/deeper/data.bin')!;
    expect(data.size).toBe(300_000);
  });

  it('creates an archive from nothing (input null)', async () => {
    const out = join(dir.path, 'fresh.tgz');
    const mtime = new Date('2026-01-01T00:00:00Z');
    const result = await transformTar(null, createWriteStream(out), () => 'keep', {
      append: () => [{ header: { name: 'a', type: 'directory', mtime } }, { header: { name: 'a/b.txt', mtime }, data: 'b' }],
    });
    expect(result).toMatchObject({ read: 0, added: 2, gzip: true });
    expect((await members(out, 'r|gz')).map((m) => [m.name, m.type, m.mode])).toEqual([['a', 'directory', 0o755], ['a/b.txt', 'file', 0o644]]);
  });
});
