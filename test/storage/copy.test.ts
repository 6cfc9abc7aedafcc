import { randomBytes, randomUUID } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { PutObjectCommand } from '@aws-sdk/client-s3';
import { BlobServiceClient } from '@azure/storage-blob';
import { afterAll, describe, expect, it } from 'vitest';
import { MemoryDriver } from '../../src/backends/memory.js';
import { ErrorCode } from '../../src/errors.js';
import { Bucket } from '../../src/storage/bucket.js';
import { copyObject } from '../../src/storage/copy.js';
import type { Driver } from '../../src/storage/driver.js';
import type { ConformanceTarget } from '../conformance/target.js';
import { codeOf, readAll, sha } from '../conformance/util.js';
import { azureConformanceTarget } from '../harness/azure.js';
import { fsConformanceTarget } from '../harness/fs.js';
import { gcsConformanceTarget } from '../harness/gcs.js';
import { s3ConformanceTarget } from '../harness/s3.js';

/** One store of a copy: its target (driver and bit rot) and, where the test needs it, a writer that records no digest. */
interface Store {
  name: string;
  target: ConformanceTarget;
  /** Writes `bytes` at the store key behind the Bucket's back, with no recorded digest (another tool's object). */
  foreign: (storeKey: string, bytes: Buffer) => Promise<void>;
}

const fs = await fsConformanceTarget();
const s3 = s3ConformanceTarget();
const azure = azureConformanceTarget();
const gcs = gcsConformanceTarget();
const memory = new MemoryDriver();
const memoryTarget: ConformanceTarget = {
  name: 'memory', driver: async () => memory, corrupt: async (k, b) => memory.corrupt(k, b), multipartThreshold: 1 << 20, teardown: async () => {},
};

const stores: Record<string, Store> = {
  fs: {
    name: 'fs', target: fs,
    foreign: async (key, bytes) => {
      await mkdir(dirname(join(fs.root, key)), { recursive: true });
      await writeFile(join(fs.root, key), bytes);
    },
  },
  s3: {
    name: 's3', target: s3,
    foreign: async (key, bytes) => {
      const d = await s3.driver() as unknown as { bucket: string };
      await (await s3.s3rver()).client.send(new PutObjectCommand({ Bucket: d.bucket, Key: key, Body: bytes }));
    },
  },
  azure: {
    name: 'azure', target: azure,
    foreign: async (key, bytes) => {
      const d = await azure.driver() as unknown as { container: { containerName: string } };
      const service = BlobServiceClient.fromConnectionString((await azure.azurite()).connectionString);
      await service.getContainerClient(d.container.containerName).getBlockBlobClient(key).upload(bytes, bytes.length);
    },
  },
  gcs: {
    name: 'gcs', target: gcs,
    foreign: async (key, bytes) => {
      const d = await gcs.driver() as unknown as { bucketName: string };
      const url = `${(await gcs.server()).endpoint}/upload/storage/v1/b/${d.bucketName}/o?uploadType=media&name=${encodeURIComponent(key)}`;
      const res = await fetch(url, { method: 'POST', body: bytes, headers: { 'content-type': 'application/octet-stream' } });
      if (!res.ok) throw new Error(`fake GCS upload: ${res.status} ${await res.text()}`);
    },
  },
  memory: {
    name: 'memory', target: memoryTarget,
    foreign: async (key, bytes) => {
      await new Bucket(memory).put(key, bytes);
      memory.forgetDigest(key);
    },
  },
};

const drivers = new Map<string, Promise<Driver>>();
const driverOf = (s: Store) => {
  let d = drivers.get(s.name);
  if (!d) drivers.set(s.name, (d = s.target.driver()));
  return d;
};
const bucketOn = async (s: Store) => new Bucket(await driverOf(s), { name: s.name, prefix: `c-${randomUUID().slice(0, 8)}` });

afterAll(async () => {
  for (const s of Object.values(stores)) {
    const d = await drivers.get(s.name);
    if (d && d !== memory) await d.close();
    await s.target.teardown();
  }
});

