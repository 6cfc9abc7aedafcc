import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { chmod, mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { promisify } from 'node:util';
import { createGzip } from 'node:zlib';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { extractArchive } from '../../src/archive/extract.js';
import { ErrorCode, StorageError } from '../../src/errors.js';
import { expectRefused } from './refused.js';
import { entry, gz, lazyTar, listAll, packed, sandbox, streamOf, tarball } from './tarballs.js';

const MiB = 1024 ** 2;
let box: Awaited<ReturnType<typeof sandbox>>;
beforeEach(async () => { box = await sandbox(); });
afterEach(() => box.remove());

const modeOf = async (p: string): Promise<number> => (await stat(p)).mode & 0o7777;

describe('extractArchive', () => {
  const tree = (): Promise<Buffer> => packed([
    { name: 'site', type: 'directory' },
    { name: 'site/index.html', data: '<h1>hi</h1>' },
    { name: 'site/assets/css/app.css', data: 'body{}' },
    { name: 'site/empty.txt', data: '' },
    { name: 'site/deep/a/b/c/d/e/f/g.txt', data: 'deep' },
  ]);

  it.each([['a plain tar', (b: Buffer) => b], ['a tar.gz', gz]])('extracts nested directories and empty files from %s', async (_what, encode) => {
    const result = await extractArchive(streamOf(encode(await tree())), box.dest);
    expect(result).toEqual({ entries: 5, bytes: 21, files: 4, dirs: 10 });
    expect(await listAll(box.dest)).toEqual([
      'site', 'site/assets', 'site/assets/css', 'site/assets/css/app.css', 'site/deep', 'site/deep/a', 'site/deep/a/b',
      'site/deep/a/b/c', 'site/deep/a/b/c/d', 'site/deep/a/b/c/d/e', 'site/deep/a/b/c/d/e/f', 'site/deep/a/b/c/d/e/f/g.txt',
      'site/empty.txt', 'site/index.html',
    ]);
    expect(await readFile(join(box.dest, 'site/index.html'), 'utf8')).toBe('<h1>hi</h1>');
    expect((await stat(join(box.dest, 'site/empty.txt'))).size).toBe(0);
    expect(await listAll(box.parent)).toEqual(['out', ...(await listAll(box.dest)).map((p) => `out/${p}`)].sort());
  });

  it('keeps permission bits only, never setuid or group/world write, and owner rwx on directories', async () => {
    const tar = await packed([
      { name: './', type: 'directory', mode: 0o750 },
      { name: 'suid', mode: 0o4755, data: 'x' },
      { name: 'shared', mode: 0o666, data: 'x' },
      { name: 'private', mode: 0o600, data: 'x' },
      { name: 'ro', type: 'directory', mode: 0o555 },
      { name: 'ro/inside', mode: 0o444, data: 'written before the mode applied' },
      { name: 'sticky', type: 'directory', mode: 0o3777 },
    ]);
    await extractArchive(streamOf(tar), box.dest);
    expect(await modeOf(box.dest)).toBe(0o750);
    expect(await modeOf(join(box.dest, 'suid'))).toBe(0o755);
    expect(await modeOf(join(box.dest, 'shared'))).toBe(0o644);
    expect(await modeOf(join(box.dest, 'private'))).toBe(0o600);
    expect(await modeOf(join(box.dest, 'ro'))).toBe(0o755);
    expect(await modeOf(join(box.dest, 'ro/inside'))).toBe(0o444);
    expect(await modeOf(join(box.dest, 'sticky'))).toBe(0o755);
  });

  it('gives the destination 0o755 when the archive has no root entry', async () => {
    await extractArchive(streamOf(tarball(entry({ name: 'f' }, 'x'))), box.dest);
    expect(await modeOf(box.dest)).toBe(0o755);
  });

  it('applies file and directory mtimes, directories after their children', async () => {
    const fileTime = new Date('2001-01-01T00:00:00Z');
    const dirTime = new Date('2002-02-02T00:00:00Z');
    const tar = await packed([
      { name: 'd', type: 'directory', mtime: dirTime },
      { name: 'd/f', mtime: fileTime, data: 'x' },
    ]);
    await extractArchive(streamOf(tar), box.dest);
    expect((await stat(join(box.dest, 'd/f'))).mtime).toEqual(fileTime);
    expect((await stat(join(box.dest, 'd'))).mtime).toEqual(dirTime);
  });

  it.each(['gnu', 'posix'])('reads `tar -C dir .` archives written by GNU tar (%s format), long names included', async (format) => {
    const src = join(box.root, 'src');
    const long = `${'n'.repeat(120)}/${'m'.repeat(130)}.txt`;
    await mkdir(join(src, 'bin'), { recursive: true });
    await mkdir(join(src, 'n'.repeat(120)));
    await writeFile(join(src, 'bin/run'), '#!/bin/sh\n');
    await chmod(join(src, 'bin/run'), 0o755);
    await writeFile(join(src, long), 'long');
    await writeFile(join(src, 'empty'), '');
    const archive = join(box.root, 'a.tgz');
    await promisify(execFile)('tar', [`--format=${format}`, '-czf', archive, '-C', src, '.']);
    const result = await extractArchive(createReadStream(archive), box.dest);
    expect(result).toMatchObject({ files: 3, dirs: 2 });
    expect(await listAll(box.dest)).toEqual(await listAll(src));
    expect(await readFile(join(box.dest, long), 'utf8')).toBe('long');
    expect(await modeOf(join(box.dest, 'bin/run'))).toBe(0o755);
  });

  it('lets a later entry with the exact same name replace the earlier file, as tar does', async () => {
    const tar = tarball(entry({ name: 'same' }, 'first'), entry({ name: './same' }, 'second'));
    expect(await extractArchive(streamOf(tar), box.dest)).toMatchObject({ entries: 2, files: 1 });
    expect(await readFile(join(box.dest, 'same'), 'utf8')).toBe('second');
  });

  it('treats contiguous-file entries as regular files', async () => {
    await extractArchive(streamOf(tarball(entry({ name: 'c', type: '7' }, 'contiguous'))), box.dest);
    expect(await readFile(join(box.dest, 'c'), 'utf8')).toBe('contiguous');
  });

  it('accepts a path exactly 1024 segments deep', async () => {
    const name = `${'d/'.repeat(1023)}f`;
    const tar = gz(await packed([{ name, data: 'bottom' }]));
    expect(await extractArchive(streamOf(tar), box.dest)).toMatchObject({ files: 1, dirs: 1023 });
    expect(await readFile(join(box.dest, name), 'utf8')).toBe('bottom');
  });

  it.each([
    ['a plain tar', (s: Readable) => s],
    ['a tar.gz', (s: Readable) => s.pipe(createGzip({ level: 1 }))],
  ])('streams a 50 MiB entry of %s without holding it in memory', async (_what, encode) => {
    const noise = randomBytes(64 * 1024); // incompressible, so the gzip case is no bomb
    const big = lazyTar(Buffer.alloc(0), { name: 'big.bin', size: 50 * MiB }, noise);
    // A small run first, so lazily loaded code and first-use buffers are not counted as growth.
    await extractArchive(encode(lazyTar(Buffer.alloc(0), { name: 'warm', size: MiB }, noise).stream), join(box.parent, 'warm-up'));
    const before = process.memoryUsage.rss();
    let peak = before;
    const sample = setInterval(() => { peak = Math.max(peak, process.memoryUsage.rss()); }, 5);
    try {
      const result = await extractArchive(encode(big.stream), box.dest);
      expect(result).toEqual({ entries: 1, bytes: 50 * MiB, files: 1, dirs: 0 });
    } finally {
      clearInterval(sample);
    }
    peak = Math.max(peak, process.memoryUsage.rss());
    expect(peak - before).toBeLessThan(40 * MiB);
    expect((await stat(join(box.dest, 'big.bin'))).size).toBe(50 * MiB);
    const fh = await readFile(join(box.dest, 'big.bin')).then((b) => b.subarray(3 * MiB, 3 * MiB + noise.length));
    expect(fh.equals(noise)).toBe(true);
  });
});

describe('extractArchive: an existing destination', () => {
  it('is refused with PreconditionFailed before the archive is read', async () => {
    await mkdir(box.dest);
    await writeFile(join(box.dest, 'old'), 'old');
    const source = streamOf(tarball(entry({ name: 'new' }, 'new')));
    await expect(extractArchive(source, box.dest)).rejects.toMatchObject({ code: ErrorCode.PreconditionFailed });
    expect(source.destroyed).toBe(true);
    expect(await listAll(box.parent)).toEqual(['out', 'out/old']);
  });

  it('is replaced whole with `replace`, leaving nothing of the old tree', async () => {
    await mkdir(join(box.dest, 'sub'), { recursive: true });
    await writeFile(join(box.dest, 'sub/old'), 'old');
    await extractArchive(streamOf(tarball(entry({ name: 'new' }, 'new'))), box.dest, { replace: true });
    expect(await listAll(box.parent)).toEqual(['out', 'out/new']);
  });
});

describe('extractArchive: failures that are not the archive\'s fault', () => {
  it('fails Transient when aborted, and cleans up', async () => {
    const big = lazyTar(Buffer.alloc(0), { name: 'big.bin', size: 1024 ** 3 });
    const ac = new AbortController();
    const watch = setInterval(() => { if (big.produced() > 8 * MiB) ac.abort(); }, 1);
    try {
      await expectRefused(box, extractArchive(big.stream, box.dest, { signal: ac.signal }), { code: ErrorCode.Transient, match: /aborted/ });
    } finally {
      clearInterval(watch);
    }
    expect(big.produced()).toBeLessThan(512 * MiB);
  });

  it('keeps the code of an error from the source stream', async () => {
    const bytes = gz(tarball(entry({ name: 'f' }, randomBytes(100_000))));
    const failing = (err: Error): Readable => {
      const s = new Readable({ read() {} });
      s.push(bytes.subarray(0, 20_000));
      setTimeout(() => s.destroy(err), 10);
      return s;
    };
    const reset = Object.assign(new Error('socket hang up'), { code: 'ECONNRESET' });
    await expectRefused(box, extractArchive(failing(reset), box.dest), { code: ErrorCode.Transient });
    const rot = new StorageError(ErrorCode.ChecksumMismatch, 'stored bytes do not match their digest');
    await expectRefused(box, extractArchive(failing(rot), box.dest), { code: ErrorCode.ChecksumMismatch });
  });
});

describe('extractArchive run twice at once (RELIABILITY #17)', () => {
  it('lets both replacing runs succeed, leaving one whole tree and no temp folders', async () => {
    const tar = await packed([
      { name: 'site/index.html', data: '<h1>hi</h1>' },
      ...Array.from({ length: 30 }, (_, i) => ({ name: `site/f${i}.txt`, data: `file ${i}` })),
    ]);
    for (let round = 0; round < 15; round++) {
      const runs = await Promise.allSettled([0, 1].map(() => extractArchive(streamOf(tar), box.dest, { replace: true })));
      expect(runs.map((r) => (r.status === 'rejected' ? String(r.reason) : 'ok'))).toEqual(['ok', 'ok']);
      expect(await listAll(box.dest)).toHaveLength(32);
      expect(await readFile(join(box.dest, 'site/index.html'), 'utf8')).toBe('<h1>hi</h1>');
      expect(await listAll(box.parent).then((all) => all.filter((p) => !p.startsWith('out')))).toEqual([]);
    }
  });
});
