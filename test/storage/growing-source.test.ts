import { randomBytes, randomUUID } from 'node:crypto';
import { appendFileSync, closeSync, openSync, writeSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCode } from '../../src/errors.js';
import { Bucket } from '../../src/storage/bucket.js';
import type { Driver } from '../../src/storage/driver.js';
import type { ConformanceTarget } from '../conformance/target.js';
import { codeOf, readAll, sha } from '../conformance/util.js';
import { azureConformanceTarget } from '../harness/azure.js';
import { gcsConformanceTarget } from '../harness/gcs.js';
import { tempDir } from '../harness/process.js';
import { s3ConformanceTarget } from '../harness/s3.js';

const MiB = 1024 * 1024;

/**
 * A staged file that changes while it is stored (a producer still writing it, a second upload
 * over it) must never replace a good object with bytes that failed their digest: the size a
 * driver announces is measured on the descriptor the bytes come from, the body stops there, and
 * the last bytes reach the store only after the digest check.
 */
describe.each([
  // The GCS session announces the size; 256 KiB chunks over a 1 MiB threshold: many chunks.
  ['gcs resumable', () => gcsConformanceTarget(), 3 * MiB],
  ['s3 single PutObject', () => s3ConformanceTarget(), 1 * MiB],
  ['s3 multipart', () => s3ConformanceTarget(), 12 * MiB],
  ['azure blocks', () => azureConformanceTarget(), 9 * MiB],
] as const)('a staged file that changes mid-put, %s', (_name, makeTarget, size) => {
  let target: ConformanceTarget;
  let driver: Driver;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let b: Bucket;
  let good: Buffer;

  beforeAll(async () => {
    target = makeTarget();
    driver = await target.driver();
    tmp = await tempDir();
    b = new Bucket(driver, { prefix: `g-${randomUUID().slice(0, 8)}`, spoolDir: tmp.path });
  });
  afterAll(async () => {
    await driver?.close();
    await target?.teardown();
    await tmp?.remove();
  });

  const resetGood = async () => {
    good = randomBytes(size + 4321);
    await b.put('k', good);
  };
  const stillGood = async () => {
    const got = await b.get('k');
    expect(sha(await readAll(got.stream))).toBe(sha(good));
    expect(got.info).toMatchObject({ size: good.length, sha256: sha(good) });
  };

  it('that grows past its size fails ChecksumMismatch, and the good object stays byte for byte', async () => {
    await resetGood();
    // The producer's digest is of the finished file; the worker meets it half written.
    const finished = randomBytes(size + MiB);
    const path = join(tmp.path, randomUUID());
    await writeFile(path, finished.subarray(0, size));
    let grown = false;
    const progress = (n: number) => {
      if (!grown && n >= size / 2) { grown = true; appendFileSync(path, finished.subarray(size)); }
    };
    expect(await codeOf(b.put('k', { path }, { sha256: sha(finished), progress }))).toBe(ErrorCode.ChecksumMismatch);
    expect(grown).toBe(true);
    await stillGood();
  });

  it('whose bytes are not the finished file\'s (the producer still writing) fail ChecksumMismatch before the store commits them', async () => {
    await resetGood();
    const finished = randomBytes(size + MiB);
    const path = join(tmp.path, randomUUID());
    await writeFile(path, finished.subarray(0, size));
    expect(await codeOf(b.put('k', { path }, { sha256: sha(finished) }))).toBe(ErrorCode.ChecksumMismatch);
    await stillGood();
  });

  it('that grows while its digest is worked out first fails Transient (the file changed, not a wrong digest: a retry reads it anew), and the good object stays', async () => {
    await resetGood();
    const first = randomBytes(size);
    const path = join(tmp.path, randomUUID());
    await writeFile(path, first);
    let grown = false;
    const progress = (n: number) => {
      if (!grown && n >= size / 2) { grown = true; appendFileSync(path, randomBytes(MiB)); }
    };
    expect(await codeOf(b.put('k', { path }, { progress }))).toBe(ErrorCode.Transient);
    await stillGood();
  });

  it('that changes in place either fails Transient, leaving the good object, or stores bytes that match their digest', async () => {
    await resetGood();
    const path = join(tmp.path, randomUUID());
    await writeFile(path, randomBytes(size));
    let changed = false;
    const progress = (n: number) => {
      if (changed || n < size / 2) return;
      changed = true;
      const fd = openSync(path, 'r+');
      try { writeSync(fd, randomBytes(1000), 0, 1000, size - 2000); } finally { closeSync(fd); }
    };
    const outcome = await codeOf(b.put('k', { path }, { progress }));
    expect(changed).toBe(true);
    if (outcome === 'resolved') {
      // Metadata-at-end stores (Azure) record the digest of what flowed, and a change after the
      // last read changes nothing stored: either way the object matches its digest.
      const got = await b.get('k');
      const back = await readAll(got.stream);
      expect(got.info.sha256).toBe(sha(back));
    } else {
      // No digest was given: the change is the file's, not the producer's mistake.
      expect(outcome).toBe(ErrorCode.Transient);
      await stillGood();
    }
  });
});