describe.each([
  ['fs', 's3'], ['s3', 'azure'], ['azure', 'gcs'], ['gcs', 'fs'], ['memory', 'memory'],
] as const)('copyObject %s -> %s', (from, to) => {
  const src = stores[from]!;
  const dst = stores[to]!;
  // Bigger than every target's part, block and chunk threshold: the copy is multi-part on both sides.
  const size = Math.max(src.target.multipartThreshold, dst.target.multipartThreshold) + 654_321;

  it('copies bytes, content type and metadata, checked against the source\'s digest', async () => {
    const a = await bucketOn(src);
    const b = await bucketOn(dst);
    const bytes = randomBytes(size);
    await a.put('in/obj.tar.gz', bytes, { contentType: 'application/gzip', metadata: { build: '12', site: 'w' } });
    const out = await copyObject(a, 'in/obj.tar.gz', b, 'out/obj.tar.gz');
    expect(out).toMatchObject({ key: 'out/obj.tar.gz', size, sha256: sha(bytes), verified: true });
    const got = await b.get('out/obj.tar.gz');
    expect(sha(await readAll(got.stream))).toBe(sha(bytes));
    expect(got.info).toMatchObject({ sha256: sha(bytes), contentType: 'application/gzip', metadata: { build: '12', site: 'w' } });
    expect(await codeOf(copyObject(a, 'in/obj.tar.gz', b, 'out/obj.tar.gz', { ifAbsent: true }))).toBe(ErrorCode.PreconditionFailed);
    expect(await codeOf(copyObject(a, 'in/obj.tar.gz', b, 'out/obj.tar.gz', { ifMatch: '"stale"' }))).toBe(ErrorCode.PreconditionFailed);
  });

  it('refuses a rotten source with ChecksumMismatch, leaving nothing at the destination and an existing one whole', async () => {
    const a = await bucketOn(src);
    const b = await bucketOn(dst);
    const bytes = randomBytes(size);
    await a.put('rot', bytes);
    const flipped = Buffer.from(bytes);
    flipped[size - 10] = (flipped[size - 10] ?? 0) ^ 0x01;
    await src.target.corrupt(`${a.prefix}rot`, flipped);
    expect(await codeOf(copyObject(a, 'rot', b, 'new'))).toBe(ErrorCode.ChecksumMismatch);
    expect(await codeOf(b.stat('new'))).toBe(ErrorCode.NotFound);
    const kept = Buffer.from('the destination as it was');
    await b.put('old', kept);
    expect(await codeOf(copyObject(a, 'rot', b, 'old'))).toBe(ErrorCode.ChecksumMismatch);
    expect((await readAll((await b.get('old')).stream)).toString()).toBe(kept.toString());
  });

  it('refuses a source that does not match the caller\'s expected sha256', async () => {
    const a = await bucketOn(src);
    const b = await bucketOn(dst);
    await a.put('k', Buffer.from('bytes'));
    expect(await codeOf(copyObject(a, 'k', b, 'k', { sha256: sha(Buffer.from('other')) }))).toBe(ErrorCode.ChecksumMismatch);
    expect(await codeOf(b.stat('k'))).toBe(ErrorCode.NotFound);
  });

  it('gives a source without a recorded digest its digest at the destination, verified: false', async () => {
    const a = await bucketOn(src);
    const b = await bucketOn(dst);
    const bytes = randomBytes(size);
    await src.foreign(`${a.prefix}foreign`, bytes);
    expect((await a.stat('foreign')).sha256).toBeUndefined();
    const progress: number[] = [];
    const out = await copyObject(a, 'foreign', b, 'arrived', { progress: (n) => progress.push(n) });
    expect(out).toMatchObject({ sha256: sha(bytes), size, verified: false });
    expect((await b.stat('arrived')).sha256).toBe(sha(bytes));
    expect(sha(await readAll((await b.get('arrived')).stream))).toBe(sha(bytes));
    expect(progress.at(-1)).toBe(size);
    // A caller's matching sha256 checks the bytes, but the source still recorded none: not verified.
    const given = await copyObject(a, 'foreign', b, 'arrived-2', { sha256: sha(bytes) });
    expect(given).toMatchObject({ sha256: sha(bytes), verified: false });
  });
});

describe('copyObject on one driver', () => {
  it('copies server-side between two prefixes of one memory driver, with no put', async () => {
    const a = new Bucket(memory, { prefix: 'one' });
    const b = new Bucket(memory, { prefix: 'two' });
    const bytes = randomBytes(1000);
    await a.put('k', bytes, { metadata: { m: '1' } });
    let puts = 0;
    const put = memory.put.bind(memory);
    memory.put = (...args) => { puts++; return put(...args); };
    try {
      const out = await copyObject(a, 'k', b, 'k2');
      expect(out).toMatchObject({ key: 'k2', sha256: sha(bytes), verified: true, metadata: { m: '1' } });
    } finally {
      memory.put = put;
    }
    expect(puts).toBe(0);
    expect(sha(await readAll((await b.get('k2')).stream))).toBe(sha(bytes));
  });
});
