import { randomBytes } from 'node:crypto';
import { Readable, Writable } from 'node:stream';
import { createGzip } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { transformTar, type Edit, type NewEntry, type TarEntry, type TransformOptions } from '../../src/archive/transform.js';
import { ErrorCode, StorageError } from '../../src/errors.js';
import { entry, gnuLongName, gz, lazyTar, pax, streamOf, tarball } from './tarballs.js';

// The entry checks and limits (RELIABILITY #1-#8) hold for the transform as for extraction, on
// the input and on what a caller adds; in-tree links survive; failures of the output, the edit
// and the signal keep their codes and leave the output destroyed.
const MiB = 1024 ** 2;
const ok = entry({ name: 'ok.txt' }, 'fine');

/** A sink that keeps what it is given, and whether it was ended or destroyed. */
function sink(failAfter?: number): Writable & { bytes: () => Buffer; ended: () => boolean } {
  const chunks: Buffer[] = [];
  let size = 0;
  let ended = false;
  const w = new Writable({
    write(chunk: Buffer, _enc, cb) {
      size += chunk.length;
      if (failAfter !== undefined && size > failAfter) return cb(Object.assign(new Error('EIO: injected'), { code: 'EIO' }));
      chunks.push(chunk);
      cb();
    },
    final(cb) { ended = true; cb(); },
  });
  return Object.assign(w, { bytes: () => Buffer.concat(chunks), ended: () => ended });
}

async function refused(input: Readable | Buffer, want: { code?: ErrorCode; match?: RegExp; key?: string } = {}, edit: (e: TarEntry) => Edit | Promise<Edit> = () => 'keep', opts: TransformOptions = {}): Promise<StorageError> {
  const out = sink();
  const source = Buffer.isBuffer(input) ? streamOf(input) : input;
  const err: unknown = await transformTar(source, out, edit, opts).then(() => new Error('transform succeeded'), (e: unknown) => e);
  expect(err).toBeInstanceOf(StorageError);
  const e = err as StorageError;
  expect(e.code, e.message).toBe(want.code ?? ErrorCode.InvalidInput);
  if (want.match) expect(e.message).toMatch(want.match);
  if (want.key !== undefined) expect(e.key).toBe(want.key);
  // Never a clean end on a refused archive: the consumer (an upload) sees a failed stream.
  expect(out.destroyed).toBe(true);
  expect(out.ended()).toBe(false);
  expect(source.destroyed).toBe(true);
  return e;
}

/** Runs a transform that keeps everything and returns the output entries' names and types. */
async function kept(tar: Buffer, opts: TransformOptions = {}): Promise<Array<[string, string, string?]>> {
  const out = sink();
  await transformTar(streamOf(tar), out, () => 'keep', opts);
  const seen: Array<[string, string, string?]> = [];
  await transformTar(streamOf(out.bytes()), sink(), (e) => {
    seen.push(e.header.linkname ? [e.path, e.header.type, e.header.linkname] : [e.path, e.header.type]);
    return 'keep';
  });
  return seen;
}

describe('transformTar: #1 names', () => {
  it.each(['../../x', '/etc/x', '////etc/x', 'a/../../x', 'C:../x', 'a\\..\\..\\x'])('refuses %j', async (name) => {
    await refused(tarball(ok, entry({ name }, 'evil')), { key: name, match: /unsafe entry name/ });
  });

  it('refuses them in PAX and GNU long-name headers too, even when the edit would drop the entry', async () => {
    await refused(gz(tarball(ok, pax([['path', '../../x']]), entry({ name: 'innocent' }))), { match: /unsafe entry name/ }, () => 'drop');
    await refused(tarball(ok, gnuLongName('a/../../x'), entry({ name: 'innocent' })), { match: /unsafe entry name/ });
  });
});

