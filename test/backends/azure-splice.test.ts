import { createHash, randomBytes } from 'node:crypto';
import { AccountSASPermissions, StorageSharedKeyCredential, generateAccountSASQueryParameters } from '@azure/storage-blob';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AzureDriver, azureDriverFromUrl } from '../../src/backends/azure.js';
import { MAX_BLOCKS, planBlocks } from '../../src/backends/azure-splice.js';
import { ErrorCode } from '../../src/errors.js';
import { Bucket } from '../../src/storage/bucket.js';
import type { SplicePiece } from '../../src/storage/driver.js';
import { startAzurite, type Azurite } from '../harness/azure.js';

const MiB = 1024 * 1024;
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

describe('planBlocks (Azure blocks of a spliced blob)', () => {
  it('keeps every piece in order, cuts those over the block limit into near-equal blocks and drops empty ones', () => {
    const fresh = randomBytes(1000);
    const pieces: SplicePiece[] = [{ copy: { offset: 0, length: 10 } }, { bytes: fresh }, { bytes: Buffer.alloc(0) }, { copy: { offset: 500, length: 2501 } }];
    expect(planBlocks(pieces, 1000)).toEqual([
      { copy: { offset: 0, length: 10 } }, { bytes: fresh },
      { copy: { offset: 500, length: 834 } }, { copy: { offset: 1334, length: 834 } }, { copy: { offset: 2168, length: 833 } },
    ]);
    const cut = planBlocks([{ bytes: fresh }], 300)!;
    expect(cut.map((b) => ('bytes' in b ? b.bytes.length : 0))).toEqual([250, 250, 250, 250]);
    expect(Buffer.concat(cut.map((b) => ('bytes' in b ? b.bytes : Buffer.alloc(0))))).toEqual(fresh);
  });

  it('refuses more than 50,000 blocks (the blob is then written whole)', () => {
    expect(planBlocks([{ copy: { offset: 0, length: MAX_BLOCKS } }], 1)).toHaveLength(MAX_BLOCKS);
    expect(planBlocks([{ copy: { offset: 0, length: MAX_BLOCKS + 1 } }], 1)).toBeUndefined();
  });
});

