// A store payload's `source.consume`: the filesystem backend takes the staged file's inode for the
// object (linked, hashed by one read) and keeps every guarantee of a copy; when the link cannot be
// made (another filesystem, forced here by an injected EXDEV) it copies as before.
import { createHash, randomBytes } from 'node:crypto';
import { appendFile, lstat, mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { store } from '../../jobs/store.js';
import { FsDriver, META_DIR } from '../../src/backends/fs.js';
import { ErrorCode } from '../../src/errors.js';
import type { JobDeps } from '../../src/payload.js';
import { Staging } from '../../src/staging.js';
import { SourceBody, openFile } from '../../src/storage/body.js';
import { Bucket } from '../../src/storage/bucket.js';
import { readAll } from '../conformance/suite.js';
import { tempDir } from '../harness/process.js';

/** link() of a file under `from` fails with `code` while set (everything else is the real filesystem). */
const fault = vi.hoisted(() => ({ from: undefined as string | undefined, code: 'EXDEV', calls: 0 }));
vi.mock('node:fs/promises', async (importOriginal) => {
  const real = await importOriginal<typeof import('node:fs/promises')>();
  const link = async (src: string, dst: string) => {
    if (fault.from !== undefined && String(src).startsWith(fault.from)) {
      fault.calls++;
      throw Object.assign(new Error(`${fault.code}: injected into link`), { code: fault.code, syscall: 'link' });
    }
    return real.link(src, dst);
  };
  return { ...real, link, default: { ...real, link } };
});

const SIZE = 3 * 1024 * 1024 + 17;
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

describe('store with source.consume on the filesystem backend', () => {
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let stagingDir: string;
  let staging: Staging;
  let root: string;
  let driver: FsDriver;
  let bucket: Bucket;
  let n = 0;

  beforeAll(async () => {
    tmp = await tempDir();
    stagingDir = join(tmp.path, 'staging');
    await mkdir(stagingDir, { recursive: true });
    staging = new Staging(stagingDir);
    root = join(tmp.path, 'objects');
    driver = new FsDriver({ root });
    bucket = new Bucket(driver, { name: 'fs' });
  });
  afterAll(async () => {
    await tmp?.remove();
  });

  const deps = (): JobDeps => ({
    bucket: () => bucket, staging, log: pino({ level: 'silent' }), signal: new AbortController().signal,
    progress: () => {}, enqueuedAt: Date.now(), jobId: `job-${++n}`, limits: { maxInlineBytes: 1024 },
  });
  /** A fresh staged file of random bytes. */
  async function stage(): Promise<{ rel: string; abs: string; bytes: Buffer; ino: number }> {
    const bytes = randomBytes(SIZE);
    const rel = `up-${++n}`;
    const abs = join(stagingDir, rel);
    await writeFile(abs, bytes);
    return { rel, abs, bytes, ino: (await lstat(abs)).ino };
  }
  const objectPath = (key: string) => join(root, key);
  /** Temp files and sidecars in a key's META_DIR. */
  const metaFiles = async (key: string) => readdir(join(root, key, '..', META_DIR)).catch(() => [] as string[]);
  async function expectStored(key: string, bytes: Buffer): Promise<void> {
    const got = await bucket.get(key);
    expect(sha(await readAll(got.stream))).toBe(sha(bytes));
    expect((await bucket.stat(key)).sha256).toBe(sha(bytes));
    expect((await metaFiles(key)).filter((f) => f.startsWith('tmp-'))).toEqual([]);
  }

  it('links the staged file: the object is its inode, verified, and the staged name is left to its producer', async () => {
    const s = await stage();
    const key = 'sites/linked/artifact.tar.gz';
    const out = await store({ backend: 'fs', key, source: { path: s.rel, consume: true } }, deps());
    expect(out).toEqual({ backend: 'fs', key, size: SIZE, sha256: sha(s.bytes) });
    const st = await lstat(objectPath(key));
    expect(st.ino).toBe(s.ino);
    expect(st.nlink).toBe(2); // the object and the staged name, which the producer removes
    await expectStored(key, s.bytes);
    // Exactly one sidecar, the object's: a sweep finds nothing to remove and the digest stays.
    expect(await metaFiles(key)).toHaveLength(1);
    expect(await driver.sweep(0)).toBe(0);
    expect((await bucket.stat(key)).sha256).toBe(sha(s.bytes));
  });

  it('without consume copies: the staged file is untouched, on an inode of its own', async () => {
    const s = await stage();
    const key = 'sites/copied/artifact.tar.gz';
    await store({ backend: 'fs', key, source: { path: s.rel } }, deps());
    const st = await lstat(objectPath(key));
    expect(st.ino).not.toBe(s.ino);
    expect((await lstat(s.abs)).nlink).toBe(1);
    expect(sha(await readFile(s.abs))).toBe(sha(s.bytes));
    await expectStored(key, s.bytes);
  });

  it('a wrong sha256 stores nothing and leaves the staged file as it was', async () => {
    const s = await stage();
    const key = 'sites/wrong/artifact.tar.gz';
    await expect(store({ backend: 'fs', key, sha256: 'b'.repeat(64), source: { path: s.rel, consume: true } }, deps()))
      .rejects.toMatchObject({ code: ErrorCode.ChecksumMismatch });
    await expect(lstat(objectPath(key))).rejects.toMatchObject({ code: 'ENOENT' });
    expect(await metaFiles(key)).toEqual([]);
    expect((await lstat(s.abs)).nlink).toBe(1);
  });

  it('an existing key is replaced by the staged inode, and a redelivered job copies rather than share it again', async () => {
    const key = 'sites/replaced/artifact.tar.gz';
    await store({ backend: 'fs', key, source: { path: (await stage()).rel } }, deps());
    const s = await stage();
    await store({ backend: 'fs', key, source: { path: s.rel, consume: true } }, deps());
    expect((await lstat(objectPath(key))).ino).toBe(s.ino);
    await expectStored(key, s.bytes);
    // The same job again (its first run's answer lost): the inode already has two names, so it is copied.
    await store({ backend: 'fs', key, source: { path: s.rel, consume: true } }, deps());
    const st = await lstat(objectPath(key));
    expect(st.ino).not.toBe(s.ino);
    expect(st.nlink).toBe(1);
    expect((await lstat(s.abs)).nlink).toBe(1);
    await expectStored(key, s.bytes);
    expect(await metaFiles(key)).toHaveLength(1);
  });

  it.each(['EXDEV', 'EPERM'])('copies as before when the link fails with %s (another filesystem; a file not ours to link)', async (code) => {
    const s = await stage();
    const key = `sites/fallback-${code}/artifact.tar.gz`;
    Object.assign(fault, { from: stagingDir, code, calls: 0 });
    try {
      await store({ backend: 'fs', key, source: { path: s.rel, consume: true } }, deps());
    } finally {
      fault.from = undefined;
    }
    expect(fault.calls).toBe(1);
    expect((await lstat(objectPath(key))).ino).not.toBe(s.ino);
    expect((await lstat(s.abs)).nlink).toBe(1);
    await expectStored(key, s.bytes);
  });

  it('a file that grew after it was measured fails and stores nothing', async () => {
    const s = await stage();
    const key = 'sites/grew/artifact.tar.gz';
    const open = await openFile(s.abs);
    try {
      await appendFile(s.abs, 'more');
      const body = new SourceBody({ open }, undefined, open.size, { size: open.size, op: 'put', key });
      await expect(driver.put(key, body, { contentType: undefined, metadata: {}, ifAbsent: false, signal: undefined, consumable: open }))
        .rejects.toMatchObject({ code: ErrorCode.ChecksumMismatch });
      await body.close();
    } finally {
      await open.file.close();
    }
    await expect(lstat(objectPath(key))).rejects.toMatchObject({ code: 'ENOENT' });
    expect(await metaFiles(key)).toEqual([]);
    expect((await lstat(s.abs)).nlink).toBe(1);
  });
});
