import { randomBytes, randomUUID } from 'node:crypto';
import { mkdir, readlink, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createGzip } from 'node:zlib';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { extractArchive } from '../../src/archive/extract.js';
import { ErrorCode } from '../../src/errors.js';
import { expectRefused } from './refused.js';
import { entry, exists, gnuLongName, gz, header, lazyTar, listAll, pax, sandbox, streamOf, tarball } from './tarballs.js';

// RELIABILITY.md rows 1-9. Every refusal also checks: no destination, no temp directory beside
// it, nothing else under the sandbox root (which is where `..` names would land).
let box: Awaited<ReturnType<typeof sandbox>>;
beforeEach(async () => { box = await sandbox(); });
afterEach(() => box.remove());

const ok = entry({ name: 'ok.txt' }, 'written before the bad entry');
const sentinel = `/tmp/stevedore-sentinel-${randomUUID()}`;

describe('extractArchive: #1 entry names that leave the destination', () => {
  it.each(['../../x', `${sentinel}/x`, `////${sentinel.slice(1)}/x`, 'a/../../x', 'C:../x', 'C:\\x', 'a\\..\\..\\x', '..', './../x'])(
    'refuses %j and writes nothing outside',
    async (name) => {
      const tar = tarball(ok, entry({ name }, 'evil'));
      await expectRefused(box, extractArchive(streamOf(tar), box.dest), { key: name, match: /unsafe entry name/, outside: [sentinel] });
    },
  );

  it('refuses the same names carried by PAX and GNU long-name headers', async () => {
    for (const tar of [
      tarball(ok, pax([['path', '../../x']]), entry({ name: 'innocent' }, 'evil')),
      tarball(ok, gnuLongName('a/../../x'), entry({ name: 'innocent' }, 'evil')),
    ]) {
      await expectRefused(box, extractArchive(streamOf(gz(tar)), box.dest), { match: /unsafe entry name/, outside: [sentinel] });
    }
  });

  it('refuses a name segment longer than the filesystem allows', async () => {
    const name = `dir/${'n'.repeat(300)}`;
    const tar = tarball(ok, pax([['path', name]]), entry({ name: 'short' }, 'x'));
    await expectRefused(box, extractArchive(streamOf(tar), box.dest), { key: name, match: /unusable path/ });
  });

  it('refuses control characters and names that are empty once "." is dropped', async () => {
    for (const name of ['a\u0001b', 'new\nline', '.', 'x/..']) {
      const tar = tarball(ok, entry({ name, type: '0' }, 'x'));
      await expectRefused(box, extractArchive(streamOf(tar), box.dest), { key: name, match: /unsafe entry name/ });
    }
  });
});

describe('extractArchive: #2 links', () => {
  it.each([
    ['an absolute symlink', entry({ name: 'l', type: '2', linkname: sentinel })],
    ['a symlink up the tree', entry({ name: 'l', type: '2', linkname: '../../x' })],
    ['a hardlink up the tree', entry({ name: 'h', type: '1', linkname: '../x' })],
    ['an absolute hardlink', entry({ name: 'h', type: '1', linkname: '/etc/passwd' })],
    ['a symlink that stays inside (all links are refused)', entry({ name: 'l', type: '2', linkname: 'ok.txt' })],
  ])('refuses %s, never following it', async (_what, link) => {
    const tar = tarball(ok, link, entry({ name: 'l/x' }, 'through the link'));
    await expectRefused(box, extractArchive(streamOf(tar), box.dest), { match: /link entries are refused/, outside: [sentinel] });
  });

  it('refuses a chain of symlinks at its first link', async () => {
    const tar = tarball(
      entry({ name: 'l1', type: '2', linkname: 'l2' }),
      entry({ name: 'l2', type: '2', linkname: '../..' }),
      entry({ name: 'l1/x' }, 'through the chain'),
    );
    await expectRefused(box, extractArchive(streamOf(gz(tar)), box.dest), { key: 'l1', match: /symlink entries are refused/ });
  });
});

describe('extractArchive: #3 directory replaced by a symlink', () => {
  it('refuses directory d, then symlink d, then file d/f, writing nothing through the link', async () => {
    const outside = join(box.root, 'outside');
    await mkdir(outside);
    const tar = tarball(
      entry({ name: 'd/', type: '5' }),
      entry({ name: 'd', type: '2', linkname: outside }),
      entry({ name: 'd/f' }, 'through the link'),
    );
    await expectRefused(box, extractArchive(streamOf(tar), box.dest), { key: 'd', match: /symlink entries are refused/, rootHolds: ['outside', 'staging'] });
    expect(await listAll(outside)).toEqual([]);
  });
});

