import { createHash, randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { afterAll, describe, expect, it } from 'vitest';
import { AzureDriver, azureDriverFromUrl } from '../../src/backends/azure.js';
import { ErrorCode, StorageError, classifyCommon } from '../../src/errors.js';
import type { PutBody } from '../../src/storage/driver.js';
import { SourceBody } from '../../src/storage/body.js';
import { runConformance } from '../conformance/suite.js';
import { azureConformanceTarget } from '../harness/azure.js';
import { freePort } from '../harness/process.js';

const target = azureConformanceTarget();
runConformance(target);

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');
/** The code the Bucket would give a driver's error: the driver's own mapping, then the common one. */
const codeOf = (d: AzureDriver, p: Promise<unknown>) => p.then(() => 'resolved', (e: unknown) => d.classify(e) ?? classifyCommon(e));
const noOpts = { contentType: undefined, metadata: {}, ifAbsent: false, signal: undefined };

/** A body as the Bucket builds it when the digest is not known up front (`sha256` undefined). */
function body(bytes: Buffer, opts: { expect?: string; at?: number; then?: (b: PutBody) => void } = {}): PutBody {
  const chunk = 65_536;
  let b: PutBody | undefined;
  const stream = Readable.from((function* () {
    for (let at = 0; at < bytes.length; at += chunk) {
      if (opts.then && at >= (opts.at ?? 0)) { opts.then(b!); return; }
      yield bytes.subarray(at, at + chunk);
    }
  })());
  b = new SourceBody({ stream }, undefined, undefined, { sha256: opts.expect, op: 'put', key: 'k' });
  return b;
}

describe('azblob URLs', () => {
  const env = { AZURE_STORAGE_CONNECTION_STRING: 'DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.windows.net' };

  it('takes the container from the host and the endpoint from the query', () => {
    const d = azureDriverFromUrl(new URL('azblob://builds/some/prefix?endpoint=http%3A%2F%2F127.0.0.1%3A10000%2Fdevstoreaccount1'), env);
    expect(d.container.containerName).toBe('builds');
    expect(d.container.url).toBe('http://127.0.0.1:10000/devstoreaccount1/builds');
    expect(azureDriverFromUrl(new URL('azblob://builds'), env).container.url).toBe('https://acct.blob.core.windows.net/builds');
  });

  it('keeps a SAS connection string\'s token when the endpoint is overridden', () => {
    const sas = { AZURE_STORAGE_CONNECTION_STRING: 'BlobEndpoint=https://acct.blob.core.windows.net;SharedAccessSignature=sv=2024-01-01&sig=abc' };
    const d = azureDriverFromUrl(new URL('azblob://builds?endpoint=http://127.0.0.1:1/acct'), sas);
    expect(d.container.url).toBe('http://127.0.0.1:1/acct/builds?sv=2024-01-01&sig=abc');
  });

  it.each([
    ['credentials in the URL', 'azblob://user:secret@builds/p', env],
    ['a SAS in the query', 'azblob://builds?sig=abc', env],
    ['a missing connection string', 'azblob://builds', {}],
    ['an invalid container name', 'azblob://a_b', env],
  ])('refuses %s', (_why, url, e) => {
    let err: unknown;
    try { azureDriverFromUrl(new URL(url), e); } catch (x) { err = x; }
    expect(err).toBeInstanceOf(StorageError);
    expect((err as StorageError).code).toBe(ErrorCode.InvalidInput);
    expect((err as StorageError).message).not.toContain('secret');
  });
});

describe('azblob driver', () => {
  afterAll(() => target.teardown());

  it.each([
    ['a single block', 1000],
    ['several blocks', 2 * target.multipartThreshold + 12_345],
  ])('records the digest worked out while streaming at commit, for %s', async (_n, n) => {
    const d = await target.newDriver();
    const bytes = randomBytes(n);
    const info = await d.put('k', body(bytes), { ...noOpts, metadata: { build: '7' } });
    expect(info).toMatchObject({ size: n, sha256: sha(bytes) });
    const raw = d.container.getBlockBlobClient('k');
    expect((await raw.getProperties()).metadata).toEqual({ build: '7', sha256: sha(bytes) });
    // One block's worth goes up as a single Put Blob, which leaves no block list.
    const blocks = (await raw.getBlockList('committed')).committedBlocks ?? [];
    expect(blocks.length).toBe(n > target.multipartThreshold ? Math.ceil(n / target.multipartThreshold) : 0);
  });

  it.each([
    ['a single block', 1000],
    ['several blocks', 2 * target.multipartThreshold + 12_345],
  ])('commits nothing over an existing blob when the body errors at its end, for %s', async (_n, n) => {
    const d = await target.newDriver();
    const old = Buffer.from('old');
    await d.put('k', body(old), noOpts);
    const err = await d.put('k', body(randomBytes(n), { expect: sha(old) }), noOpts).catch((e: unknown) => e);
    expect((err as StorageError).code).toBe(ErrorCode.ChecksumMismatch);
    const got = await d.get('k', undefined, undefined);
    expect(got.info.sha256).toBe(sha(old));
    expect(got.info.size).toBe(3);
  });

  describe.each([
    ['within the first block', 100_000],
    ['while blocks are staged', target.multipartThreshold + 1_000_000],
  ])('when the body breaks off %s', (_when, at) => {
    const n = 3 * target.multipartThreshold;

    it('rejects, rather than hangs, if the body closes without ending, committing nothing', async () => {
      const d = await target.newDriver();
      const err = await d.put('k', body(randomBytes(n), { at, then: (b) => b.stream.destroy() }), noOpts).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'ERR_STREAM_PREMATURE_CLOSE' });
      expect(await codeOf(d, d.stat('k'))).toBe(ErrorCode.NotFound);
    });

    it('stops when the signal aborts, committing nothing', async () => {
      const d = await target.newDriver();
      const ac = new AbortController();
      const err = await d.put('k', body(randomBytes(n), { at, then: () => ac.abort() }), { ...noOpts, signal: ac.signal }).catch((e: unknown) => e);
      expect((err as Error).name).toBe('AbortError');
      expect(await codeOf(d, d.stat('k'))).toBe(ErrorCode.NotFound);
    });
  });

  it('keeps one whole object when multi-block writers race, failing the losers as Transient', async () => {
    const d = await target.newDriver();
    const bodies = Array.from({ length: 3 }, () => randomBytes(2 * target.multipartThreshold + 1000));
    const results = await Promise.allSettled(bodies.map((b) => codeOf(d, d.put('k', body(b), noOpts))));
    const codes = results.map((r) => (r.status === 'fulfilled' ? r.value : r.reason));
    for (const c of codes) expect(['resolved', ErrorCode.Transient]).toContain(c);
    expect(codes).toContain('resolved');
    const got = await d.get('k', undefined, undefined);
    const chunks: Buffer[] = [];
    for await (const c of got.stream) chunks.push(c as Buffer);
    expect(bodies.map(sha)).toContain(sha(Buffer.concat(chunks)));
    expect(got.info.sha256).toBe(sha(Buffer.concat(chunks)));
  });

  it('maps the service\'s errors to codes', async () => {
    const az = await target.azurite();
    const missing = new AzureDriver({ connectionString: az.connectionString, container: 'no-such-container', maxTries: 1 });
    expect(await codeOf(missing, missing.health())).toBe(ErrorCode.NotFound);
    const d = await target.newDriver();
    expect(await codeOf(d, d.get('nope', undefined, undefined))).toBe(ErrorCode.NotFound);
    await d.put('k', body(Buffer.from('x')), noOpts);
    expect(await codeOf(d, d.put('k', body(Buffer.from('y')), { ...noOpts, ifAbsent: true }))).toBe(ErrorCode.PreconditionFailed);
    expect(await codeOf(d, d.put('k', body(randomBytes(target.multipartThreshold + 1)), { ...noOpts, ifAbsent: true }))).toBe(ErrorCode.PreconditionFailed);
    expect(await codeOf(d, d.get('k', { start: 5 }, undefined))).toBe(ErrorCode.InvalidInput);
    const wrongKey = az.connectionString.replace(/AccountKey=[^;]+/, `AccountKey=${randomBytes(64).toString('base64')}`);
    const denied = new AzureDriver({ connectionString: wrongKey, container: d.container.containerName, maxTries: 1 });
    expect(await codeOf(denied, denied.stat('k'))).toBe(ErrorCode.PermissionDenied);
    const gone = new AzureDriver({ connectionString: az.connectionString, endpoint: `http://127.0.0.1:${await freePort()}/devstoreaccount1`, container: 'c-1', maxTries: 1 });
    expect(await codeOf(gone, gone.health())).toBe(ErrorCode.Transient);
  });
});
