import { createHash, randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { PutObjectCommand, S3ServiceException } from '@aws-sdk/client-s3';
import type { FinalizeRequestMiddleware } from '@smithy/types';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { S3Driver, s3DriverFromUrl, s3OptionsFromUrl } from '../../src/backends/s3.js';
import { ErrorCode, StorageError, classifyCommon } from '../../src/errors.js';
import type { PutBody } from '../../src/storage/driver.js';
import { SourceBody } from '../../src/storage/body.js';
import { Bucket } from '../../src/storage/bucket.js';
import { readAll, runConformance } from '../conformance/suite.js';
import { S3RVER_CREDENTIALS, s3ConformanceTarget } from '../harness/s3.js';
import { freePort } from '../harness/process.js';

const target = s3ConformanceTarget();
runConformance(target);
// After every describe below: each starts the server again if an earlier one stopped it.
afterAll(() => target.teardown());

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');
const noOpts = { contentType: undefined, metadata: {}, ifAbsent: false, signal: undefined };

/** A body as the Bucket builds it for S3: digest known up front, checked again at the stream's end. */
/** `bytes` as a stream of `chunk`-sized pieces; `beforeChunk` sees each piece's offset before it is read. */
function body(bytes: Buffer, opts: { claim?: string; chunk?: number; beforeChunk?: (at: number) => void } = {}): PutBody {
  const claim = opts.claim ?? sha(bytes);
  const chunk = opts.chunk ?? 1 << 20;
  const stream = Readable.from((function* () {
    for (let at = 0; at < bytes.length; at += chunk) {
      opts.beforeChunk?.(at);
      yield bytes.subarray(at, at + chunk);
    }
  })());
  return new SourceBody({ stream }, claim, undefined, { sha256: claim, op: 'put', key: 'k' });
}

/** Records each request's command and If-None-Match / If-Match headers as it leaves the client. */
function recordRequests(d: S3Driver): { command: string; ifNoneMatch: string | undefined; ifMatch?: string | undefined }[] {
  const seen: { command: string; ifNoneMatch: string | undefined; ifMatch?: string | undefined }[] = [];
  d.client.middlewareStack.add((next, context) => async (args) => {
    const headers = (args.request as { headers?: Record<string, string> }).headers ?? {};
    seen.push({ command: String(context.commandName), ifNoneMatch: headers['if-none-match'], ...(headers['if-match'] ? { ifMatch: headers['if-match'] } : {}) });
    return next(args);
  }, { step: 'finalizeRequest' });
  return seen;
}

function caught(fn: () => unknown): unknown {
  try { fn(); } catch (err) { return err; }
  return undefined;
}

describe('s3 URLs', () => {
  it('takes the bucket from the host and settings from the query', () => {
    expect(s3OptionsFromUrl(new URL('s3://builds/some/prefix?endpoint=http%3A%2F%2F127.0.0.1%3A9000&region=eu-west-1&forcePathStyle=true&checksums=when_required&conditionalWrites=false&partSize=16777216&queueSize=2')))
      .toEqual({
        bucket: 'builds', endpoint: 'http://127.0.0.1:9000', region: 'eu-west-1', forcePathStyle: true,
        checksums: 'when_required', conditionalWrites: false, partSize: 16 * 1024 * 1024, queueSize: 2,
      });
    expect(s3OptionsFromUrl(new URL('s3://builds'))).toEqual({ bucket: 'builds' });
  });

  it('builds a driver whose atomic ifAbsent follows conditionalWrites', async () => {
    const on = s3DriverFromUrl(new URL('s3://builds?region=us-east-1'));
    const off = s3DriverFromUrl(new URL('s3://builds?region=us-east-1&conditionalWrites=false'));
    expect([on.kind, on.metadataAtEnd, on.atomicIfAbsent, off.atomicIfAbsent]).toEqual(['s3', false, true, false]);
    await on.close();
    await off.close();
  });

  it.each([
    ['credentials in the URL', 's3://AKIA:secret@builds/p'],
    ['an unknown parameter', 's3://builds?endpont=http://x'],
    ['a bad boolean', 's3://builds?forcePathStyle=yes'],
    ['an endpoint that is not a URL', 's3://builds?endpoint=localhost:9000'],
    ['a bad checksum mode', 's3://builds?checksums=always'],
    ['a part size below S3\'s minimum', 's3://builds?partSize=1024'],
  ])('refuses %s', (_why, url) => {
    const err = caught(() => s3OptionsFromUrl(new URL(url)));
    expect(err).toBeInstanceOf(StorageError);
    expect((err as StorageError).code).toBe(ErrorCode.InvalidInput);
    expect((err as StorageError).message).not.toContain('secret');
  });

  it('takes credentials from the SDK environment', async () => {
    const s = await target.s3rver();
    const bucket = await s.bucket();
    vi.stubEnv('AWS_ACCESS_KEY_ID', S3RVER_CREDENTIALS.accessKeyId);
    vi.stubEnv('AWS_SECRET_ACCESS_KEY', S3RVER_CREDENTIALS.secretAccessKey);
    try {
      const d = s3DriverFromUrl(new URL(`s3://${bucket}?endpoint=${encodeURIComponent(s.endpoint)}&forcePathStyle=true&checksums=when_required`));
      await expect(d.health()).resolves.toBeUndefined();
      await d.close();
    } finally {
      vi.unstubAllEnvs();
    }
  });
});

describe('s3 driver', () => {
  it.each([
    ['a single request', 1000],
    ['a multipart upload', target.multipartThreshold + 1_234_567],
  ])('stores the digest as metadata and reports the size, for %s', async (_n, n) => {
    const d = await target.newDriver();
    const seen = recordRequests(d);
    const bytes = randomBytes(n);
    const info = await d.put('k', body(bytes), { ...noOpts, contentType: 'application/gzip', metadata: { build: '7' } });
    expect(info).toMatchObject({ key: 'k', size: n, sha256: sha(bytes), contentType: 'application/gzip', metadata: { build: '7' } });
    expect(seen.some((r) => r.command === 'CompleteMultipartUploadCommand')).toBe(n > target.multipartThreshold);
    const stat = await d.stat('k');
    expect(stat).toMatchObject({ size: n, sha256: sha(bytes), etag: info.etag, metadata: { build: '7' } });
  });

  it.each([
    ['a single request', 1000],
    ['a multipart upload', 2 * target.multipartThreshold + 12_345],
  ])('makes nothing visible when the body errors at its end, for %s', async (_n, n) => {
    const d = await target.newDriver();
    const old = Buffer.from('old');
    await d.put('k', body(old), noOpts);
    // The claimed digest is the old object's: the hashing stream errors only after the last byte.
    const err = await d.put('k', body(randomBytes(n), { claim: sha(old) }), noOpts).catch((e: unknown) => e);
    expect((err as StorageError).code).toBe(ErrorCode.ChecksumMismatch);
    const got = await d.get('k', undefined, undefined);
    expect(got.info).toMatchObject({ sha256: sha(old), size: 3 });
    expect(await readAll(got.stream)).toEqual(old);
    expect((await d.list('', undefined, 10)).objects.map((o) => o.key)).toEqual(['k']);
  });

  it('uploads through reused part buffers: one PutObject up to a part, no empty last part, parts intact past the pool', async () => {
    const P = target.multipartThreshold;
    const d = await target.newDriver({ queueSize: 2 });
    const seen = recordRequests(d);
    const cases = [
      { key: 'one', bytes: randomBytes(P), sizeKnown: true, parts: 0 },
      { key: 'even', bytes: randomBytes(3 * P), sizeKnown: false, parts: 3 },
      // Eight parts through three buffers: each buffer carries several parts in turn.
      { key: 'many', bytes: randomBytes(7 * P + 123), sizeKnown: true, parts: 8 },
    ];
    for (const c of cases) {
      seen.length = 0;
      const b = new SourceBody({ bytes: c.bytes }, sha(c.bytes), c.sizeKnown ? c.bytes.length : undefined, { sha256: sha(c.bytes), op: 'put', key: c.key });
      await d.put(c.key, b, noOpts);
      const commands = seen.map((r) => r.command);
      expect(commands.filter((n) => n === 'UploadPartCommand')).toHaveLength(c.parts);
      expect(commands.includes('PutObjectCommand')).toBe(c.parts === 0);
      const got = await d.get(c.key, undefined, undefined);
      expect(got.info).toMatchObject({ size: c.bytes.length, sha256: sha(c.bytes) });
      expect(sha(await readAll(got.stream))).toBe(sha(c.bytes));
    }
  });

  it('sends a body of known size up to singlePutSize as one PutObject, taking its digest as it is read; the Bucket neither hashes first nor spools it', async () => {
    const P = target.multipartThreshold;
    const d = await target.newDriver({ singlePutSize: 3 * P });
    expect(d.digestAtEndUpTo).toBe(3 * P);
    const seen = recordRequests(d);
    const bytes = randomBytes(2 * P + 77);
    // No digest from anyone: a stream of known size, as copyObject hands over a legacy source.
    const b = new SourceBody({ stream: Readable.from([bytes.subarray(0, P), bytes.subarray(P)]) }, undefined, bytes.length, { size: bytes.length, op: 'put', key: 'whole' });
    expect(await d.put('whole', b, noOpts)).toMatchObject({ size: bytes.length, sha256: sha(bytes) });
    expect(seen.map((r) => r.command)).toEqual(['PutObjectCommand']);
    expect(await d.stat('whole')).toMatchObject({ size: bytes.length, sha256: sha(bytes) });

    // A spool folder that cannot exist: a put that spooled would fail.
    const bucket = new Bucket(d, { spoolDir: '/proc/no-spool-here' });
    expect(bucket.digestFirst(3 * P)).toBe(false);
    expect(bucket.digestFirst(3 * P + 1)).toBe(true);
    expect(bucket.digestFirst(undefined)).toBe(true);
    seen.length = 0;
    const other = randomBytes(P + 5);
    expect(await bucket.put('via-bucket', Readable.from([other]), { size: other.length })).toMatchObject({ sha256: sha(other), size: other.length });
    expect(seen.map((r) => r.command)).toEqual(['PutObjectCommand']);
    // Over singlePutSize a stream of unknown digest is spooled (here: refused) and would go multipart, as before.
    const big = randomBytes(3 * P + 1);
    await expect(bucket.put('spooled', Readable.from([big]), { size: big.length })).rejects.toMatchObject({ code: ErrorCode.NotFound, message: expect.stringContaining('ENOENT') });
  });

  it('signs a single PutObject by the digest it checked, so the SDK does not hash the body again; parts stay signed by the SDK', async () => {
    const P = target.multipartThreshold;
    const d = await target.newDriver({ singlePutSize: 2 * P });
    // What the signer meets: a request that already carries x-amz-content-sha256 is signed by it
    // as it is (@smithy/signature-v4 getPayloadHash), without hashing the body.
    const before: { command: string; payload: string | undefined }[] = [];
    const seeUnsigned: FinalizeRequestMiddleware<object, object> = (next, context) => async (args) => {
      const headers = (args.request as { headers?: Record<string, string> }).headers ?? {};
      before.push({ command: String(context.commandName), payload: headers['x-amz-content-sha256'] });
      return next(args);
    };
    d.client.middlewareStack.addRelativeTo(seeUnsigned as never, { relation: 'before', toMiddleware: 'httpSigningMiddleware', name: 'testSeesUnsigned' });
    const small = randomBytes(P + 3);
    // Without a digest from anyone (hashed as the buffer filled), and with the caller's.
    const legacy = new SourceBody({ stream: Readable.from([small]) }, undefined, small.length, { size: small.length, op: 'put', key: 'legacy' });
    await d.put('legacy', legacy, noOpts);
    await d.put('known', new SourceBody({ bytes: small }, sha(small), small.length, { sha256: sha(small), op: 'put', key: 'known' }), noOpts);
    expect(before).toEqual([{ command: 'PutObjectCommand', payload: sha(small) }, { command: 'PutObjectCommand', payload: sha(small) }]);
    // The store took the signature over that digest.
    expect(await d.stat('legacy')).toMatchObject({ size: small.length, sha256: sha(small) });
    before.length = 0;
    const big = randomBytes(2 * P + 1);
    await d.put('parts', body(big), noOpts);
    expect(before.filter((r) => r.command === 'UploadPartCommand').map((r) => r.payload)).toEqual([undefined, undefined, undefined]);
    expect(sha(await readAll((await d.get('parts', undefined, undefined)).stream))).toBe(sha(big));
  });

  it('refuses a body of unknown digest that runs past its size, sending nothing', async () => {
    const d = await target.newDriver({ singlePutSize: 2 * target.multipartThreshold });
    const seen = recordRequests(d);
    const bytes = randomBytes(1000);
    const b = new SourceBody({ stream: Readable.from([bytes]) }, undefined, 999, { size: 999, op: 'put', key: 'k' });
    await expect(d.put('k', b, noOpts)).rejects.toMatchObject({ code: ErrorCode.ChecksumMismatch });
    expect(seen).toEqual([]);
    expect(d.classify(await d.stat('k').catch((e: unknown) => e))).toBe(ErrorCode.NotFound);
  });

  it('defaults singlePutSize to the memory of a multipart upload, partSize x (queueSize + 1), and never below partSize', () => {
    const opts = { bucket: 'b', endpoint: 'http://127.0.0.1:1', credentials: S3RVER_CREDENTIALS };
    expect(new S3Driver(opts).singlePutSize).toBe(40 * 1024 * 1024);
    expect(new S3Driver({ ...opts, partSize: 16 * 1024 * 1024, queueSize: 2 }).singlePutSize).toBe(48 * 1024 * 1024);
    expect(new S3Driver({ ...opts, partSize: 16 * 1024 * 1024, singlePutSize: 1 }).singlePutSize).toBe(16 * 1024 * 1024);
    expect(s3OptionsFromUrl(new URL('s3://b?singlePutSize=67108864')).singlePutSize).toBe(64 * 1024 * 1024);
  });

  it('rejects, rather than hangs, when the body closes without ending', async () => {
    const d = await target.newDriver();
    let sent = 0;
    const source = new Readable({ read() { if (sent++ < 3) this.push(randomBytes(65_536)); else this.destroy(); } });
    const b = new SourceBody({ stream: source }, sha(Buffer.alloc(0)), undefined, { op: 'put', key: 'k' });
    await expect(d.put('k', b, noOpts)).rejects.toMatchObject({ code: 'ERR_STREAM_PREMATURE_CLOSE' });
    expect(d.classify(await d.stat('k').catch((e: unknown) => e))).toBe(ErrorCode.NotFound);
  });

  it('stops an upload when its signal aborts mid-way, committing nothing', async () => {
    const d = await target.newDriver();
    const ac = new AbortController();
    const bytes = randomBytes(4 * target.multipartThreshold);
    const seen = recordRequests(d);
    // Aborted once two parts have been read: the upload has begun and a part is on its way.
    const b = body(bytes, { chunk: 65_536, beforeChunk: (at) => { if (at === 2 * target.multipartThreshold + 65_536) ac.abort(); } });
    const err = await d.put('k', b, { ...noOpts, signal: ac.signal }).catch((e: unknown) => e);
    expect((err as Error).name).toBe('AbortError');
    expect(seen.map((r) => r.command)).toContain('CreateMultipartUploadCommand');
    expect(seen.map((r) => r.command)).not.toContain('CompleteMultipartUploadCommand');
    expect(d.classify(await d.stat('k').catch((e: unknown) => e))).toBe(ErrorCode.NotFound);
  });

  it('sends If-None-Match: * for ifAbsent writes and copies when conditional writes are on', async () => {
    // s3rver ignores the header, so this checks what reaches the wire; real S3, MinIO and R2 enforce it.
    const d = await target.newDriver({ conditionalWrites: true });
    const seen = recordRequests(d);
    await d.put('small', body(Buffer.from('x')), { ...noOpts, ifAbsent: true });
    await d.put('big', body(randomBytes(target.multipartThreshold + 1)), { ...noOpts, ifAbsent: true });
    await d.copy('small', 'copy', { ifAbsent: true });
    await d.put('plain', body(Buffer.from('y')), noOpts);
    const sent = (command: string) => seen.filter((r) => r.command === command).map((r) => r.ifNoneMatch);
    expect(sent('PutObjectCommand')).toEqual(['*', undefined]);
    expect(sent('CompleteMultipartUploadCommand')).toEqual(['*']);
    expect(sent('CopyObjectCommand')).toEqual(['*']);
    expect(sent('UploadPartCommand').every((h) => h === undefined)).toBe(true);
  });

  it('reads an empty object from byte 0, where S3 refuses any range', async () => {
    const d = await target.newDriver();
    await d.put('empty', body(Buffer.alloc(0)), noOpts);
    const got = await d.get('empty', { start: 0 }, undefined);
    expect(got.info).toMatchObject({ size: 0, sha256: sha(Buffer.alloc(0)) });
    expect((await readAll(got.stream)).length).toBe(0);
    expect(d.classify(await d.get('empty', { start: 1 }, undefined).catch((e: unknown) => e))).toBe(ErrorCode.InvalidInput);
  });

  it('refuses to pass other bytes off as the range asked for', async () => {
    const d = await target.newDriver();
    await d.put('k', body(Buffer.from('0123456789')), noOpts);
    // A proxy that drops Range makes the store answer 200 with the whole object.
    d.client.middlewareStack.add((next) => async (args) => {
      delete (args.request as { headers: Record<string, string> }).headers['range'];
      return next(args);
    }, { step: 'build' });
    await expect(d.get('k', { start: 2, end: 4 }, undefined)).rejects.toThrow(/asked for bytes=2-4/);
    const whole = await d.get('k', { start: 0, end: 20 }, undefined);
    expect((await readAll(whole.stream)).toString()).toBe('0123456789');
  });

  it('lists without a request per object, so listed entries carry no digest', async () => {
    const d = await target.newDriver();
    await d.put('a', body(Buffer.from('a')), noOpts);
    const seen = recordRequests(d);
    const page = await d.list('', undefined, 10);
    expect(page.objects).toMatchObject([{ key: 'a', size: 1, sha256: undefined }]);
    expect(seen.map((r) => r.command)).toEqual(['ListObjectsV2Command']);
  });

  it('maps the service\'s errors to codes', async () => {
    const s = await target.s3rver();
    const d = await target.newDriver();
    expect(d.classify(await d.get('nope', undefined, undefined).catch((e: unknown) => e))).toBe(ErrorCode.NotFound);
    expect(d.classify(await d.stat('nope').catch((e: unknown) => e))).toBe(ErrorCode.NotFound);
    await d.put('k', body(Buffer.from('x')), noOpts);
    expect(d.classify(await d.get('k', { start: 5 }, undefined).catch((e: unknown) => e))).toBe(ErrorCode.InvalidInput);
    const missing = new S3Driver({ ...s.driverOptions('no-such-bucket'), maxAttempts: 1 });
    expect(missing.classify(await missing.health().catch((e: unknown) => e))).toBe(ErrorCode.NotFound);
    expect(missing.classify(await missing.list('', undefined, 1).catch((e: unknown) => e))).toBe(ErrorCode.NotFound);
    // s3rver checks the access key id but not SigV4 signatures.
    const denied = new S3Driver({ ...s.driverOptions(d.bucket), credentials: { accessKeyId: 'NOBODY', secretAccessKey: 'x' }, maxAttempts: 1 });
    expect(denied.classify(await denied.stat('k').catch((e: unknown) => e))).toBe(ErrorCode.PermissionDenied);
    expect(denied.classify(await denied.get('k', undefined, undefined).catch((e: unknown) => e))).toBe(ErrorCode.PermissionDenied);
    const gone = new S3Driver({ ...s.driverOptions('b'), endpoint: `http://127.0.0.1:${await freePort()}`, maxAttempts: 1 });
    const refused = await gone.health().catch((e: unknown) => e);
    expect(gone.classify(refused) ?? classifyCommon(refused)).toBe(ErrorCode.Transient);
    await Promise.all([missing.close(), denied.close(), gone.close()]);
  });

  it.each([
    ['SlowDown', 503, ErrorCode.Transient],
    ['InternalError', 500, ErrorCode.Transient],
    ['RequestTimeout', 400, ErrorCode.Transient],
    ['PreconditionFailed', 412, ErrorCode.PreconditionFailed],
    ['ConditionalRequestConflict', 409, ErrorCode.Transient],
    ['AccessDenied', 403, ErrorCode.PermissionDenied],
    ['InvalidRange', 416, ErrorCode.InvalidInput],
    ['SomethingNew', 429, ErrorCode.Transient],
  ] as const)('maps %s (%i) to %s', async (name, status, code) => {
    const d = await target.newDriver();
    const err = new S3ServiceException({ name, $fault: 'server', $metadata: { httpStatusCode: status } });
    expect(d.classify(err)).toBe(code);
    expect(d.classify(new Error('plain'))).toBeUndefined();
    await d.close();
  });
});

describe('s3 conditional writes', () => {
  it('makes ifMatch atomic only where conditionalWrites says the store honours If-Match, and callers can tell', async () => {
    const on = s3DriverFromUrl(new URL('s3://builds?region=us-east-1'));
    const off = s3DriverFromUrl(new URL('s3://builds?region=us-east-1&conditionalWrites=false'));
    expect([new Bucket(on).atomicIfMatch, new Bucket(off).atomicIfMatch]).toEqual([true, false]);
    await on.close();
    await off.close();
  });

  it.each([
    ['a single PutObject', 1000, 'PutObjectCommand'],
    ['a multipart upload', target.multipartThreshold + 1000, 'CompleteMultipartUploadCommand'],
  ])('sends If-Match on the request that makes %s visible, on CopyObject and on DeleteObject', async (_n, n, committing) => {
    // s3rver ignores If-Match; what is checked here is that the driver sends it where S3 enforces it.
    const d = await target.newDriver({ conditionalWrites: true });
    const seen = recordRequests(d);
    const b = new Bucket(d);
    const v1 = await b.put('k', randomBytes(n));
    await b.put('k', randomBytes(n), { ifMatch: v1.etag! });
    expect(seen.filter((r) => r.ifMatch !== undefined).map((r) => [r.command, r.ifMatch])).toEqual([[committing, v1.etag]]);
    seen.length = 0;
    const current = (await b.stat('k')).etag!;
    await b.put('src', Buffer.from('s'));
    await b.copy('src', 'k', { ifMatch: current });
    const copied = (await b.stat('k')).etag!;
    await b.delete('k', { ifMatch: copied });
    expect(seen.filter((r) => r.ifMatch !== undefined).map((r) => [r.command, r.ifMatch])).toEqual([
      ['CopyObjectCommand', current], ['DeleteObjectCommand', copied],
    ]);
    await d.close();
  });
});

describe('s3 copy of sources too big for CopyObject', () => {
  // maxCopyObject lowered from 5 GiB so a 12 MiB object takes the multipart path: 3 parts of 5 MiB.
  const partSize = 5 * 1024 * 1024;
  const bytes = randomBytes(2 * partSize + 2_000_000);

  it('copies part by part with UploadPartCopy, keeping bytes, digest, type and metadata', async () => {
    const d = await target.newDriver({ maxCopyObject: partSize, copyPartSize: partSize });
    const bucket = new Bucket(d);
    await bucket.put('src', bytes, { contentType: 'application/x-tar', metadata: { build: '42' } });
    const seen = recordRequests(d);
    const info = await bucket.copy('src', 'dst');
    expect(seen.filter((r) => r.command === 'UploadPartCopyCommand')).toHaveLength(3);
    expect(seen.some((r) => r.command === 'CopyObjectCommand')).toBe(false);
    expect(info).toMatchObject({ key: 'dst', size: bytes.length, sha256: sha(bytes), contentType: 'application/x-tar', metadata: { build: '42' } });
    // A full read is verified against the copied digest.
    expect(sha(await readAll((await bucket.get('dst')).stream))).toBe(sha(bytes));
  });

  it('keeps using CopyObject below the limit', async () => {
    const d = await target.newDriver({ maxCopyObject: partSize });
    const bucket = new Bucket(d);
    await bucket.put('small', Buffer.from('tiny'));
    const seen = recordRequests(d);
    await bucket.copy('small', 'copy');
    expect(seen.map((r) => r.command)).toContain('CopyObjectCommand');
    expect(seen.map((r) => r.command)).not.toContain('UploadPartCopyCommand');
  });

  it('fails, leaving nothing at the destination, when the source is replaced mid-copy', async () => {
    const d = await target.newDriver({ maxCopyObject: partSize, copyPartSize: partSize, queueSize: 1 });
    const bucket = new Bucket(d);
    await bucket.put('src', bytes);
    const s3 = await target.s3rver();
    let replaced = false;
    // Just before the first part is copied, another writer replaces the source.
    d.client.middlewareStack.add((next, context) => async (args) => {
      if (context.commandName === 'UploadPartCopyCommand' && !replaced) {
        replaced = true;
        await s3.client.send(new PutObjectCommand({ Bucket: d.bucket, Key: 'src', Body: randomBytes(bytes.length) }));
      }
      return next(args);
    }, { step: 'finalizeRequest' });
    const err = await bucket.copy('src', 'dst').catch((e: unknown) => e);
    expect(replaced).toBe(true);
    expect(err).toMatchObject({ code: ErrorCode.PreconditionFailed });
    expect(await bucket.stat('dst').catch((e: unknown) => (e as StorageError).code)).toBe(ErrorCode.NotFound);
  });
});
