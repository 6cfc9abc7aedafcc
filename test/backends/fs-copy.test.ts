// Requirement: a filesystem tree copied by ordinary tools serves the same digests. The copies are
// made by the real cp, rsync and GNU tar.
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { link, lstat, mkdir, readdir, readFile, truncate, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FsDriver, META_DIR } from '../../src/backends/fs.js';
import { ErrorCode } from '../../src/errors.js';
import { Bucket } from '../../src/storage/bucket.js';
import { codeOf, readAll, sha } from '../conformance/suite.js';
import { filesUnder } from '../harness/fs.js';
import { tempDir } from '../harness/process.js';

const run = promisify(execFile);

/** Each tool copies the tree `src` to `dst` (which does not exist yet). */
const TOOLS: Record<string, (src: string, dst: string, scratch: string) => Promise<unknown>> = {
  'cp -a': (src, dst) => run('cp', ['-a', src, dst]),
  'rsync -a': (src, dst) => run('rsync', ['-a', `${src}/`, `${dst}/`]),
  'GNU tar (c, then x into another folder)': async (src, dst, scratch) => {
    const archive = join(scratch, `tree-${Date.now()}.tar`);
    await run('tar', ['-cf', archive, '-C', src, '.']);
    await mkdir(dst);
    await run('tar', ['-xf', archive, '-C', dst]);
  },
  'cp -r (mtimes lost)': (src, dst) => run('cp', ['-r', src, dst]),
};

const OBJECTS: Record<string, Buffer> = {
  'top': Buffer.from('at the root'),
  'a/one.bin': Buffer.alloc(300_000, 'x'),
  'a/two.txt': Buffer.from('two'),
  'b/c/deep': Buffer.from('deep down'),
  'b/c/empty': Buffer.alloc(0),
};