// The driver against azurite with the suite's Put Block From URL (test/harness/azure.ts).
describe('azblob splice', () => {
  let az: Azurite;
  let plain: Azurite;
  const old = randomBytes(3 * MiB + 123);
  let n = 0;

  beforeAll(async () => {
    [az, plain] = await Promise.all([startAzurite(), startAzurite({ blockFromUrl: false })]);
  }, 60_000);
  afterAll(async () => {
    await Promise.all([az?.stop(), plain?.stop()]);
  });

  const setup = async (server: Azurite, extra: Partial<ConstructorParameters<typeof AzureDriver>[0]> = {}) => {
    const container = (await server.container()).containerName;
    const driver = new AzureDriver({ connectionString: server.connectionString, container, maxTries: 1, ...extra });
    const bucket = new Bucket(driver, { name: 'az' });
    const key = `dir/k${++n}.bin`;
    const info = await bucket.put(key, old, { contentType: 'application/x-test', metadata: { owner: 'me' } });
    return { driver, bucket, key, info, raw: driver.container.getBlockBlobClient(key) };
  };
  /** The old blob with [1 MiB, 1 MiB + 1000) replaced by 5 new bytes, and the pieces that say so. */
  const edit = () => {
    const fresh = Buffer.from('fresh');
    const want = Buffer.concat([old.subarray(0, MiB), fresh, old.subarray(MiB + 1000)]);
    const pieces: SplicePiece[] = [{ copy: { offset: 0, length: MiB } }, { bytes: fresh }, { copy: { offset: MiB + 1000, length: old.length - MiB - 1000 } }];
    return { want, pieces };
  };
  const download = async (raw: { downloadToBuffer(): Promise<Buffer> }) => raw.downloadToBuffer();

  it('assembles the blob from copied ranges and new bytes: only the new bytes are uploaded; digest, metadata and content type recorded', async () => {
    const { driver, bucket, key, info, raw } = await setup(az);
    expect(bucket.canSplice).toBe(true);
    expect(bucket.spliceOverhead(3)).toBe(0);
    const { want, pieces } = edit();
    const before = await az.stats();
    const spliced = await bucket.splice(key, pieces, { ifMatch: info.etag!, sha256: sha(want), size: want.length, checked: [], contentType: 'application/x-test', metadata: { owner: 'me' } });
    const after = await az.stats();
    // The new bytes, the block list's XML and nothing of the old blob.
    expect(after.uploadedBytes - before.uploadedBytes).toBeLessThan(1000);
    expect(after.copiedBytes - before.copiedBytes).toBe(old.length - 1000);
    expect(after.copiedBlocks - before.copiedBlocks).toBe(2);
    expect(after.copiesUnconditional).toBe(0);
    expect(sha(await download(raw))).toBe(sha(want));
    const stat = await bucket.stat(key);
    expect(stat).toMatchObject({ size: want.length, sha256: sha(want), contentType: 'application/x-test', metadata: { owner: 'me' }, etag: spliced!.etag });
    expect(spliced).toMatchObject({ key, size: want.length, sha256: sha(want) });
    // A spliced blob splices again (its committed blocks replaced by new ones).
    const again = [{ bytes: Buffer.from('x') }, { copy: { offset: 1, length: want.length - 1 } }];
    const want2 = Buffer.concat([Buffer.from('x'), want.subarray(1)]);
    await bucket.splice(key, again, { ifMatch: stat.etag!, sha256: sha(want2), size: want2.length, checked: [] });
    expect(sha(await download(raw))).toBe(sha(want2));
    expect((await raw.getBlockList('committed')).committedBlocks).toHaveLength(2);
    expect(driver.spliceable).toBe(true);
  });

  it('copies a run cut into several blocks block by block, a few at once', async () => {
    const { driver, key, info, raw } = await setup(az);
    const { want, pieces } = edit();
    // Cut as planBlocks cuts runs over 100 MiB, here at 512 KiB: each piece stays one block.
    const blocks = planBlocks(pieces, 512 * 1024)!;
    const before = await az.stats();
    await driver.splice(key, blocks, { ifMatch: info.etag!, sha256: sha(want), size: want.length, checked: [], contentType: undefined, metadata: {}, signal: undefined });
    expect((await az.stats()).copiedBlocks - before.copiedBlocks).toBe(blocks.filter((b) => 'copy' in b).length);
    expect(sha(await download(raw))).toBe(sha(want));
  });

  it.each([
    ['replaced before the second copy: the copy fails (412 SourceConditionNotMet)', 'copy', true],
    ['replaced before the commit: the commit fails (412 ConditionNotMet)', 'commit', true],
    ['deleted before the second copy (404 CannotVerifyCopySource)', 'copy', false],
  ] as const)('a source %s: PreconditionFailed, the other version left whole', async (_why, on, replace) => {
    const { bucket, key, info, raw } = await setup(az);
    const other = az.service.getContainerClient(raw.containerName).getBlockBlobClient(`${key}.other`);
    const otherBytes = randomBytes(MiB);
    await other.uploadData(otherBytes);
    await az.arm({ blob: raw, ...(replace ? { from: other } : {}), on, nth: on === 'copy' ? 2 : 1 });
    const before = await az.stats();
    const { want, pieces } = edit();
    const err = await bucket.splice(key, pieces, { ifMatch: info.etag!, sha256: sha(want), size: want.length, checked: [] }).catch((e: unknown) => e as Error);
    expect(err).toMatchObject({ code: ErrorCode.PreconditionFailed });
    // The source's SAS never reaches a message (nor a log line: pino's serializer takes the message and stack).
    expect(`${(err as Error).message}${(err as Error).stack}`).not.toMatch(/sig=/);
    const after = await az.stats();
    if (on === 'copy') expect(replace ? after.copiesRefused - before.copiesRefused : after.copiesMissing - before.copiesMissing).toBe(1);
    if (replace) expect(sha(await download(raw))).toBe(sha(otherBytes));
    else expect(await raw.exists()).toBe(false);
  });

  it('splices with a SAS connection string too, its token authorising the copy source', async () => {
    const { raw } = await setup(az);
    const key = new StorageSharedKeyCredential('devstoreaccount1', /AccountKey=([^;]+)/.exec(az.connectionString)![1]!);
    const token = generateAccountSASQueryParameters({
      permissions: AccountSASPermissions.parse('rwdlac'), services: 'b', resourceTypes: 'sco', expiresOn: new Date(Date.now() + 3_600_000),
    }, key).toString();
    const driver = new AzureDriver({ connectionString: `BlobEndpoint=${az.endpoint};SharedAccessSignature=${token}`, container: raw.containerName, maxTries: 1 });
    expect(driver.spliceable).toBe(true);
    const bucket = new Bucket(driver, { name: 'az' });
    const info = await bucket.stat(raw.name);
    const { want, pieces } = edit();
    const before = await az.stats();
    await bucket.splice(raw.name, pieces, { ifMatch: info.etag!, sha256: sha(want), size: want.length, checked: [] });
    expect((await az.stats()).copiedBlocks - before.copiedBlocks).toBe(2);
    expect(sha(await download(raw))).toBe(sha(want));
    expect((await bucket.stat(raw.name)).sha256).toBe(sha(want));
  });

  it('(the shim) reads a copy source only as far as its URL authorises: no SAS or a forged one is 403 CannotVerifyCopySource', async () => {
    const { raw } = await setup(az);
    const id = Buffer.from('b'.repeat(48)).toString('base64');
    const forged = `${raw.url}?sv=2025-01-05&sr=b&sp=r&se=2030-01-01T00:00:00Z&sig=AAAA`;
    for (const url of [raw.url, forged]) {
      await expect(raw.stageBlockFromURL(id, url, 0, 5)).rejects.toMatchObject({ statusCode: 403, code: 'CannotVerifyCopySource' });
    }
  });

  it('a store without Put Block From URL (plain azurite, 501): nothing written, resolves undefined, remembered', async () => {
    const { driver, bucket, key, info, raw } = await setup(plain);
    expect(bucket.canSplice).toBe(true);
    const { want, pieces } = edit();
    expect(await bucket.splice(key, pieces, { ifMatch: info.etag!, sha256: sha(want), size: want.length, checked: [] })).toBeUndefined();
    expect(driver.spliceable).toBe(false);
    expect(bucket.canSplice).toBe(false);
    expect((await bucket.stat(key)).etag).toBe(info.etag);
    expect(sha(await download(raw))).toBe(sha(old));
  });

  it.each([403, 404])('a store that cannot read the blob through its URL (%i CannotVerifyCopySource, the blob still there): nothing written, resolves undefined, remembered', async (status) => {
    const { driver, bucket, key, info, raw } = await setup(az);
    await az.arm({ blob: raw, on: 'copy', nth: 1, refuse: status });
    const { want, pieces } = edit();
    const warned: string[] = [];
    const got = await driver.splice(key, pieces, { ifMatch: info.etag!, sha256: sha(want), size: want.length, checked: [], contentType: undefined, metadata: {}, signal: undefined, warn: (m) => warned.push(m) });
    expect(got).toBeUndefined();
    expect(warned).toHaveLength(1);
    expect(driver.spliceable).toBe(false);
    expect((await bucket.stat(key)).etag).toBe(info.etag);
    expect(sha(await download(raw))).toBe(sha(old));
  });

  it('is off with splice=0; on by default, with an account key or a SAS connection string (its token authorises the copy source)', async () => {
    const { connectionString } = az;
    expect(new AzureDriver({ connectionString, container: 'c-1', splice: false }).spliceable).toBe(false);
    expect(azureDriverFromUrl(new URL(`azblob://c-1?splice=0&endpoint=${encodeURIComponent(az.endpoint)}`), { AZURE_STORAGE_CONNECTION_STRING: connectionString }).spliceable).toBe(false);
    expect(azureDriverFromUrl(new URL('azblob://c-1'), { AZURE_STORAGE_CONNECTION_STRING: connectionString }).spliceable).toBe(true);
    // A SAS connection string: its token is the copy source's authorisation.
    const sas = 'BlobEndpoint=https://acct.blob.core.windows.net;SharedAccessSignature=sv=2024-01-01&sig=abc';
    expect(new AzureDriver({ connectionString: sas, container: 'c-1' }).spliceable).toBe(true);
  });
});
