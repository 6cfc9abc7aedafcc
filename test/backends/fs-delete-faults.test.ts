// Decision 1 and migrate's deleteSource: an fs delete whose unlink fails with a real errno fails
// with its code and leaves the object; it never reports a success it did not have. The unlink of
// node:fs/promises is wrapped to fail on demand; the filesystem is real.
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { FsDriver } from '../../src/backends/fs.js';
import { ErrorCode } from '../../src/errors.js';
import { Bucket } from '../../src/storage/bucket.js';
import { codeOf, readAll } from '../conformance/suite.js';
import { tempDir } from '../harness/process.js';

const fault = vi.hoisted(() => ({ path: undefined as string | undefined, code: 'EIO' }));

vi.mock('node:fs/promises', async (importOriginal) => {
  const real = await importOriginal<typeof import('node:fs/promises')>();
  const unlink = async (path: Parameters<typeof real.unlink>[0]) => {
    if (fault.path !== undefined && String(path) === fault.path) {
      throw Object.assign(new Error(`${fault.code}: injected into unlink`), { code: fault.code, syscall: 'unlink', path: String(path) });
    }
    return real.unlink(path);
  };
  return { ...real, unlink, default: { ...real, unlink } };
});

describe('filesystem delete with its unlink failing', () => {
  let dir: Awaited<ReturnType<typeof tempDir>>;
  let bucket: Bucket;
  beforeAll(async () => {
    dir = await tempDir('stevedore-fsdel-');
    bucket = new Bucket(new FsDriver({ root: dir.path }));
  });
  afterAll(() => dir.remove());

  for (const [code, expected] of [['EIO', ErrorCode.Transient], ['EACCES', ErrorCode.PermissionDenied], ['EPERM', ErrorCode.PermissionDenied], ['EROFS', ErrorCode.PermissionDenied]] as const) {
    for (const conditional of [false, true]) {
      it(`${code}${conditional ? ' (ifMatch)' : ''} fails ${expected} and keeps the object`, async () => {
        const key = `d/${code}-${conditional}`;
        const info = await bucket.put(key, Buffer.from('keep me'));
        fault.path = join(dir.path, key);
        fault.code = code;
        try {
          expect(await codeOf(bucket.delete(key, conditional ? { ifMatch: info.etag } : {}))).toBe(expected);
        } finally {
          fault.path = undefined;
        }
        const got = await bucket.get(key);
        expect((await readAll(got.stream)).toString()).toBe('keep me');
        expect(got.info.sha256).toBe(info.sha256);
        // And once the fault is gone, the delete works.
        await bucket.delete(key, conditional ? { ifMatch: info.etag } : {});
        expect(await codeOf(bucket.stat(key))).toBe(ErrorCode.NotFound);
      });
    }
  }
});
