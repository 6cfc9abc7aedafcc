import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { MemoryDriver } from '../../src/backends/memory.js';
import { ErrorCode, StorageError } from '../../src/errors.js';
import { Bucket } from '../../src/storage/bucket.js';
import type { Driver } from '../../src/storage/driver.js';
import { readAll } from '../conformance/suite.js';
import { overrideDriver } from '../fixtures/override-driver.js';

describe('Bucket.get, an object replaced while it is read', () => {
  it('ends the read Transient (a new attempt reads the new object), not PreconditionFailed', async () => {
    const memory = new MemoryDriver();
    // What Azure's SDK does when it resumes a broken download and the blob's ETag has changed.
    const driver: Driver = overrideDriver(memory, {
      async get(key: string) {
        const { info } = await memory.get(key, undefined);
        const stream = new Readable({ read() {
          this.push(Buffer.from('first half'));
          this.destroy(new StorageError(ErrorCode.PreconditionFailed, 'ConditionNotMet', { op: 'get', key }));
        } });
        return { stream, info };
      },
    });
    const bucket = new Bucket(driver);
    await bucket.put('k', Buffer.from('first half, second half'));
    const err = await bucket.get('k').then((g) => readAll(g.stream)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StorageError);
    expect((err as StorageError).code).toBe(ErrorCode.Transient);
    expect((err as StorageError).message).toMatch(/replaced while it was being read/);
  });
});

describe('Bucket.get with partsChecked (the caller checks every byte it uses)', () => {
  /** A store whose object rotted: one byte flipped, the recorded digest and size kept. */
  const rotten = async (): Promise<{ bucket: Bucket; bad: Buffer }> => {
    const memory = new MemoryDriver();
    const good = Buffer.from('the bytes as they were stored, checked by parts');
    const bad = Buffer.from(good);
    bad[5]! ^= 0x01;
    const driver: Driver = overrideDriver(memory, {
      async get(key: string, range) {
        const { info } = await memory.get(key, undefined);
        const bytes = range ? bad.subarray(range.start, range.end === undefined ? undefined : range.end + 1) : bad;
        return { stream: Readable.from([bytes]), info };
      },
    });
    const bucket = new Bucket(driver);
    await bucket.put('k', good);
    return { bucket, bad };
  };
  const code = (p: Promise<unknown>) => p.then(() => 'ok', (e: { code?: string }) => e.code ?? String(e));

  it('skips the whole-object digest only when asked: the default read still fails ChecksumMismatch', async () => {
    const { bucket, bad } = await rotten();
    expect(await code(bucket.get('k').then((g) => readAll(g.stream)))).toBe(ErrorCode.ChecksumMismatch);
    // The bytes are delivered unhashed: the caller's own digests are what judge them.
    expect((await readAll((await bucket.get('k', { partsChecked: true })).stream)).equals(bad)).toBe(true);
  });

  it('still checks the size, and refuses an expected sha256 beside it', async () => {
    const memory = new MemoryDriver();
    const short: Driver = overrideDriver(memory, {
      async get(key: string) {
        const { info } = await memory.get(key, undefined);
        return { stream: Readable.from([Buffer.from('cut sh')]), info };
      },
    });
    const bucket = new Bucket(short);
    await bucket.put('k', Buffer.from('cut short by the store'));
    expect(await code(bucket.get('k', { partsChecked: true }).then((g) => readAll(g.stream)))).toBe(ErrorCode.ChecksumMismatch);
    expect(await code(bucket.get('k', { partsChecked: true, sha256: 'a'.repeat(64) }))).toBe(ErrorCode.InvalidInput);
  });
});
