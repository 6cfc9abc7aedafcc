import { createHash, randomBytes } from 'node:crypto';
import { appendFile, mkdtemp, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FsDriver } from '../../src/backends/fs.js';
import { MemoryDriver } from '../../src/backends/memory.js';
import { ErrorCode, type StorageError } from '../../src/errors.js';
import { Bucket } from '../../src/storage/bucket.js';
import { SourceBody, openFile, type BodySource } from '../../src/storage/body.js';
import { readAll } from '../conformance/suite.js';

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

/** A stream of `bytes` in chunks of uneven sizes, so reads straddle chunk edges. */
function uneven(bytes: Buffer): Readable {
  return Readable.from((function* () {
    for (let at = 0, i = 0; at < bytes.length; i++) {
      const n = [1, 70_000, 1_500_000, 333][i % 4]!;
      yield bytes.subarray(at, at + n);
      at += n;
    }
  })());
}

/** Everything `read` yields through a buffer reused for every call. */
async function pullAll(body: SourceBody, bufSize: number): Promise<Buffer> {
  const buf = Buffer.alloc(bufSize);
  const out: Buffer[] = [];
  for (let n; (n = await body.read(buf)) > 0;) out.push(Buffer.from(buf.subarray(0, n)));
  return Buffer.concat(out);
}

let dir: string;
const bytes = randomBytes(9 * 1024 * 1024 + 12_345);

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'stevedore-body-'));
  await writeFile(join(dir, 'src'), bytes);
});
afterAll(() => rm(dir, { recursive: true, force: true }));

describe('SourceBody.read', () => {
  const sources: [string, () => BodySource][] = [
    ['bytes', () => ({ bytes })],
    ['a file', () => ({ path: join(dir, 'src') })],
    ['a stream', () => ({ stream: uneven(bytes) })],
  ];
  for (const [label, source] of sources) {
    it(`pulls ${label} through one reused buffer, byte for byte, with the digest`, async () => {
      const body = new SourceBody(source(), undefined, undefined, { sha256: sha(bytes), size: bytes.length, op: 'put', key: 'k' });
      const got = await pullAll(body, 1 << 20);
      expect(sha(got)).toBe(sha(bytes));
      expect(body.digest()).toEqual({ sha256: sha(bytes), size: bytes.length });
      expect(await body.read(Buffer.alloc(10))).toBe(0);
      await body.close();
    });

    it(`rejects ${label} at the end when the digest differs, and keeps rejecting`, async () => {
      const body = new SourceBody(source(), undefined, undefined, { sha256: sha(Buffer.from('other')), op: 'put', key: 'k' });
      await expect(pullAll(body, 100_000)).rejects.toMatchObject({ code: ErrorCode.ChecksumMismatch });
      await expect(body.read(Buffer.alloc(10))).rejects.toMatchObject({ code: ErrorCode.ChecksumMismatch });
      await body.close();
    });
  }

  it('refuses to be read both ways', async () => {
    const body = new SourceBody({ bytes: Buffer.from('abc') }, undefined, 3, { op: 'put', key: 'k' });
    await body.read(Buffer.alloc(2));
    expect(() => body.stream).toThrow(/either/);
    await body.close();
  });

  it('passes a stream error on as the error of the read', async () => {
    const stream = Readable.from((async function* () { yield Buffer.from('abc'); throw new Error('source broke'); })());
    const body = new SourceBody({ stream }, undefined, undefined, { op: 'put', key: 'k' });
    await expect(pullAll(body, 16)).rejects.toThrow('source broke');
    await body.close();
  });
});

