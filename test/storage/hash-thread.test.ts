import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { FsDriver } from '../../src/backends/fs.js';
import { ErrorCode } from '../../src/errors.js';
import { Bucket } from '../../src/storage/bucket.js';
import { hashFile, SourceBody, type BodySource } from '../../src/storage/body.js';
import { hashThreadStats, SHARED_FROM } from '../../src/storage/hash-thread.js';
import { Hasher } from '../../src/storage/hashing.js';

const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

describe('a body read into shared buffers (hashed on the hashing thread)', () => {
  /** Reads `body` to its end through `count` shared buffers in turn, each handed back at once and its bytes copied out first. */
  async function pullShared(body: SourceBody, size: number, count: number): Promise<Buffer> {
    const bufs = Array.from({ length: count }, () => Buffer.from(new SharedArrayBuffer(size)));
    const out: Buffer[] = [];
    for (let i = 0; ; i++) {
      const buf = bufs[i % count]!;
      const n = await body.read(buf);
      if (n === 0) return Buffer.concat(out);
      out.push(Buffer.from(buf.subarray(0, n)));
    }
  }

  it('digests every byte in order, through one buffer reused at once or several, from a stream, a file or bytes', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'stevedore-hash-thread-'));
    try {
      const bytes = randomBytes(5_000_001);
      const file = join(dir, 'f');
      await writeFile(file, bytes);
      const sources: (() => BodySource)[] = [
        () => ({ stream: Readable.from((function* () { for (let at = 0, i = 0; at < bytes.length; i++) { const n = [1, 70_000, 1_500_000, 333][i % 4]!; yield bytes.subarray(at, at + n); at += n; } })()) }),
        () => ({ path: file }),
        () => ({ bytes }),
      ];
      for (const source of sources) {
        for (const count of [1, 3]) {
          const body = new SourceBody(source(), undefined, bytes.length, { size: bytes.length, op: 'put', key: 'k' });
          const got = await pullShared(body, 256 * 1024, count);
          expect(got.equals(bytes)).toBe(true);
          expect(body.digest()).toEqual({ sha256: sha(bytes), size: bytes.length });
          await body.close();
        }
      }
      // An expected digest that does not match fails the last read, as on the caller's thread.
      const wrong = new SourceBody({ bytes }, undefined, bytes.length, { sha256: sha(Buffer.from('other')), op: 'put', key: 'k' });
      await expect(pullShared(wrong, 256 * 1024, 2)).rejects.toMatchObject({ code: ErrorCode.ChecksumMismatch });
      // hashFile agrees (a body this small is hashed on the caller's thread).
      expect(await hashFile(file)).toEqual({ sha256: sha(bytes), size: bytes.length });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('a Hasher whose first chunk is shared stays on the thread; one whose first chunk is not hashes here', async () => {
    const a = randomBytes(300_000);
    const shared = new Uint8Array(new SharedArrayBuffer(a.length));
    shared.set(a);
    const onThread = new Hasher({ op: 'x', key: 'k' });
    await onThread.updateShared(shared);
    // A later chunk in ordinary memory is refused, never hashed here out of order; nor is update().
    expect(() => onThread.updateShared(a)).toThrow(TypeError);
    expect(() => onThread.update(a)).toThrow();
    await onThread.updateShared(shared);
    expect((await onThread.finishShared()).sha256).toBe(sha(Buffer.concat([a, a])));
    const here = new Hasher({ op: 'x', key: 'k' });
    expect(here.updateShared(a)).toBeUndefined();
    here.update(a);
    expect((await here.finishShared()).sha256).toBe(sha(Buffer.concat([a, a])));
  });
});

describe('large puts and hashes on the filesystem', () => {
  it('a put and a hash of SHARED_FROM or more (hashed on the thread, through reused shared buffers) store and digest every byte, several at once', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'stevedore-hash-thread-'));
    try {
      const bytes = randomBytes(SHARED_FROM + 300_001);
      const file = join(dir, 'src');
      await writeFile(file, bytes);
      const bucket = new Bucket(new FsDriver({ root: join(dir, 'root') }));
      const sent = hashThreadStats.updates;
      // Concurrent puts share the driver's spare buffers: a buffer refilled before the thread hashed it would show as a wrong digest.
      const infos = await Promise.all([bucket.put('a', { path: file }), bucket.put('b', { path: file }), hashFile(file)]);
      for (const info of infos) expect(info).toMatchObject({ sha256: sha(bytes), size: bytes.length });
      for (const key of ['a', 'b']) expect(sha(await readFile(join(dir, 'root', key)))).toBe(sha(bytes));
      // Each of the three went to the thread, chunk by chunk (256 KiB), not hashed here.
      expect(hashThreadStats.updates - sent).toBeGreaterThanOrEqual(3 * Math.floor(bytes.length / (256 * 1024)));
      // A small body never starts the thread.
      const before = hashThreadStats.updates;
      await writeFile(join(dir, 'small'), bytes.subarray(0, 1 << 20));
      expect(await bucket.put('small', { path: join(dir, 'small') })).toMatchObject({ sha256: sha(bytes.subarray(0, 1 << 20)) });
      expect(hashThreadStats.updates).toBe(before);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