describe('transformTar: #2 links', () => {
  it.each([
    ['an absolute symlink', entry({ name: 'l', type: '2', linkname: '/etc' }), /unsafe symlink target.*absolute/],
    ['a symlink up the tree', entry({ name: 'sub/l', type: '2', linkname: '../../x' }), /points out of the tree/],
    ['a hard link up the tree', entry({ name: 'h', type: '1', linkname: '../x' }), /unsafe entry name/],
    ['an absolute hard link', entry({ name: 'h', type: '1', linkname: '/etc/passwd' }), /unsafe entry name/],
    ['a hard link to nothing in the archive', entry({ name: 'h', type: '1', linkname: 'missing' }), /hard link target/],
    ['a symlink with a backslash', entry({ name: 'l', type: '2', linkname: '..\\..\\x' }), /backslash/],
  ])('refuses %s', async (_what, link, match) => {
    await refused(tarball(ok, link), { match });
  });

  it('refuses a chain that leaves the tree through an earlier link (s -> ., then l -> s/../x)', async () => {
    const tar = tarball(entry({ name: 's', type: '2', linkname: '.' }), entry({ name: 'l', type: '2', linkname: 's/../x' }));
    await refused(tar, { key: 'l', match: /points out of the tree/ });
  });

  it('refuses a chain whose second link leaves the tree (l1 -> l2, l2 -> ../..)', async () => {
    const tar = tarball(entry({ name: 'l1', type: '2', linkname: 'l2' }), entry({ name: 'l2', type: '2', linkname: '../..' }));
    await refused(tar, { key: 'l2', match: /points out of the tree/ });
  });

  it('refuses a later symlink on a path an earlier link resolved through (which would make it escape)', async () => {
    // Lexically l stays inside; once a/d -> . exists, a/d/../../x is ../x.
    const tar = tarball(
      entry({ name: 'a/', type: '5' }),
      entry({ name: 'l', type: '2', linkname: 'a/d/../../x' }),
      entry({ name: 'a/d', type: '2', linkname: '.' }),
    );
    await refused(tar, { key: 'a/d', match: /earlier link resolves through/ });
  });

  it('keeps symlinks and hard links that stay inside, chains through inside links included', async () => {
    const tar = tarball(
      entry({ name: 'packages/pkg/bin/x.js' }, 'bin'),
      entry({ name: 'node_modules/pkg', type: '2', linkname: '../packages/pkg' }),
      entry({ name: 'node_modules/.bin/x', type: '2', linkname: '../pkg/bin/x.js' }),
      entry({ name: 'up', type: '2', linkname: 'packages/pkg/bin/../../..' }),
      entry({ name: 'dangling', type: '2', linkname: 'not/yet/there' }),
      entry({ name: 'hard', type: '1', linkname: 'packages/pkg/bin/x.js' }),
    );
    expect(await kept(tar)).toEqual([
      ['packages/pkg/bin/x.js', 'file'],
      ['node_modules/pkg', 'symlink', '../packages/pkg'],
      ['node_modules/.bin/x', 'symlink', '../pkg/bin/x.js'],
      ['up', 'symlink', 'packages/pkg/bin/../../..'],
      ['dangling', 'symlink', 'not/yet/there'],
      ['hard', 'link', 'packages/pkg/bin/x.js'],
    ]);
  });

  it('refuses a hard link to a file the edit dropped', async () => {
    const tar = tarball(entry({ name: 'f' }, 'data'), entry({ name: 'h', type: '1', linkname: 'f' }));
    await refused(tar, { key: 'h', match: /hard link target/ }, (e) => (e.path === 'f' ? 'drop' : 'keep'));
  });
});

