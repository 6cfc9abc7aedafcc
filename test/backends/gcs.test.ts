import { createHash, randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCode, StorageError } from '../../src/errors.js';
import { GcsDriver, gcsDriverFromUrl, gcsOptionsFromUrl } from '../../src/backends/gcs.js';
import { SourceBody } from '../../src/storage/body.js';
import type { DriverPutOptions, PutBody } from '../../src/storage/driver.js';
import { runConformance, readAll } from '../conformance/suite.js';
import { gcsConformanceTarget } from '../harness/gcs.js';
import type { FakeGcs } from '../harness/gcs-server.js';

runConformance(gcsConformanceTarget());

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');
const PUT: DriverPutOptions = { contentType: undefined, metadata: {}, ifAbsent: false, signal: undefined };

/** A PutBody as the Bucket hands it over; `failAtEnd` errors after the last byte, like its digest check. */
function body(bytes: Buffer, opts: { sizeKnown?: boolean; failAtEnd?: boolean } = {}): PutBody {
  const stream = Readable.from((async function* () {
    for (let at = 0; at < bytes.length; at += 100_000) yield bytes.subarray(at, at + 100_000);
    if (opts.failAtEnd) throw new StorageError(ErrorCode.ChecksumMismatch, 'digest check failed');
  })());
  return new SourceBody({ stream }, sha(bytes), opts.sizeKnown === false ? undefined : bytes.length, { op: 'put', key: 'k' });
}

async function codeOf(d: GcsDriver, p: Promise<unknown>): Promise<ErrorCode | 'resolved'> {
  try {
    await p;
    return 'resolved';
  } catch (err) {
    return d.classify(err) ?? ErrorCode.Unknown;
  }
}

/** The code of a StorageError the promise rejects with (the body's own check), else the driver's mapping. */
async function failure(p: Promise<unknown>): Promise<string> {
  return p.then(() => 'resolved', (err: unknown) => (err instanceof StorageError ? err.code : `not a StorageError: ${String(err)}`));
}

