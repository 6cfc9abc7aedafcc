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