describe('extractArchive: #4 colliding names', () => {
  it.each([
    ['names differing only in case', 'Readme.md', 'README.md'],
    ['NFC and NFD spellings of one name', 'caf\u00e9.txt', 'cafe\u0301.txt'],
    ['directories differing only in case', 'Docs/a', 'docs/b'],
    ['the Kelvin sign and k', 'K.txt', '\u212a.txt'],
  ])('refuses %s', async (_what, first, second) => {
    const tar = tarball(entry({ name: first }, 'one'), entry({ name: second }, 'two'));
    await expectRefused(box, extractArchive(streamOf(tar), box.dest), { key: second, match: /collides/ });
  });

  it('refuses a file used as a directory and a directory replaced by a file', async () => {
    for (const tar of [
      tarball(entry({ name: 'f' }, 'file'), entry({ name: 'f/x' }, 'under a file')),
      tarball(entry({ name: 'd/', type: '5' }), entry({ name: 'd' }, 'over a directory')),
    ]) {
      await expectRefused(box, extractArchive(streamOf(tar), box.dest));
    }
  });
});

describe('extractArchive: #5 special entries', () => {
  it.each([['a character device', '3'], ['a block device', '4'], ['a FIFO', '6'], ['an unknown type V', 'V'], ['a GNU sparse file', 'S']])(
    'refuses %s',
    async (_what, type) => {
      const tar = tarball(ok, entry({ name: 'special', type }));
      await expectRefused(box, extractArchive(streamOf(tar), box.dest), { key: 'special', match: /entries are refused/ });
    },
  );
});

describe('extractArchive: #6 bombs and size limits', () => {
  it('stops a gzip bomb on its ratio, long before its declared size', async () => {
    const bomb = lazyTar(Buffer.alloc(0), { name: 'zeros', size: 7 * 1024 ** 3 }, 0);
    const source = bomb.stream.pipe(createGzip({ level: 9 }));
    const err = await expectRefused(box, extractArchive(source, box.dest), { limit: true });
    expect(err.message).toMatch(/ratio/);
    expect(bomb.produced()).toBeLessThan(256 * 1024 ** 2);
  });

  it('refuses an archive over maxTotalBytes', async () => {
    const tar = tarball(entry({ name: 'a' }, Buffer.alloc(600)), entry({ name: 'b' }, Buffer.alloc(600)));
    await expectRefused(box, extractArchive(streamOf(tar), box.dest, { maxTotalBytes: 1000 }), { limit: true, key: 'b' });
  });

  it('refuses an entry over maxEntryBytes from its header, before writing it', async () => {
    const big = lazyTar(ok, { name: 'big', size: 4 * 1024 ** 3 });
    await expectRefused(box, extractArchive(big.stream, box.dest, { maxEntryBytes: 1024 ** 2 }), { limit: true, key: 'big' });
    expect(big.produced()).toBeLessThan(4 * 1024 ** 2);
  });

  it('refuses more entries than maxEntries', async () => {
    const files = Array.from({ length: 11 }, (_, i) => entry({ name: `f${i}` }));
    await expectRefused(box, extractArchive(streamOf(tarball(...files)), box.dest, { maxEntries: 10 }), { limit: true, key: 'f10' });
  });

  it('counts directories implied by file paths against maxEntries', async () => {
    const files = Array.from({ length: 5 }, (_, i) => entry({ name: `a${i}/b/c/f` }));
    await expectRefused(box, extractArchive(streamOf(tarball(...files)), box.dest, { maxEntries: 10 }), { limit: true, match: /paths/ });
  });

  it('refuses a path deeper than 1024 segments', async () => {
    const deep = `${'d/'.repeat(1024)}f`;
    const tar = tarball(pax([['path', deep]]), entry({ name: 'x' }, 'deep'));
    await expectRefused(box, extractArchive(streamOf(gz(tar)), box.dest), { limit: true, key: deep });
  });
});

