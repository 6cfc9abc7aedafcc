// RELIABILITY.md #20, the SQLite way: fail the Nth I/O call of a filesystem put, for every N, and
// check what must hold after each. The calls are our own fd layer and node:fs/promises, wrapped to
// fail once on demand with a real errno; everything else is the real filesystem.
import { readdirSync } from 'node:fs';
import { lstat, mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { FsDriver, META_DIR } from '../../src/backends/fs.js';
import { ErrorCode, StorageError } from '../../src/errors.js';
import { Bucket } from '../../src/storage/bucket.js';
import { readAll, sha } from '../conformance/suite.js';
import { filesUnder } from '../harness/fs.js';
import { tempDir } from '../harness/process.js';

const io = vi.hoisted(() => {
  const state = {
    armed: false,
    count: 0,
    failAt: 0,
    code: 'EIO',
    /** Every armed call, with its descriptor (for open, the one it returned) or its path. */
    calls: [] as { name: string; fd?: number; path?: string }[],
  };
  /** `after`: the call takes effect, then reports the error, as close() does on Linux (the descriptor is freed). */
  const wrap = <A extends unknown[], R>(name: string, f: (...a: A) => Promise<R>, after = false) => async (...a: A): Promise<R> => {
    if (state.armed) {
      state.calls.push({ name, ...(typeof a[0] === 'number' ? { fd: a[0] } : {}), ...(typeof a[0] === 'string' ? { path: a[0] } : {}) });
      if (++state.count === state.failAt) {
        if (after) await f(...a);
        throw Object.assign(new Error(`${state.code}: injected into ${name}`), { code: state.code, syscall: name });
      }
    }
    const result = await f(...a);
    // Which path an fd belongs to, for checks of what was fsynced.
    if (state.armed && name === 'open' && typeof result === 'number') state.calls[state.calls.length - 1]!.fd = result;
    return result;
  };
  return { state, wrap };
});

vi.mock('../../src/storage/fd.js', async (importOriginal) => {
  const real = await importOriginal<typeof import('../../src/storage/fd.js')>();
  return {
    ...real,
    openFd: io.wrap('open', real.openFd),
    closeFd: io.wrap('close', real.closeFd, true),
    fsyncFd: io.wrap('fsync', real.fsyncFd),
    fdatasyncFd: io.wrap('fdatasync', real.fdatasyncFd),
    fstatFd: io.wrap('fstat', real.fstatFd),
    writeFully: io.wrap('write', real.writeFully),
    futimesFd: io.wrap('futimes', real.futimesFd),
  };
});

vi.mock('node:fs/promises', async (importOriginal) => {
  const real = await importOriginal<typeof import('node:fs/promises')>();
  const names = ['link', 'lstat', 'mkdir', 'rename', 'unlink', 'realpath'] as const;
  const wrapped = Object.fromEntries(names.map((n) => [n, io.wrap(n, real[n] as (...a: unknown[]) => Promise<unknown>)]));
  return { ...real, ...wrapped, default: { ...real, ...wrapped } };
});

/** Descriptors open in this process (Linux). */
const openFds = () => readdirSync('/proc/self/fd').length;

describe('filesystem put with the Nth I/O call failing (RELIABILITY #20)', () => {
  let dir: Awaited<ReturnType<typeof tempDir>>;
  beforeAll(async () => { dir = await tempDir('stevedore-fsfaults-'); });
  afterAll(() => dir.remove());

  const OLD = Buffer.from('the old object, whole');
  const NEW = Buffer.alloc(3 * 1024 * 1024 + 17, 'n'); // several write chunks

  async function armedPut(bucket: Bucket, key: string, failAt: number, code = 'EIO'): Promise<unknown> {
    Object.assign(io.state, { armed: true, count: 0, failAt, code, calls: [] });
    try {
      await bucket.put(key, NEW);
      return undefined;
    } catch (err) {
      return err;
    } finally {
      io.state.armed = false;
    }
  }

  it('never shows a torn object, leaves no temp file or open descriptor, fails Transient, and never fsyncs a descriptor again after its fsync failed', async () => {
    const root = join(dir.path, 'nth');
    const driver = new FsDriver({ root });
    const bucket = new Bucket(driver);
    await bucket.put('probe/k', OLD);
    await armedPut(bucket, 'probe/k', 0);
    const total = io.state.count;
    expect(total).toBeGreaterThan(8);

    const outcomes = new Map<string, number>();
    for (const code of ['EIO', 'ENOSPC']) {
      for (let n = 1; n <= total; n++) {
        const key = `k-${code}-${n}`;
        await bucket.put(key, OLD);
        const fds = openFds();
        const err = await armedPut(bucket, key, n, code);
        const failed = io.state.calls[n - 1]!;
        const label = `${code} at call ${n} (${failed.name})`;
        outcomes.set(failed.name, (outcomes.get(failed.name) ?? 0) + 1);
        // Every descriptor the put opened is closed when it returns, whatever failed.
        expect(openFds(), label).toBe(fds);
        if (err !== undefined) {
          expect(err, label).toBeInstanceOf(StorageError);
          expect((err as StorageError).code, label).toBe(ErrorCode.Transient);
        }
        // Whole old or whole new, and it reads back verified.
        const got = await bucket.get(key);
        const bytes = await readAll(got.stream);
        expect([sha(OLD), sha(NEW)], label).toContain(sha(bytes));
        expect(got.info.sha256, label).toBe(sha(bytes));
        // The temp file is removed on the way out, whatever failed.
        expect((await filesUnder(root)).filter((f) => f.includes('/tmp-')), label).toEqual([]);
        // An fsync that failed is never retried: the put gives up on that file.
        if (failed.name === 'fsync' || failed.name === 'fdatasync') {
          // Up to that descriptor's close: after it, the number may belong to another file.
          const rest = io.state.calls.slice(n);
          const closed = rest.findIndex((c) => c.name === 'close' && c.fd === failed.fd);
          const again = rest.slice(0, closed < 0 ? undefined : closed).filter((c) => (c.name === 'fsync' || c.name === 'fdatasync') && c.fd === failed.fd);
          expect(again, label).toEqual([]);
        }
        // A retry (the job's next attempt) stores the new object.
        await bucket.put(key, NEW);
        expect(sha(await readAll((await bucket.get(key)).stream)), label).toBe(sha(NEW));
      }
    }
    // Every kind of call in the put was failed at least once.
    expect([...outcomes.keys()].sort()).toEqual(expect.arrayContaining(['close', 'fstat', 'fsync', 'open', 'rename', 'write']));

    // What a failure left behind (sidecars of objects that never appeared, or of replaced ones)
    // is swept: afterwards only objects and their own sidecars remain.
    await driver.sweep(0);
    const files = await filesUnder(root);
    const objects = files.filter((f) => !f.includes(`${META_DIR}/`));
    expect(files.filter((f) => f.includes(`${META_DIR}/`))).toHaveLength(objects.length);
  });

  it('a consumed file source (linked into place): whole old or whole new, the staged file whole, no temp name left, whatever call fails', async () => {
    const root = join(dir.path, 'consume');
    const staging = join(dir.path, 'consume-staging');
    await mkdir(staging, { recursive: true });
    const bucket = new Bucket(new FsDriver({ root }));
    const stage = async (name: string) => { const p = join(staging, name); await writeFile(p, NEW); return p; };
    const put = async (key: string, path: string, failAt: number): Promise<unknown> => {
      Object.assign(io.state, { armed: true, count: 0, failAt, code: 'EIO', calls: [] });
      try {
        await bucket.put(key, { path, consume: true });
        return undefined;
      } catch (err) {
        return err;
      } finally {
        io.state.armed = false;
      }
    };
    await bucket.put('probe/k', OLD);
    const probe = await stage('probe');
    await put('probe/k', probe, 0);
    // It was linked, not copied (one write: the sidecar's), and the link is among the calls failed below.
    expect((await lstat(join(root, 'probe/k'))).ino).toBe((await lstat(probe)).ino);
    expect(io.state.calls.map((c) => c.name)).toContain('link');
    expect(io.state.calls.filter((c) => c.name === 'write')).toHaveLength(1);
    const total = io.state.count;
    for (let n = 1; n <= total; n++) {
      const key = `c-${n}`;
      await bucket.put(key, OLD);
      const staged = await stage(`s-${n}`);
      const fds = openFds();
      const err = await put(key, staged, n);
      const label = `EIO at call ${n} (${io.state.calls[n - 1]!.name})`;
      expect(openFds(), label).toBe(fds);
      if (err !== undefined) expect((err as StorageError).code, label).toBe(ErrorCode.Transient);
      const got = await bucket.get(key);
      const bytes = await readAll(got.stream);
      expect([sha(OLD), sha(NEW)], label).toContain(sha(bytes));
      expect(got.info.sha256, label).toBe(sha(bytes));
      expect((await filesUnder(root)).filter((f) => f.includes('/tmp-')), label).toEqual([]);
      // The staged file is whole, with no name but its own unless it became the object.
      expect(sha(await readFile(staged)), label).toBe(sha(NEW));
      const linked = (await lstat(join(root, key))).ino === (await lstat(staged)).ino;
      expect((await lstat(staged)).nlink, label).toBe(linked ? 2 : 1);
      // The job's next attempt stores it.
      await bucket.put(key, { path: staged, consume: true });
      expect(sha(await readAll((await bucket.get(key)).stream)), label).toBe(sha(NEW));
    }
  });

  it('makes new folders durable: a put into a fresh folder chain fsyncs the parent of every folder it created', async () => {
    const root = join(dir.path, 'chain');
    const bucket = new Bucket(new FsDriver({ root }));
    await bucket.put('first', OLD); // the root exists now
    Object.assign(io.state, { armed: true, count: 0, failAt: 0, calls: [] });
    try {
      await bucket.put('x/y/z/k', OLD);
    } finally {
      io.state.armed = false;
    }
    // Each fsync, by the path its descriptor was opened with (descriptors are reused after close).
    const open = new Map<number, string>();
    const synced: string[] = [];
    for (const c of io.state.calls) {
      if (c.name === 'open' && c.fd !== undefined && c.path !== undefined) open.set(c.fd, c.path);
      if (c.name === 'fsync' && c.fd !== undefined && open.has(c.fd)) synced.push(open.get(c.fd)!.slice(root.length));
      if (c.name === 'close' && c.fd !== undefined) open.delete(c.fd);
    }
    // The entries of x, x/y, x/y/z and x/y/z/.stevedore live in root, x, x/y and x/y/z.
    for (const parent of ['', '/x', '/x/y', '/x/y/z']) expect(synced).toContain(parent);
  });
});