describe('transformTar: #3 and #4, the tree', () => {
  it('refuses directory d, then symlink d, then file d/f', async () => {
    const tar = tarball(entry({ name: 'd/', type: '5' }), entry({ name: 'd', type: '2', linkname: 'elsewhere' }), entry({ name: 'd/f' }, 'x'));
    await refused(tar, { key: 'd', match: /already a directory/ });
  });

  it('refuses a file under a symlink', async () => {
    const tar = tarball(entry({ name: 'd', type: '2', linkname: 'elsewhere' }), entry({ name: 'd/f' }, 'x'));
    await refused(tar, { key: 'd/f', match: /is a symlink/ });
  });

  // A transform writes no filesystem: names are their bytes, as on Linux, where a repository may hold
  // both spellings (extraction into staging still refuses them: test/archive/reliability.test.ts).
  it.each([['case', 'Readme.md', 'README.md'], ['NFC / NFD', 'caf\u00e9.txt', 'cafe\u0301.txt']])('keeps two names that differ only by %s, each whole', async (_w, a, b) => {
    expect(await kept(tarball(entry({ name: a }, '1'), entry({ name: b }, '2')))).toEqual([[a, 'file'], [b, 'file']]);
  });

  it('keeps a new name that differs from a kept one only by case', async () => {
    const out = sink();
    await transformTar(streamOf(tarball(entry({ name: 'README.md' }, 'r'))), out, () => 'keep', { append: () => [{ header: { name: 'readme.md' }, data: 'x' } as NewEntry] });
    const seen: string[] = [];
    await transformTar(streamOf(out.bytes()), sink(), (e) => { seen.push(e.path); return 'keep'; });
    expect(seen).toEqual(['README.md', 'readme.md']);
  });

  it.each([
    ['a new file under a kept file', { header: { name: 'README.md/x' }, data: 'x' }, /is a file/],
    ['a new path leaving the tree', { header: { name: '../x' }, data: 'x' }, /unsafe entry name/],
    ['a new device', { header: { name: 'dev', type: 'fifo' as never } }, /entries are refused/],
    ['a new symlink out of the tree', { header: { name: 'l', type: 'symlink', linkname: '../..' } }, /points out/],
    ['a stream shorter than its size', { header: { name: 'short', size: 10 }, data: Readable.from([Buffer.from('abc')]) }, /does not match its declared size/],
  ])('refuses %s appended by the caller', async (_w, added, match) => {
    const append = (): NewEntry[] => [added as NewEntry];
    await refused(tarball(entry({ name: 'README.md' }, 'r')), { match }, () => 'keep', { append });
  });
});

describe('transformTar: #5-#8', () => {
  it.each([['a character device', '3'], ['a block device', '4'], ['a FIFO', '6'], ['a GNU sparse file', 'S']])('refuses %s', async (_w, type) => {
    await refused(tarball(ok, entry({ name: 'special', type })), { key: 'special', match: /entries are refused/ });
  });

  it('stops a gzip bomb on its ratio', async () => {
    const bomb = lazyTar(Buffer.alloc(0), { name: 'zeros', size: 7 * 1024 ** 3 }, 0);
    await refused(bomb.stream.pipe(createGzip({ level: 9 })), { match: /limit.*ratio/ }, () => 'drop');
    expect(bomb.produced()).toBeLessThan(256 * MiB);
  });

  it('applies maxEntries, maxTotalBytes and the path depth to the input', async () => {
    const files = Array.from({ length: 11 }, (_, i) => entry({ name: `f${i}` }));
    await refused(tarball(...files), { key: 'f10', match: /limit/ }, () => 'keep', { limits: { maxEntries: 10 } });
    await refused(tarball(entry({ name: 'a' }, Buffer.alloc(600)), entry({ name: 'b' }, Buffer.alloc(600))), { key: 'b', match: /limit/ }, () => 'drop', { limits: { maxTotalBytes: 1000 } });
    await refused(tarball(pax([['path', `${'d/'.repeat(1024)}f`]]), entry({ name: 'x' })), { match: /limit.*depth/ });
  });

  it('applies the limits to what the caller adds', async () => {
    const append = (): NewEntry[] => [{ header: { name: 'big' }, data: Buffer.alloc(2000) }];
    await refused(tarball(ok), { key: 'big', match: /limit/ }, () => 'keep', { append, limits: { maxTotalBytes: 1000 } });
  });

  it('refuses a huge PAX header early and a NUL in a PAX path', async () => {
    const huge = lazyTar(ok, { name: 'PaxHeader', type: 'x', size: 3.5 * MiB });
    await refused(huge.stream, { match: /limit/ });
    expect(huge.produced()).toBeLessThan(2 * MiB);
    await refused(tarball(ok, pax([['path', 'safe\u0000/../../x']]), entry({ name: 'innocent' })), { match: /control character/ });
  });

  it('refuses a truncated archive', async () => {
    const whole = gz(tarball(ok, entry({ name: 'data' }, randomBytes(100_000))));
    await refused(whole.subarray(0, whole.length >> 1), { match: /corrupt or truncated/ });
  });
});

