import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { ContainerClient } from '@azure/storage-blob';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RepackPayload, repackSession } from '../../jobs/repack-session.js';
import { AzureDriver } from '../../src/backends/azure.js';
import { parsePayload } from '../../src/payload.js';
import { Bucket } from '../../src/storage/bucket.js';
import { SHA256_META, type ObjectInfo } from '../../src/storage/driver.js';
import { sessionKey, sessionLockName } from '../../src/session/ids.js';
import type { SeekIndex } from '../../src/session/seek-format.js';
import { shouldSplice } from '../../src/session/seek-splice.js';
import { members, run } from '../archive/corpus.js';
import { startAzurite, type Azurite } from '../harness/azure.js';
import { catText, jobDeps, nodeMembers, plain, readEveryWay, sessionEnv, type SessionEnv } from './helpers.js';

const MiB = 1024 * 1024;
const sha = (b: string | Buffer): string => createHash('sha256').update(b).digest('hex');
const EDITED = 'm/pkg-10/mod-3.txt';
const OTHER = 'm/pkg-20/mod-1.txt';
/** A rewritten segment (cut near 256 KiB of tar) compressed, the index of 600 entries and the block list: well under this. */
const NEW_SEGMENT_AND_INDEX = 512 * 1024;

// Edits of a ~11 MiB seekable session on azurite, whose shim (test/harness/azure.ts) has Put
// Block From URL and counts the bytes uploaded and copied.
describe('server-side splicing of session edits (Azure)', () => {
  let env: SessionEnv;
  let az: Azurite;
  let plainAz: Azurite;
  let container: ContainerClient;
  let seekable: string;
  let archiveSize: number;
  let n = 0;

  const newBucket = (server: Azurite, name: string): Bucket =>
    new Bucket(new AzureDriver({ connectionString: server.connectionString, container: name, maxTries: 1 }), { name: 'azure' });
  const repack = (bucket: Bucket, session: string, ops: unknown[]) =>
    repackSession(parsePayload(RepackPayload, { session, ops }), jobDeps(bucket, env.conn, env.staging, { jobId: `a${++n}`, enqueuedAt: Date.parse('2026-12-06T10:00:00Z') + n }));
  /** The stored blob's bytes, written to `file`; its recorded digest. */
  const download = async (c: ContainerClient, session: string, file: string): Promise<string | undefined> => {
    const res = await c.getBlockBlobClient(sessionKey(session)).downloadToBuffer();
    await writeFile(file, res);
    return (await c.getBlockBlobClient(sessionKey(session)).getProperties()).metadata?.[SHA256_META];
  };
  /** A copy of the converted session under a new id. */
  const fresh = async (bucket: Bucket): Promise<string> => {
    const s = `azsplice__repo__s${++n}`;
    await bucket.put(sessionKey(s), { path: seekable });
    return s;
  };
  /** Another writer's version of the session: the converted one with another file edited (made once). */
  let other: string | undefined;
  const otherWriter = async (): Promise<string> => {
    if (other) return other;
    const bucket = newBucket(az, container.containerName);
    const o = await fresh(bucket);
    await repack(bucket, o, [{ op: 'put', path: OTHER, text: 'the other writer\n' }]);
    other = o;
    return o;
  };
  const blob = (session: string) => container.getBlockBlobClient(sessionKey(session));

  beforeAll(async () => {
    [env, az, plainAz] = await Promise.all([sessionEnv('stevedore-azsplice-'), startAzurite(), startAzurite({ blockFromUrl: false })]);
    container = await az.container();
    // 600 text files between incompressible binaries: an edit in the middle has megabytes of
    // untouched segments on both sides.
    const src = join(env.tmp.path, 'src');
    await mkdir(join(src, 'a'), { recursive: true });
    await mkdir(join(src, 'z'), { recursive: true });
    await writeFile(join(src, 'a/blob-0.bin'), randomBytes(5 * MiB));
    for (let d = 0; d < 30; d++) {
      await mkdir(join(src, `m/pkg-${d}`), { recursive: true });
      for (let f = 0; f < 20; f++) await writeFile(join(src, `m/pkg-${d}/mod-${f}.txt`), `${d}/${f}\n${randomBytes(1500).toString('base64')}\n`);
    }
    await writeFile(join(src, 'z/blob-1.bin'), randomBytes(5 * MiB));
    const gnu = join(env.tmp.path, 'gnu.tgz');
    await run('tar', ['--sort=name', '-I', 'gzip -1', '-cf', gnu, '-C', src, '.']);
    // The first repack converts it (streamed: it has no index yet).
    const bucket = newBucket(az, container.containerName);
    const base = 'azsplice__repo__base';
    await bucket.put(sessionKey(base), { path: gnu });
    await repack(bucket, base, [{ op: 'put', path: 'NOTES.md', text: 'converted\n' }]);
    seekable = join(env.tmp.path, 'seekable.tgz');
    await download(container, base, seekable);
    archiveSize = (await readFile(seekable)).length;
  }, 120_000);
  afterAll(async () => {
    await Promise.all([az?.stop(), plainAz?.stop()]);
    await env?.close();
  });

  it('a one-file edit uploads only the new segment and index, and every reader reads the archive as before plus the edit', async () => {
    expect(archiveSize).toBeGreaterThan(10 * MiB);
    const bucket = newBucket(az, container.containerName);
    const s = await fresh(bucket);
    const text = `edited\n${randomBytes(20_000).toString('hex')}\n`;
    const before = await az.stats();
    const result = await repack(bucket, s, [{ op: 'put', path: EDITED, text }]);
    const after = await az.stats();
    // No old byte is sent: every untouched range is copied by the store (no part floor on Azure).
    expect(after.uploadedBytes - before.uploadedBytes).toBeLessThanOrEqual(text.length + NEW_SEGMENT_AND_INDEX);
    expect(after.copiedBlocks - before.copiedBlocks).toBeGreaterThanOrEqual(2);
    expect(after.copiedBytes - before.copiedBytes).toBeGreaterThan(archiveSize - NEW_SEGMENT_AND_INDEX);
    expect(after.copiesUnconditional).toBe(0);

    const file = join(env.tmp.path, `${s}.tgz`);
    const recorded = await download(container, s, file);
    const bytes = await readFile(file);
    expect(recorded).toBe(sha(bytes));
    expect(result.sha256).toBe(sha(bytes));
    expect(result.size).toBe(bytes.length);
    expect((await bucket.stat(sessionKey(s))).sha256).toBe(sha(bytes));

    // GNU tar, bsdtar, Python r:gz and r|gz, gzip -t, Node read it alike; every member's header
    // and bytes as before but the edited one.
    const now = await readEveryWay(file, join(env.tmp.path, 'x-after'));
    const was = await members(seekable, 'r:gz');
    const others = (ms: typeof was) => ms.filter((m) => plain(m.name) !== EDITED);
    expect(others(now.members)).toEqual(others(was));
    expect(now.members.map((m) => m.name)).toEqual(was.map((m) => m.name));
    const edited = now.members.find((m) => plain(m.name) === EDITED)!;
    expect({ size: edited.size, sha256: edited.sha256 }).toEqual({ size: text.length, sha256: sha(text) });
    expect(await catText(bucket, s, EDITED)).toBe(text);

    // A spliced archive splices again: another file, elsewhere.
    const second = await az.stats();
    await repack(bucket, s, [{ op: 'put', path: 'm/pkg-2/mod-7.txt', text: 'second\n' }]);
    expect((await az.stats()).uploadedBytes - second.uploadedBytes).toBeLessThanOrEqual(7 + NEW_SEGMENT_AND_INDEX);
    expect(await catText(bucket, s, 'm/pkg-2/mod-7.txt')).toBe('second\n');
    expect(await catText(bucket, s, EDITED)).toBe(text);
    const again = join(env.tmp.path, `${s}-2.tgz`);
    expect(await download(container, s, again)).toBe(sha(await readFile(again)));
  }, 120_000);

  it.each([
    ['the second copy fails (412 SourceConditionNotMet)', 'copy'],
    ['the commit fails (412 ConditionNotMet)', 'commit'],
  ] as const)('a source replaced mid-splice: %s, and the edit is applied again on the new archive', async (_why, on) => {
    const bucket = newBucket(az, container.containerName);
    const s = await fresh(bucket);
    await az.arm({ blob: blob(s), from: blob(await otherWriter()), on, nth: on === 'copy' ? 2 : 1 });
    const before = await az.stats();
    const result = await repack(bucket, s, [{ op: 'put', path: EDITED, text: 'mine\n' }]);
    const after = await az.stats();
    expect(after.copiesRefused - before.copiesRefused).toBe(on === 'copy' ? 1 : 0);
    // The second attempt spliced too.
    expect(after.uploadedBytes - before.uploadedBytes).toBeLessThanOrEqual(2 * (5 + NEW_SEGMENT_AND_INDEX));
    expect(await catText(bucket, s, EDITED)).toBe('mine\n');
    expect(await catText(bucket, s, OTHER)).toBe('the other writer\n');
    const file = join(env.tmp.path, `${s}.tgz`);
    expect(await download(container, s, file)).toBe(result.sha256);
    expect(sha(await readFile(file))).toBe(result.sha256);
  }, 60_000);

  it('a source deleted mid-splice (404 on a copy) is a conflict: the edit lands on a new session, not lost', async () => {
    const bucket = newBucket(az, container.containerName);
    const s = await fresh(bucket);
    await az.arm({ blob: blob(s), on: 'copy', nth: 2 });
    const before = await az.stats();
    const result = await repack(bucket, s, [{ op: 'put', path: EDITED, text: 'mine\n' }]);
    expect((await az.stats()).copiesMissing - before.copiesMissing).toBe(1);
    expect(await catText(bucket, s, EDITED)).toBe('mine\n');
    const file = join(env.tmp.path, `${s}.tgz`);
    expect(await download(container, s, file)).toBe(result.sha256);
    expect((await nodeMembers(file)).filter((m) => m.type === 'file').map((m) => plain(m.name))).toEqual([EDITED]);
  }, 60_000);

  it('splices whenever the new bytes are under the archive (no part floor), and never with splice=0', () => {
    const at = (size: number): ObjectInfo => ({ key: 'k', size, sha256: undefined, etag: '"e"', contentType: undefined, metadata: {}, modified: new Date(0) });
    const ix = { segments: Array.from({ length: 8 }, () => ({ uLen: 100_000 })) } as unknown as SeekIndex;
    const ops = [{ op: 'put' as const, path: EDITED, body: { bytes: Buffer.alloc(1000) } }];
    const three = new Map([[0, 0], [3, 3], [6, 6]]);
    const bucket = newBucket(az, container.containerName);
    expect(bucket.spliceOverhead(3)).toBe(0);
    expect(shouldSplice(bucket, at(301_000), ix, ops, three)).toBe(false);
    expect(shouldSplice(bucket, at(301_001), ix, ops, three)).toBe(true);
    const off = new Bucket(new AzureDriver({ connectionString: az.connectionString, container: container.containerName, splice: false }), { name: 'azure' });
    expect(shouldSplice(off, at(30 * MiB), ix, ops, three)).toBe(false);
  });

  it('a job committed alone and two queued behind the session lock (one batch) are each spliced, every edit kept', async () => {
    const bucket = newBucket(az, container.containerName);
    const s = await fresh(bucket);
    const paths = [0, 17, 29].map((d) => `m/pkg-${d}/mod-${d % 20}.txt`);
    const deps = paths.map((_, i) => jobDeps(bucket, env.conn, env.staging, { jobId: `c${i}`, enqueuedAt: Date.parse('2026-12-06T11:00:00Z') + i }));
    const edit = (i: number) => repackSession(parsePayload(RepackPayload, { session: s, ops: [{ op: 'put', path: paths[i]!, text: `edit ${i}\n` }] }), deps[i]!);
    const s0 = await az.stats();
    expect((await edit(0)).batched).toBeUndefined();
    const s1 = await az.stats();
    expect(s1.uploadedBytes - s0.uploadedBytes).toBeLessThanOrEqual(10 + NEW_SEGMENT_AND_INDEX);
    expect(s1.copiedBlocks - s0.copiedBlocks).toBeGreaterThanOrEqual(2);
    // The other two queue while the test holds the lock; once it is free, one of them commits both.
    const lease = await deps[0]!.locks!.acquire(sessionLockName(s), new AbortController().signal);
    const queue = `bull:repack-test:group:session:${s}:default:queue`;
    const batch = [edit(1), edit(2)];
    while ((await env.conn.zcard(queue)) < 2) await new Promise((r) => setTimeout(r, 25));
    await lease.release();
    const results = await Promise.all(batch);
    const s2 = await az.stats();
    expect(results.map((r) => r.batched)).toEqual([2, 2]);
    // Two dirty groups: three copied runs around them, and only the two new segments and the index sent.
    expect(s2.uploadedBytes - s1.uploadedBytes).toBeLessThanOrEqual(20 + 2 * NEW_SEGMENT_AND_INDEX);
    expect(s2.copiedBlocks - s1.copiedBlocks).toBeGreaterThanOrEqual(3);
    for (const [i, path] of paths.entries()) expect(await catText(bucket, s, path)).toBe(`edit ${i}\n`);
    const file = join(env.tmp.path, `${s}.tgz`);
    expect(await download(container, s, file)).toBe(sha(await readFile(file)));
    expect(results[0]!.sha256).toBe(sha(await readFile(file)));
  }, 120_000);

  it('a store without Put Block From URL (plain azurite, 501; remembered) takes the streaming put', async () => {
    const c = await plainAz.container();
    const bucket = newBucket(plainAz, c.containerName);
    expect(bucket.canSplice).toBe(true);
    const t = `azsplice__repo__plain${++n}`;
    await bucket.put(sessionKey(t), { path: seekable });
    const p0 = await plainAz.stats();
    const result = await repack(bucket, t, [{ op: 'put', path: EDITED, text: 'plain\n' }]);
    const p1 = await plainAz.stats();
    // It tried (501), then streamed the whole archive; the driver remembers.
    expect(p1.copiedBlocks - p0.copiedBlocks).toBe(0);
    expect(p1.uploadedBytes - p0.uploadedBytes).toBeGreaterThan(archiveSize - MiB);
    expect(bucket.canSplice).toBe(false);
    expect(await catText(bucket, t, EDITED)).toBe('plain\n');
    const file = join(env.tmp.path, `${t}.tgz`);
    expect(await download(c, t, file)).toBe(sha(await readFile(file)));
    expect(result.sha256).toBe(sha(await readFile(file)));
  }, 120_000);
});