describe('a copied filesystem tree keeps its digests', () => {
  let dir: Awaited<ReturnType<typeof tempDir>>;
  let src: string;
  beforeEach(async () => {
    dir = await tempDir('stevedore-fscopy-');
    src = join(dir.path, 'src');
    const b = new Bucket(new FsDriver({ root: src }));
    for (const [k, v] of Object.entries(OBJECTS)) await b.put(k, v, { contentType: 'text/plain', metadata: { build: '7' } });
    await b.put('a/one.bin', OBJECTS['a/one.bin']!); // overwritten once: a new inode and sidecar
  });
  afterEach(() => dir.remove());

  for (const [tool, copy] of Object.entries(TOOLS)) {
    it(`${tool}: stat, list and a verified get serve the same digests, after a sweep too; a flipped byte is ChecksumMismatch`, async () => {
      const dst = join(dir.path, 'dst');
      await copy(src, dst, dir.path);
      const driver = new FsDriver({ root: dst });
      const bucket = new Bucket(driver);
      // The sweep first: before, it took every copied sidecar for an orphan.
      await driver.sweep(0);
      for (const [k, v] of Object.entries(OBJECTS)) {
        const info = await bucket.stat(k);
        expect(info.sha256, `${k} stat`).toBe(sha(v));
        expect(info.contentType, k).toBe(k === 'a/one.bin' ? 'application/octet-stream' : 'text/plain');
        const got = await bucket.get(k);
        expect(sha(await readAll(got.stream)), k).toBe(sha(v));
        expect(got.info.sha256, `${k} get`).toBe(sha(v));
      }
      const listed = new Map<string, string | undefined>();
      for await (const o of bucket.list('')) listed.set(o.key, o.sha256);
      expect(Object.fromEntries(listed)).toEqual(Object.fromEntries(Object.entries(OBJECTS).map(([k, v]) => [k, sha(v)])));
      // Adopted: a second sweep, and a fresh driver, still find every digest; one sidecar per object.
      await driver.sweep(0);
      const fresh = new Bucket(new FsDriver({ root: dst }));
      for (const [k, v] of Object.entries(OBJECTS)) expect((await fresh.stat(k)).sha256, k).toBe(sha(v));
      expect((await filesUnder(dst)).filter((f) => f.includes(`${META_DIR}/`))).toHaveLength(Object.keys(OBJECTS).length);

      // Bit rot in the copy, same size, in place.
      const rotten = Buffer.from(OBJECTS['a/one.bin']!);
      rotten[1234] = rotten[1234]! ^ 1;
      await writeFile(join(dst, 'a/one.bin'), rotten, { flag: 'r+' });
      expect(await codeOf(fresh.get('a/one.bin').then((g) => readAll(g.stream)))).toBe(ErrorCode.ChecksumMismatch);
    }, 30_000);
  }

  it('the sweep still removes what no object uses in a copied tree: a deleted object\'s sidecar, a stale ifMatch claim', async () => {
    const dst = join(dir.path, 'dst');
    await run('cp', ['-a', src, dst]);
    const driver = new FsDriver({ root: dst });
    const bucket = new Bucket(driver);
    await bucket.delete('a/two.txt'); // its copied sidecar was never adopted
    const claim = join(dst, META_DIR, `if-${'0'.repeat(32)}.12345`);
    await link(join(dst, 'top'), claim); // as a writer killed between its claim and its commit leaves it
    await new Promise((r) => setTimeout(r, 20));
    expect(await driver.sweep(0)).toBeGreaterThanOrEqual(2);
    const left = Object.keys(OBJECTS).filter((k) => k !== 'a/two.txt');
    for (const k of left) expect((await bucket.stat(k)).sha256, k).toBe(sha(OBJECTS[k]!));
    const files = await filesUnder(dst);
    expect(files.filter((f) => f.includes(`${META_DIR}/`))).toHaveLength(left.length);
    expect(files.filter((f) => !f.includes(`${META_DIR}/`)).sort()).toEqual([...left].sort());
  });

  it('picks the sidecar whose recorded mtime matches among several of one name and size, and trusts none when they disagree and no mtime tells', async () => {
    const key = 'a/two.txt';
    const meta = join(src, 'a', META_DIR);
    const own = (await readdir(meta)).find((f) => f.endsWith('.json') && (JSON.parse(readFileSync(join(meta, f), 'utf8')) as { key: string }).key === key);
    // A leftover of an older version of the same size (another digest, another mtime), as a
    // killed writer may leave it.
    const rec = JSON.parse(await readFile(join(meta, own!), 'utf8')) as { sha256: string; mtimeNs: string };
    const stale = { ...rec, sha256: sha(Buffer.from('owt')), mtimeNs: String(BigInt(rec.mtimeNs) - 5_000_000_000n) };
    await writeFile(join(meta, `${own!.split('.')[0]}.999999999.json`), JSON.stringify(stale));
    const old = new Date(Date.now() - 3_600_000);
    await utimes(join(meta, `${own!.split('.')[0]}.999999999.json`), old, old);

    for (const [tool, copy] of Object.entries(TOOLS)) {
      const dst = join(dir.path, `dst-${tool.split(' ')[0]}-${tool.length}`);
      await copy(src, dst, dir.path);
      const info = await new Bucket(new FsDriver({ root: dst })).stat(key);
      if (tool.startsWith('cp -r')) expect(info.sha256, tool).toBeUndefined(); // two candidates, no mtime to tell: never a guess
      else expect(info.sha256, tool).toBe(sha(OBJECTS[key]!));
    }
  }, 30_000);

  it('a restore whose object got an inode that already has another version\'s sidecar takes the copied one that matches; without one, a full read fails', async () => {
    const dst = join(dir.path, 'dst');
    await run('cp', ['-a', src, dst]);
    const key = 'a/two.txt';
    const meta = join(dst, 'a', META_DIR);
    const copied = (await readdir(meta)).find((f) => f.endsWith('.json') && (JSON.parse(readFileSync(join(meta, f), 'utf8')) as { key: string }).key === key)!;
    const ino = (await lstat(join(dst, key), { bigint: true })).ino;
    // What the inode number's earlier holder left under it: the same name, another size and digest.
    const other = { key, sha256: sha(Buffer.from('another version')), size: 15, metadata: {} };
    const under = `${copied.split('.')[0]}.${ino}.json`;
    await writeFile(join(meta, under), JSON.stringify(other));
    const bucket = new Bucket(new FsDriver({ root: dst }));
    expect((await bucket.stat(key)).sha256).toBe(sha(OBJECTS[key]!));
    const got = await bucket.get(key);
    expect(await readAll(got.stream)).toEqual(OBJECTS[key]);
    expect(got.info.sha256).toBe(sha(OBJECTS[key]!));
    // Adopted in its place: the next read takes the fast path to the right digest.
    expect((JSON.parse(await readFile(join(meta, under), 'utf8')) as { size: number }).size).toBe(OBJECTS[key]!.length);
    // A sidecar of the object's own inode that no longer matches, and nothing copied to take
    // instead (a truncation in place): the full read fails, it never passes unverified.
    expect((await bucket.stat('b/c/deep')).sha256).toBe(sha(OBJECTS['b/c/deep']!)); // adopted: its own inode's now
    await truncate(join(dst, 'b/c/deep'), 4);
    expect(await codeOf(bucket.get('b/c/deep').then((g) => readAll(g.stream)))).toBe(ErrorCode.ChecksumMismatch);
  });

  it('never gives a reader of a copied object another version\'s digest while writers replace it (racing puts, same size)', async () => {
    const key = 'race/k';
    const size = 64 * 1024;
    const version = (i: number) => Buffer.alloc(size, i % 251);
    await new Bucket(new FsDriver({ root: src })).put(key, version(0));
    for (let round = 0; round < 12; round++) {
      const dst = join(dir.path, `race-${round}`);
      // cp -r: no mtime tells the sidecars apart, only the protocol does.
      await run('cp', ['-r', src, dst]);
      const bucket = new Bucket(new FsDriver({ root: dst }));
      const writers = Array.from({ length: 3 }, (_, w) => (async () => {
        for (let i = 1; i <= 4; i++) await bucket.put(key, version(round * 20 + w * 5 + i));
      })());
      const readers = Array.from({ length: 4 }, () => (async () => {
        for (let i = 0; i < 15; i++) {
          const got = await bucket.get(key);
          const bytes = await readAll(got.stream);
          expect(got.info.sha256).toBe(sha(bytes));
        }
      })());
      await Promise.all([...writers, ...readers]);
    }
  }, 60_000);
});