describe('gcs driver specifics', () => {
  const target = gcsConformanceTarget({ resumableThreshold: 1024 * 1024, chunkSize: 512 * 1024 });
  let server: FakeGcs;
  let d: GcsDriver;
  const uploads = (name: string) => server.requests.filter((r) => r.path.startsWith('/upload/') && (r.query.name === name || r.method === 'PUT'));

  beforeAll(async () => {
    server = await target.server();
    d = await target.newDriver();
  });
  afterAll(() => target.teardown());

  describe('URLs', () => {
    it('reads the bucket and options from a gs: URL, never credentials', () => {
      expect(gcsOptionsFromUrl(new URL('gs://bkt/some/prefix?endpoint=http://127.0.0.1:9&chunkSize=524288&resumableThreshold=0&validation=md5')))
        .toEqual({ bucket: 'bkt', endpoint: 'http://127.0.0.1:9', chunkSize: 524288, resumableThreshold: 0, validation: 'md5' });
      expect(gcsDriverFromUrl(new URL('gs://bkt?endpoint=http://127.0.0.1:9')).kind).toBe('gs');
      for (const bad of ['gs://user:secret@bkt', 'gs://bkt?typo=1', 'gs://bkt?chunkSize=1000', 'gs://bkt?validation=sha1', 's3://bkt']) {
        expect(() => gcsOptionsFromUrl(new URL(bad)), bad).toThrow(/^InvalidInput: /);
      }
      expect(() => new GcsDriver({ bucket: 'b', chunkSize: 300_000 })).toThrow(/multiple of 262144/);
    });
  });

  describe('uploads', () => {
    /** A body that announces `size`, yields `extra` bytes more, then waits and fails its digest check. */
    function overrun(bytes: Buffer, extra: number): PutBody {
      const stream = Readable.from((async function* () {
        for (let at = 0; at < bytes.length; at += 256 * 1024) yield bytes.subarray(at, at + 256 * 1024);
        yield randomBytes(extra);
        await new Promise((r) => setTimeout(r, 1500));
        throw new StorageError(ErrorCode.ChecksumMismatch, 'digest check failed');
      })());
      return new SourceBody({ stream }, sha(bytes), bytes.length, { op: 'put', key: 'k' });
    }

    it('never completes a session whose body runs past its announced size, keeping the good object', async () => {
      const good = randomBytes(600_000);
      await d.put('over', body(good), PUT);
      const bytes = randomBytes(3 * 512 * 1024);
      expect(await failure(d.put('over', overrun(bytes, 300_000), PUT))).toBe(ErrorCode.ChecksumMismatch);
      expect(sha(await readAll((await d.get('over', undefined, undefined)).stream))).toBe(sha(good));
      server.requests.length = 0;
    });

    it('holds the last chunk until the body ended cleanly', async () => {
      const good = randomBytes(600_000);
      await d.put('tail', body(good), PUT);
      const bytes = randomBytes(3 * 512 * 1024);
      // Exactly the announced size, then a digest check that fails late.
      const late = new SourceBody({ stream: Readable.from((async function* () {
        for (let at = 0; at < bytes.length; at += 256 * 1024) yield bytes.subarray(at, at + 256 * 1024);
        await new Promise((r) => setTimeout(r, 1500));
        throw new StorageError(ErrorCode.ChecksumMismatch, 'digest check failed');
      })()) }, sha(bytes), bytes.length, { op: 'put', key: 'k' });
      expect(await failure(d.put('tail', late, PUT))).toBe(ErrorCode.ChecksumMismatch);
      expect(sha(await readAll((await d.get('tail', undefined, undefined)).stream))).toBe(sha(good));
      // The tests below count the requests of their own uploads.
      server.requests.length = 0;
    });

    it('sends a small object in one multipart request, with the digest in its metadata', async () => {
      const bytes = randomBytes(50_000);
      const info = await d.put('small', body(bytes), { ...PUT, contentType: 'text/plain', metadata: { build: '1' } });
      expect(uploads('small').map((r) => r.query.uploadType)).toEqual(['multipart']);
      expect(info).toMatchObject({ size: bytes.length, sha256: sha(bytes), contentType: 'text/plain', metadata: { build: '1' } });
      expect((await d.stat('small')).sha256).toBe(sha(bytes));
    });

    it('sends a big object as a chunked resumable session, announcing its size', async () => {
      const bytes = randomBytes(3 * 512 * 1024 + 1000);
      server.requests.length = 0;
      await d.put('big', body(bytes), PUT);
      expect(server.requests.filter((r) => r.method === 'PUT').map((r) => r.contentRange)).toEqual([
        'bytes 0-524287/1573864', 'bytes 524288-1048575/1573864', 'bytes 1048576-1572863/1573864', 'bytes 1572864-1573863/1573864',
      ]);
      expect(sha(await readAll((await d.get('big', undefined, undefined)).stream))).toBe(sha(bytes));
    });

    it('gives an object of unknown size its total only with the last chunk', async () => {
      const bytes = randomBytes(2 * 512 * 1024);
      server.requests.length = 0;
      await d.put('unsized', body(bytes, { sizeKnown: false }), PUT);
      expect(server.requests.filter((r) => r.method === 'PUT').map((r) => r.contentRange)).toEqual(['bytes 0-524287/*', 'bytes 524288-1048575/1048576']);
    });

    it.each([
      ['single-request', 500_000, true],
      ['resumable, size known', 2_000_000, true],
      ['resumable, size unknown', 2_000_000, false],
    ])('makes nothing visible when the body fails at its end (%s)', async (_name, size, sizeKnown) => {
      const key = `fails-${size}-${sizeKnown}`;
      const p = d.put(key, body(randomBytes(size), { sizeKnown, failAtEnd: true }), PUT);
      await expect(p).rejects.toMatchObject({ code: ErrorCode.ChecksumMismatch });
      await new Promise((r) => setTimeout(r, 200));
      expect(await codeOf(d, d.stat(key))).toBe(ErrorCode.NotFound);
      // No request may be left hanging on the server either (the single-request upload waits for the body).
      expect(server.requests.filter((r) => r.query.name === key && r.query.uploadType === 'multipart')).toEqual([]);
    });

    it('resumes a session after a dropped connection mid-chunk, from what the server persisted', async () => {
      const bytes = randomBytes(4 * 512 * 1024);
      server.requests.length = 0;
      // 300 KB into the first 512 KiB chunk: the server keeps whole 256 KiB units, so one of them.
      server.injectFault({ chunk: true, resetAfterBytes: 300_000 });
      server.injectFault({ chunk: true, status: 503 });
      // Only a precondition makes an upload idempotent enough for the SDK to retry it.
      await d.put('resumed', body(bytes), { ...PUT, ifAbsent: true });
      const puts = server.requests.filter((r) => r.method === 'PUT').map((r) => `${r.contentRange} ${r.status}`);
      expect(puts.slice(0, 3)).toEqual(['bytes 0-524287/2097152 0', 'bytes */* 308', 'bytes 262144-786431/2097152 503']);
      expect(puts).toContain('bytes 262144-786431/2097152 308');
      expect(puts.at(-1)).toBe('bytes 1835008-2097151/2097152 200');
      expect(sha(await readAll((await d.get('resumed', undefined, undefined)).stream))).toBe(sha(bytes));
    });

    it('fails a write without a precondition on a transient error instead of retrying it', async () => {
      server.injectFault({ chunk: true, status: 503 });
      expect(await codeOf(d, d.put('no-retry', body(randomBytes(2_000_000)), PUT))).toBe(ErrorCode.Transient);
      expect(await codeOf(d, d.stat('no-retry'))).toBe(ErrorCode.NotFound);
    });

    it('checks ifAbsent at session start and again at commit', async () => {
      await d.put('taken', body(Buffer.from('x')), PUT);
      expect(await codeOf(d, d.put('taken', body(randomBytes(2_000_000)), { ...PUT, ifAbsent: true }))).toBe(ErrorCode.PreconditionFailed);
      // A session opened while the name was free fails when another writer got there first.
      const slow = new Readable({ read() {} });
      const bytes = randomBytes(1_500_000);
      const late = d.put('contended', { ...body(bytes, { sizeKnown: false }), stream: slow }, { ...PUT, ifAbsent: true });
      slow.push(bytes.subarray(0, 600_000));
      await new Promise((r) => setTimeout(r, 200));
      await d.put('contended', body(Buffer.from('first')), { ...PUT, ifAbsent: true });
      slow.push(bytes.subarray(600_000));
      slow.push(null);
      expect(await codeOf(d, late)).toBe(ErrorCode.PreconditionFailed);
      expect((await readAll((await d.get('contended', undefined, undefined)).stream)).toString()).toBe('first');
    });
  });

  describe('reads and generations', () => {
    it('uses the generation as etag, new on every write, and reads the generation it stat-ed', async () => {
      const a = await d.put('gen', body(Buffer.from('one')), PUT);
      const b = await d.put('gen', body(Buffer.from('two')), PUT);
      expect(Number(b.etag)).toBeGreaterThan(Number(a.etag));
      server.requests.length = 0;
      const got = await d.get('gen', undefined, undefined);
      expect(got.info.etag).toBe(b.etag);
      expect(server.requests.find((r) => r.query.alt === 'media')?.query.generation).toBe(b.etag);
      expect((await readAll(got.stream)).toString()).toBe('two');
    });

    it('fails a whole read of rotten bytes through the SDK\'s own hash check; ranges are not checked', async () => {
      const bytes = randomBytes(10_000);
      await d.put('rot', body(bytes), PUT);
      const rotten = Buffer.from(bytes);
      rotten[5_000] = (rotten[5_000] ?? 0) ^ 0x80;
      await server.corrupt(d.bucketName, 'rot', rotten);
      const err = await d.get('rot', undefined, undefined).then((g) => readAll(g.stream)).then(() => undefined, (e: unknown) => e);
      expect(err).toMatchObject({ code: 'CONTENT_DOWNLOAD_MISMATCH' });
      expect(d.classify(err)).toBe(ErrorCode.ChecksumMismatch);
      // The SDK cannot check part of an object: the Bucket's digest only covers whole reads too.
      const part = await readAll((await d.get('rot', { start: 4_990, end: 5_009 }, undefined)).stream);
      expect(part).toEqual(rotten.subarray(4_990, 5_010));
    });

    it('reads a range covering the whole object as a checked whole read', async () => {
      await d.put('empty', body(Buffer.alloc(0)), PUT);
      expect((await readAll((await d.get('empty', { start: 0 }, undefined)).stream)).length).toBe(0);
      expect(await codeOf(d, d.get('empty', { start: 1 }, undefined))).toBe(ErrorCode.InvalidInput);
    });
  });

  describe('errors', () => {
    it('maps the SDK\'s error shapes to codes', () => {
      expect(d.classify({ code: 412, message: 'conditionNotMet' })).toBe(ErrorCode.PreconditionFailed);
      expect(d.classify(Object.assign(new Error('x'), { code: 403 }))).toBe(ErrorCode.PermissionDenied);
      expect(d.classify(Object.assign(new Error('x'), { code: 401 }))).toBe(ErrorCode.PermissionDenied);
      expect(d.classify(Object.assign(new Error('x'), { code: 429 }))).toBe(ErrorCode.Transient);
      expect(d.classify(Object.assign(new Error('x'), { status: 503 }))).toBe(ErrorCode.Transient);
      expect(d.classify(Object.assign(new Error('x'), { code: 'CONTENT_DOWNLOAD_MISMATCH' }))).toBe(ErrorCode.ChecksumMismatch);
      expect(d.classify(new Error('Retry limit exceeded - status: 503'))).toBe(ErrorCode.Transient);
      expect(d.classify(Object.assign(new Error('x'), { code: 'ECONNRESET' }))).toBeUndefined();
    });

    it('reports a missing bucket as NotFound on health', async () => {
      const gone = await target.newDriver({ bucket: 'no-such-bucket' });
      expect(await codeOf(gone, gone.health())).toBe(ErrorCode.NotFound);
      await expect(d.health()).resolves.toBeUndefined();
    });
  });
});