describe('filesystem put through reused buffers', () => {
  it('stores many-chunk objects from every source intact, several at once', async () => {
    const bucket = new Bucket(new FsDriver({ root: join(dir, 'root') }));
    const others = [0, 1, 2, 3].map(() => randomBytes(5 * 1024 * 1024 + 7));
    // Concurrent puts share the driver's spare buffers: any reuse before a write finished would
    // show up as another object's bytes in this one.
    await Promise.all([
      bucket.put('from-file', { path: join(dir, 'src') }),
      bucket.put('from-stream', uneven(bytes)),
      bucket.put('from-bytes', bytes),
      ...others.map((b, i) => bucket.put(`other-${i}`, uneven(b))),
    ]);
    for (const key of ['from-file', 'from-stream', 'from-bytes']) {
      const got = await readAll((await bucket.get(key)).stream);
      expect(sha(got), key).toBe(sha(bytes));
    }
    for (const [i, b] of others.entries()) expect(sha(await readAll((await bucket.get(`other-${i}`)).stream))).toBe(sha(b));
  });
});

describe('a file source that is a symlink', () => {
  it('is refused as InvalidInput, never followed, whether the driver reads or streams it', async () => {
    const secret = join(dir, 'outside-secret');
    await writeFile(secret, 'not for the bucket');
    const link = join(dir, 'staged-link');
    await symlink(secret, link);
    // The filesystem driver pulls with read(); the memory driver takes the stream (as GCS and Azure do).
    for (const bucket of [new Bucket(new FsDriver({ root: join(dir, 'link-root') })), new Bucket(new MemoryDriver())]) {
      const err = await bucket.put('k', { path: link }).catch((e: unknown) => e);
      expect((err as { code?: string }).code, bucket.driver.kind).toBe(ErrorCode.InvalidInput);
      await expect(bucket.stat('k')).rejects.toMatchObject({ code: ErrorCode.NotFound });
    }
    // A driver that needs the digest first (S3, GCS): the pre-hash refuses it too.
    const upfront = Object.assign(new MemoryDriver(), { metadataAtEnd: false });
    const err = await new Bucket(upfront).put('k', { path: link }).catch((e: unknown) => e);
    expect((err as { code?: string }).code).toBe(ErrorCode.InvalidInput);
    expect((err as Error).message).toMatch(/ELOOP|symbolic link|symlink/i);
  });
});

describe('a body over an opened file', () => {
  it.each([['stream'], ['read']] as const)('reads exactly the size measured on its descriptor, by %s, even after the name is replaced', async (mode) => {
    const path = join(dir, `open-${mode}`);
    const first = randomBytes(3 * 1024 * 1024 + 7);
    await writeFile(path, first);
    const open = await openFile(path);
    try {
      expect(open.size).toBe(first.length);
      // Replaced under its name after the open (a second upload over the staged file): the body
      // still reads the bytes it measured.
      await writeFile(`${path}.new`, randomBytes(100));
      await rename(`${path}.new`, path);
      const body = new SourceBody({ open }, undefined, open.size, { sha256: sha(first), size: open.size, op: 'put', key: 'k' });
      const got = mode === 'stream' ? await readAll(body.stream) : await pullAll(body, 1024 * 1024 + 1);
      expect(sha(got)).toBe(sha(first));
      await body.close();
    } finally {
      await open.file.close();
    }
  });

  it.each([['stream'], ['read']] as const)('fails ChecksumMismatch, by %s, when the file grows past that size, never yielding the excess', async (mode) => {
    const path = join(dir, `grow-${mode}`);
    const first = randomBytes(2 * 1024 * 1024);
    await writeFile(path, first);
    const open = await openFile(path);
    try {
      await appendFile(path, randomBytes(1000));
      const body = new SourceBody({ open }, undefined, open.size, { op: 'put', key: 'k' });
      let yielded = 0;
      const run = mode === 'stream'
        ? (async () => { for await (const c of body.stream) yielded += (c as Buffer).length; })()
        : (async () => { const buf = Buffer.alloc(1 << 20); for (let n; (n = await body.read(buf)) > 0;) yielded += n; })();
      const err = await run.then(() => undefined, (e: unknown) => e as StorageError);
      expect(err?.code).toBe(ErrorCode.ChecksumMismatch);
      expect(yielded).toBeLessThanOrEqual(first.length);
      await body.close();
    } finally {
      await open.file.close();
    }
  });
});
