// The sweep never costs a live object its digest: not when an lstat fails with a real errno
// (only ENOENT and ENOTDIR mean gone), and not when a put stalled past the sweep age resumes
// while the sweep runs. lstat and unlink of node:fs/promises are wrapped to fail, or to pause,
// on demand; the filesystem is real.
import { readdir, utimes } from 'node:fs/promises';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { FsDriver, META_DIR } from '../../src/backends/fs.js';
import { ErrorCode } from '../../src/errors.js';
import { Bucket } from '../../src/storage/bucket.js';
import { codeOf, readAll, sha } from '../conformance/suite.js';
import { filesUnder } from '../harness/fs.js';
import { tempDir } from '../harness/process.js';

const hooks = vi.hoisted(() => ({
  /** lstat of this path fails with `code`. */
  lstatFault: undefined as { path: string; code: string } | undefined,
  /** Runs once, after the first unlink of a path under this folder succeeds, before the unlink returns. */
  afterUnlink: undefined as { under: string; run: () => Promise<void> } | undefined,
}));

vi.mock('node:fs/promises', async (importOriginal) => {
  const real = await importOriginal<typeof import('node:fs/promises')>();
  const lstat = (async (path: Parameters<typeof real.lstat>[0], opts?: Parameters<typeof real.lstat>[1]) => {
    const f = hooks.lstatFault;
    if (f && String(path) === f.path) throw Object.assign(new Error(`${f.code}: injected into lstat`), { code: f.code, syscall: 'lstat', path: String(path) });
    return real.lstat(path, opts);
  }) as typeof real.lstat;
  const unlink = async (path: Parameters<typeof real.unlink>[0]) => {
    await real.unlink(path);
    const h = hooks.afterUnlink;
    if (h && String(path).startsWith(h.under)) {
      hooks.afterUnlink = undefined;
      await h.run();
    }
  };
  return { ...real, lstat, unlink, default: { ...real, lstat, unlink } };
});

const HOUR_AGO = (Date.now() - 2 * 3600_000) / 1000;

describe('filesystem sweep under faults and stalls', () => {
  let dir: Awaited<ReturnType<typeof tempDir>>;
  let driver: FsDriver;
  let bucket: Bucket;
  beforeAll(async () => {
    dir = await tempDir('stevedore-fssweep-');
    driver = new FsDriver({ root: dir.path });
    bucket = new Bucket(driver);
  });
  afterAll(() => dir.remove());

  for (const code of ['EIO', 'ESTALE', 'EACCES']) {
    it(`an object whose lstat fails ${code} keeps its sidecar (its only digest)`, async () => {
      const key = `f/${code}`;
      const info = await bucket.put(key, Buffer.from(`live ${code}`));
      const meta = join(dir.path, 'f', META_DIR);
      // Every sidecar in the folder old enough to be judged.
      for (const f of await readdir(meta)) await utimes(join(meta, f), HOUR_AGO, HOUR_AGO);
      hooks.lstatFault = { path: join(dir.path, key), code };
      try {
        await driver.sweep(60_000);
      } finally {
        hooks.lstatFault = undefined;
      }
      const got = await bucket.get(key);
      expect((await readAll(got.stream)).toString()).toBe(`live ${code}`);
      expect(got.info.sha256).toBe(info.sha256);
    });
  }

  it('a put stalled past the sweep age never commits without its sidecar: the sweep wins the temp file and the put fails Transient', async () => {
    const key = 's/x';
    const meta = join(dir.path, 's', META_DIR);
    const body = new PassThrough();
    body.write(Buffer.from('first half, '));
    const put = bucket.put(key, body);
    put.catch(() => {});
    // Wait for the put's temp file and sidecar, then age them: a put stalled for two hours.
    let files: string[] = [];
    for (let i = 0; i < 200 && files.length < 2; i++) {
      files = await readdir(meta).catch(() => []);
      if (files.length < 2) await new Promise((r) => setTimeout(r, 10));
    }
    expect(files).toHaveLength(2);
    for (const f of files) await utimes(join(meta, f), HOUR_AGO, HOUR_AGO);
    // The put resumes and runs to its end in the middle of the sweep, right after the sweep's
    // first removal in this folder (the old sweep's was the sidecar, then the put's rename made
    // an object with no digest).
    let outcome: unknown;
    hooks.afterUnlink = {
      under: meta,
      run: async () => {
        body.end(Buffer.from('second half'));
        outcome = await put.then((i) => i, (e: unknown) => e);
      },
    };
    try {
      await driver.sweep(60_000);
    } finally {
      hooks.afterUnlink = undefined;
    }
    expect(outcome).toBeDefined();
    expect(await codeOf(put)).toBe(ErrorCode.Transient);
    expect(await codeOf(bucket.stat(key))).toBe(ErrorCode.NotFound);
    expect((await filesUnder(dir.path)).filter((f) => f.startsWith('s/'))).toEqual([]);
    // And a put that is not stalled commits with its digest, sweep or not.
    await bucket.put(key, Buffer.from('whole'));
    await driver.sweep(60_000);
    expect((await bucket.stat(key)).sha256).toBe(sha(Buffer.from('whole')));
  });
});