describe('transformTar: failures that are not the archive\'s', () => {
  it('fails with the output\'s own code (EIO: Transient) and stops reading the input', async () => {
    const big = lazyTar(Buffer.alloc(0), { name: 'big.bin', size: 1024 ** 3 }, randomBytes(64 * 1024));
    const out = sink(4 * MiB);
    const err = await transformTar(big.stream, out, () => 'keep').catch((e: unknown) => e);
    expect(err).toMatchObject({ code: ErrorCode.Transient, message: expect.stringMatching(/writing the archive failed: EIO/) });
    expect(big.produced()).toBeLessThan(64 * MiB);
    expect(big.stream.destroyed).toBe(true);
  });

  it('passes through an edit\'s StorageError (an ifSha256 check) and wraps anything else as Unknown', async () => {
    const precondition = new StorageError(ErrorCode.PreconditionFailed, 'file changed');
    await refused(tarball(ok), { code: ErrorCode.PreconditionFailed }, () => { throw precondition; });
    await refused(tarball(ok), { code: ErrorCode.Unknown, match: /edit failed: oops/ }, () => { throw new Error('oops'); });
    await refused(tarball(ok), { code: ErrorCode.Unknown, match: /keeps/ }, async (e) => { for await (const c of e.data) void c; return 'keep' as const; });
  });

  it('fails Transient when aborted, and destroys both streams', async () => {
    const big = lazyTar(Buffer.alloc(0), { name: 'big.bin', size: 1024 ** 3 });
    const ac = new AbortController();
    let seen = 0;
    const out = new Writable({
      write(c: Buffer, _e, cb) {
        if ((seen += c.length) > 8 * MiB) ac.abort();
        cb();
      },
    });
    const err = await transformTar(big.stream, out, () => 'keep', { signal: ac.signal, gzip: false }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: ErrorCode.Transient, message: expect.stringMatching(/aborted/) });
    expect(big.stream.destroyed).toBe(true);
    expect(out.destroyed).toBe(true);
    expect(big.produced()).toBeLessThan(64 * MiB);
  });

  it('streams a 50 MiB entry through without holding it in memory', async () => {
    const noise = randomBytes(64 * 1024);
    let written = 0;
    const counting = () => new Writable({ write(c: Buffer, _e, cb) { written += c.length; cb(); } });
    await transformTar(lazyTar(Buffer.alloc(0), { name: 'warm', size: MiB }, noise).stream, counting(), () => 'keep');
    written = 0;
    const before = process.memoryUsage.rss();
    let peak = before;
    const sample = setInterval(() => { peak = Math.max(peak, process.memoryUsage.rss()); }, 5);
    try {
      const big = lazyTar(Buffer.alloc(0), { name: 'big.bin', size: 50 * MiB }, noise);
      expect(await transformTar(big.stream, counting(), () => 'keep')).toMatchObject({ kept: 1, bytes: 50 * MiB, gzip: false });
    } finally {
      clearInterval(sample);
    }
    expect(written).toBe(512 + 50 * MiB + 1024);
    expect(Math.max(peak, process.memoryUsage.rss()) - before).toBeLessThan(40 * MiB);
  });
});