describe('extractArchive: #7 oversized and poisoned headers', () => {
  it('refuses a PAX header just over maxHeaderBytes (checked exactly at the entry)', async () => {
    const tar = tarball(pax([['comment', 'x'.repeat(1024 ** 2 + 1000)]]), entry({ name: 'f' }, 'data'));
    await expectRefused(box, extractArchive(streamOf(tar), box.dest), { limit: true, key: 'f' });
  });

  it('stops reading a huge PAX header early, so memory stays bounded', async () => {
    const huge = lazyTar(ok, { name: 'PaxHeader', type: 'x', size: 3.5 * 1024 ** 2 });
    await expectRefused(box, extractArchive(huge.stream, box.dest), { limit: true });
    expect(huge.produced()).toBeLessThan(2 * 1024 ** 2);
  });

  it('refuses a header over tar-stream\'s own 4 MiB cap as a limit', async () => {
    const huge = lazyTar(Buffer.alloc(0), { name: 'PaxHeader', type: 'x', size: 1024 ** 3 });
    await expectRefused(box, extractArchive(huge.stream, box.dest, { maxHeaderBytes: 64 * 1024 ** 2 }), { limit: true });
    expect(huge.produced()).toBeLessThan(8 * 1024 ** 2);
  });

  it('refuses a huge GNU long name and a run of PAX headers that add up', async () => {
    const run = Array.from({ length: 20 }, () => pax([['comment', 'y'.repeat(100 * 1024)]]));
    for (const tar of [
      tarball(gnuLongName(`${'n'.repeat(2 * 1024 ** 2)}`), entry({ name: 'f' })),
      tarball(...run, entry({ name: 'f' })),
      tarball(ok, pax([['comment', 'z'.repeat(2 * 1024 ** 2)]], 'g'), entry({ name: 'f' })),
    ]) {
      await expectRefused(box, extractArchive(streamOf(tar), box.dest), { limit: true });
    }
  });

  it('refuses a NUL inside a PAX path', async () => {
    const tar = tarball(ok, pax([['path', 'safe\u0000/../../x']]), entry({ name: 'innocent' }, 'evil'));
    const err = await expectRefused(box, extractArchive(streamOf(tar), box.dest), { key: 'safe\u0000/../../x', match: /control character/ });
    expect(err.message).not.toMatch(/limit/);
  });
});

describe('extractArchive: #8 truncated and corrupt archives', () => {
  const content = tarball(ok, entry({ name: 'dir/data.bin' }, randomBytes(200_000)), entry({ name: 'last' }, 'end'));

  it.each([
    ['a tar.gz cut in half', () => gz(content).subarray(0, gz(content).length >> 1)],
    ['a tar.gz with flipped bytes', () => { const b = Buffer.from(gz(content)); for (let i = 100; i < 110; i++) b[i]! ^= 0xff; return b; }],
    ['a tar.gz missing its trailer', () => gz(content).subarray(0, -4)],
    ['a plain tar cut inside an entry', () => content.subarray(0, 100_000)],
    ['a plain tar with a bad header checksum', () => { const b = Buffer.from(content); b[1024 + 10] = 0x41; return b; }],
    ['bytes that are not an archive', () => Buffer.from('this is not a tarball at all, just text\n'.repeat(50))],
    ['an empty object', () => Buffer.alloc(0)],
  ])('refuses %s', async (_what, make) => {
    await expectRefused(box, extractArchive(streamOf(make()), box.dest), { match: /corrupt or truncated/ });
  });

  it('leaves the stored original untouched', async () => {
    const stored = join(box.root, 'stored.tar.gz');
    const bytes = gz(content).subarray(0, 5000);
    await writeFile(stored, bytes);
    const { createReadStream } = await import('node:fs');
    const { readFile } = await import('node:fs/promises');
    await expectRefused(box, extractArchive(createReadStream(stored), box.dest), { rootHolds: ['staging', 'stored.tar.gz'] });
    expect((await readFile(stored)).equals(bytes)).toBe(true);
  });
});

describe('extractArchive: #9 a destination that holds a planted symlink', () => {
  let outside: string;
  beforeEach(async () => {
    outside = join(box.root, 'outside');
    await mkdir(outside);
    await writeFile(join(outside, 'keep.txt'), 'not yours');
    await symlink(outside, box.dest);
  });

  it('refuses to extract over it (PreconditionFailed) and never writes through it', async () => {
    await expect(extractArchive(streamOf(tarball(ok)), box.dest)).rejects.toMatchObject({ code: ErrorCode.PreconditionFailed });
    expect(await readlink(box.dest)).toBe(outside);
    expect(await listAll(outside)).toEqual(['keep.txt']);
    expect(await listAll(box.parent)).toEqual(['out']);
  });

  it('with replace, swaps the link itself for the new tree; its target is untouched', async () => {
    const result = await extractArchive(streamOf(tarball(ok)), box.dest, { replace: true });
    expect(result.files).toBe(1);
    expect(await listAll(box.dest)).toEqual(['ok.txt']);
    expect(await listAll(outside)).toEqual(['keep.txt']);
    expect(await listAll(box.parent)).toEqual(['out', 'out/ok.txt']);
  });

  it('with replace and a hostile archive, leaves the planted link as it was', async () => {
    const tar = tarball(ok, entry({ name: '../x' }, 'evil'));
    const err = await extractArchive(streamOf(tar), box.dest, { replace: true }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: ErrorCode.InvalidInput });
    expect(await readlink(box.dest)).toBe(outside);
    expect(await listAll(outside)).toEqual(['keep.txt']);
    expect(await listAll(box.parent)).toEqual(['out']);
    expect(await exists(join(box.parent, 'x'))).toBe(false);
  });
});
