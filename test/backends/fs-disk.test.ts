import { spawn } from 'node:child_process';
import { mkdir, rename, symlink, truncate, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { FsDriver, META_DIR } from '../../src/backends/fs.js';
import { ErrorCode } from '../../src/errors.js';
import { Bucket } from '../../src/storage/bucket.js';
import type { ObjectInfo } from '../../src/storage/driver.js';
import { codeOf, collectKeys, readAll, sha } from '../conformance/suite.js';
import { filesUnder } from '../harness/fs.js';
import { tempDir } from '../harness/process.js';

async function collect(b: Bucket): Promise<ObjectInfo[]> {
  const out: ObjectInfo[] = [];
  for await (const o of b.list('')) out.push(o);
  return out;
}

describe('filesystem backend on disk', () => {
  let dir: Awaited<ReturnType<typeof tempDir>>;
  let root: string;
  let bucket: Bucket;
  let driver: FsDriver;
  beforeEach(async () => {
    dir = await tempDir('stevedore-fsdisk-');
    root = join(dir.path, 'root');
    driver = new FsDriver({ root });
    bucket = new Bucket(driver);
  });
  afterEach(() => dir.remove());

  it('keeps an object as a plain file at <root>/<key>, metadata in a hidden sidecar', async () => {
    await bucket.put('sites/web/artifacts/1.tar.gz', Buffer.from('artifact'), { metadata: { build: '1' } });
    const files = await filesUnder(root);
    expect(files).toContain('sites/web/artifacts/1.tar.gz');
    expect(files.filter((f) => f.includes(`${META_DIR}/`))).toHaveLength(1);
    expect(files).toHaveLength(2);
  });

  // A body announced smaller than one chunk takes the short write path (write.ts writeSmall).
  it('stores nothing from a small stream longer or shorter than its announced size, and keeps the old object', async () => {
    await bucket.put('k', Buffer.from('old'));
    for (const [announced, actual] of [[5, 'six by'], [7, 'six by']] as const) {
      expect(await codeOf(bucket.put('k', Readable.from([Buffer.from(actual)]), { size: announced }))).toBe(ErrorCode.ChecksumMismatch);
      expect((await readAll((await bucket.get('k')).stream)).toString()).toBe('old');
    }
    // Nothing left but the object and its sidecar: no temp file, no stray sidecar.
    expect(await filesUnder(root)).toHaveLength(2);
    const small = await bucket.put('k', Readable.from([Buffer.from('six '), Buffer.from('by')]), { size: 6 });
    expect(small.sha256).toBe(sha(Buffer.from('six by')));
    expect((await readAll((await bucket.get('k')).stream)).toString()).toBe('six by');
  });

  it('never shows the temp file of a writer killed with -9, and sweeps it', async () => {
    const child = spawn(process.execPath, ['--import', 'tsx', 'test/fixtures/slow-put.ts', root, 'big/object.bin'], { stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise<void>((resolve, reject) => {
      child.stdout.on('data', (b: Buffer) => { if (b.toString().includes('writing')) resolve(); });
      child.once('exit', (code) => reject(new Error(`writer exited early with ${code}`)));
    });
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));

    const leftovers = (await filesUnder(root)).filter((f) => f.includes('/tmp-'));
    expect(leftovers).toHaveLength(1);
    expect(await collectKeys(bucket)).toEqual([]);
    expect(await codeOf(bucket.stat('big/object.bin'))).toBe(ErrorCode.NotFound);

    // The writer also left the sidecar it creates at the start of a put, still empty.
    const unfinished = (await filesUnder(root)).filter((f) => f.endsWith('.json'));
    expect(unfinished).toHaveLength(1);

    expect(await driver.sweep(60_000)).toBe(0); // fresh: might still be a live writer
    const old = new Date(Date.now() - 2 * 60_000);
    // An old sidecar next to a temp file still being written is that writer's, and stays.
    await utimes(join(root, unfinished[0]!), old, old);
    expect(await driver.sweep(60_000)).toBe(0);
    await utimes(join(root, leftovers[0]!), old, old);
    expect(await driver.sweep(60_000)).toBe(2);
    expect(await filesUnder(root)).toEqual([]);
  }, 30_000);

  it('sweeps the sidecar of an object replaced or deleted behind its back', async () => {
    await bucket.put('a/k', Buffer.from('one'));
    // Another size: the old sidecar cannot describe it (a same-size overwrite is the next test).
    await writeFile(join(root, 'a/k.new'), 'three');
    await rename(join(root, 'a/k.new'), join(root, 'a/k')); // another tool replaced the file
    const sidecar = (await filesUnder(root)).find((f) => f.includes(META_DIR))!;
    const old = new Date(Date.now() - 2 * 60_000);
    await utimes(join(root, sidecar), old, old);
    expect(await driver.sweep(60_000)).toBe(1);
    expect(await filesUnder(root)).toEqual(['a/k']);
  });

  it('reads a same-size overwrite by another tool as a checksum mismatch, not as good', async () => {
    await bucket.put('a/k', Buffer.from('one'));
    await writeFile(join(root, 'a/k.new'), 'two');
    await rename(join(root, 'a/k.new'), join(root, 'a/k')); // new inode, same name and size
    const got = await bucket.get('a/k');
    expect(got.info.sha256).toBe(sha(Buffer.from('one')));
    expect(await codeOf(readAll(got.stream))).toBe(ErrorCode.ChecksumMismatch);
  });

  it('serves a file dropped in by another tool, without a digest', async () => {
    await mkdir(join(root, 'drop'), { recursive: true });
    await writeFile(join(root, 'drop/in.txt'), 'by hand');
    const got = await bucket.get('drop/in.txt');
    expect(got.info.sha256).toBeUndefined();
    expect((await readAll(got.stream)).toString()).toBe('by hand');
    expect(await collectKeys(bucket)).toEqual(['drop/in.txt']);
  });

  it('a listing of a folder another tool wrote shows the digests of a first put that raced it', async () => {
    await mkdir(join(root, 'drop'), { recursive: true });
    await writeFile(join(root, 'drop/a.txt'), 'by hand');
    await writeFile(join(root, 'drop/b.txt'), 'by hand too');
    // Another process's first put lands while this listing stats the folder's files (no META_DIR when it read the folder).
    const writer = new Bucket(new FsDriver({ root }));
    const proto = FsDriver.prototype as unknown as { bareStat(key: string): Promise<unknown> };
    const bareStat = proto.bareStat;
    let raced = false;
    const spy = vi.spyOn(proto, 'bareStat').mockImplementation(async function (this: unknown, key: string) {
      if (!raced) {
        raced = true;
        await writer.put('drop/b.txt', Buffer.from('ours'));
      }
      return bareStat.call(this, key);
    });
    try {
      expect((await collect(bucket)).map((o) => [o.key, o.sha256])).toEqual([['drop/a.txt', undefined], ['drop/b.txt', sha(Buffer.from('ours'))]]);
    } finally {
      spy.mockRestore();
    }
    expect(raced).toBe(true);
  });

  it('finds the digest of a first put into a folder another tool wrote at once, though reads of that folder just found no metadata', async () => {
    await mkdir(join(root, 'drop'), { recursive: true });
    await writeFile(join(root, 'drop/a.txt'), 'by hand');
    await writeFile(join(root, 'drop/b.txt'), 'by hand too');
    expect((await bucket.get('drop/a.txt')).info.sha256).toBeUndefined();
    expect((await bucket.stat('drop/b.txt')).sha256).toBeUndefined();
    expect((await collect(bucket)).map((o) => o.sha256)).toEqual([undefined, undefined]);
    // Within the second the folder's check is cached (no metadata folder then): a put by another
    // process (its own driver, so this one's cache learns nothing) makes one.
    const writer = new Bucket(new FsDriver({ root }));
    await writer.put('drop/b.txt', Buffer.from('ours'));
    await writer.put('drop/c.txt', Buffer.from('ours too'));
    expect((await bucket.get('drop/b.txt')).info.sha256).toBe(sha(Buffer.from('ours')));
    expect((await bucket.stat('drop/c.txt')).sha256).toBe(sha(Buffer.from('ours too')));
    expect((await collect(bucket)).map((o) => [o.key, o.sha256])).toEqual([
      ['drop/a.txt', undefined], ['drop/b.txt', sha(Buffer.from('ours'))], ['drop/c.txt', sha(Buffer.from('ours too'))],
    ]);
    expect((await readAll((await bucket.get('drop/a.txt')).stream)).toString()).toBe('by hand');
  });

  it('catches a truncated file as a checksum mismatch', async () => {
    await bucket.put('t', Buffer.alloc(10_000, 1));
    await truncate(join(root, 't'), 5000);
    expect(await codeOf(bucket.get('t').then((g) => readAll(g.stream)))).toBe(ErrorCode.ChecksumMismatch);
  });

  it('refuses keys that use its reserved folder name', async () => {
    expect(await codeOf(bucket.put(`a/${META_DIR}/x`, Buffer.from('x')))).toBe(ErrorCode.InvalidInput);
    expect(await codeOf(bucket.get(`${META_DIR}/x`))).toBe(ErrorCode.InvalidInput);
  });

  it('never writes or reads through a symlink out of the root', async () => {
    const outside = join(dir.path, 'outside');
    await mkdir(outside);
    await mkdir(root, { recursive: true });
    await symlink(outside, join(root, 'link'));
    await writeFile(join(outside, 'secret'), 'secret');
    await symlink(join(outside, 'secret'), join(root, 'file-link'));
    expect(await codeOf(bucket.put('link/x', Buffer.from('x')))).toBe(ErrorCode.PermissionDenied);
    expect(await codeOf(bucket.get('link/secret'))).toBe(ErrorCode.PermissionDenied);
    expect(await codeOf(bucket.get('file-link'))).toBe(ErrorCode.InvalidInput);
    expect(await filesUnder(outside)).toEqual(['secret']);
    expect(await collectKeys(bucket)).toEqual([]);
  });

  it('catches a folder swapped for a symlink once the second its check is trusted has passed', async () => {
    const outside = join(dir.path, 'outside');
    await mkdir(outside);
    await bucket.put('swapped/a', Buffer.from('a'));
    // Checked once, the folder is trusted for a second; after that the swap is seen.
    await rename(join(root, 'swapped'), join(dir.path, 'moved-away'));
    await symlink(outside, join(root, 'swapped'));
    await new Promise((r) => setTimeout(r, 1100));
    expect(await codeOf(bucket.put('swapped/b', Buffer.from('b')))).toBe(ErrorCode.PermissionDenied);
    expect(await codeOf(bucket.get('swapped/a'))).toBe(ErrorCode.PermissionDenied);
    expect(await filesUnder(outside)).toEqual([]);
  });

  it('reports a key that needs a folder where an object is as InvalidInput', async () => {
    await bucket.put('a', Buffer.from('x'));
    expect(await codeOf(bucket.put('a/b', Buffer.from('y')))).toBe(ErrorCode.InvalidInput);
    expect(sha(await readAll((await bucket.get('a')).stream))).toBe(sha(Buffer.from('x')));
  });
});
