import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { GetObjectCommand, HeadObjectCommand } from '@aws-sdk/client-s3';
import type { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RepackPayload, repackSession } from '../../jobs/repack-session.js';
import { S3Driver } from '../../src/backends/s3.js';
import { parsePayload } from '../../src/payload.js';
import { redisConnection } from '../../src/queue/connection.js';
import { Bucket } from '../../src/storage/bucket.js';
import { SHA256_META, type ObjectInfo } from '../../src/storage/driver.js';
import { sessionKey, sessionLockName } from '../../src/session/ids.js';
import type { SeekIndex } from '../../src/session/seek-format.js';
import { openSeekable, segmentAt } from '../../src/session/seek-read.js';
import { ErrorCode } from '../../src/errors.js';
import { shouldSplice } from '../../src/session/seek-splice.js';
import { members, run } from '../archive/corpus.js';
import { tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { startS3rver, type S3rver } from '../harness/s3.js';
import { catText, jobDeps, nodeMembers, plain, readEveryWay } from './helpers.js';

const MiB = 1024 * 1024;
const sha = (b: string | Buffer): string => createHash('sha256').update(b).digest('hex');
const EDITED = 'm/pkg-10/mod-3.txt';
const OTHER = 'm/pkg-20/mod-1.txt';
/** A rewritten segment (cut near 256 KiB of tar) compressed, and the index of 600 entries: well under this. */
const NEW_SEGMENT_AND_INDEX = 512 * 1024;

// Edits of a ~30 MB seekable session on s3rver, whose shim (test/harness/s3.ts) has
// UploadPartCopy with source ranges and counts the bytes each request uploads.
describe('server-side splicing of session edits (S3)', () => {
  let redis: TestRedis;
  let conn: Redis;
  let s3: S3rver;
  let plainS3: S3rver;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let staging: string;
  let bucketName: string;
  /** The converted session's archive: its bytes on disk, and the session every test copies. */
  let seekable: string;
  let archiveSize: number;
  const base = 'splice__repo__base';
  let n = 0;

  const newBucket = (server: S3rver, name: string, extra: Partial<ConstructorParameters<typeof S3Driver>[0]> = {}): Bucket =>
    new Bucket(new S3Driver({ ...server.driverOptions(name), ...extra }), { name: 's3' });
  const repack = (bucket: Bucket, session: string, ops: unknown[]) =>
    repackSession(parsePayload(RepackPayload, { session, ops }), jobDeps(bucket, conn, staging, { jobId: `s${++n}`, enqueuedAt: Date.parse('2026-12-03T10:00:00Z') + n }));
  /** The stored object's bytes, written to `file`; its recorded digest. */
  const download = async (server: S3rver, bucket: string, session: string, file: string): Promise<string | undefined> => {
    const res = await server.client.send(new GetObjectCommand({ Bucket: bucket, Key: sessionKey(session) }));
    await writeFile(file, Buffer.from(await res.Body!.transformToByteArray()));
    return res.Metadata?.[SHA256_META];
  };
  /** A copy of the converted session under a new id. */
  const fresh = async (bucket: Bucket): Promise<string> => {
    const s = `splice__repo__s${++n}`;
    await bucket.put(sessionKey(s), { path: seekable });
    return s;
  };

  /** Another writer's version of the session: the converted one with another file edited (made once). */
  let other: string | undefined;
  const otherWriter = async (): Promise<string> => {
    if (other) return other;
    const bucket = newBucket(s3, bucketName);
    const o = await fresh(bucket);
    await repack(bucket, o, [{ op: 'put', path: OTHER, text: 'the other writer\n' }]);
    other = o;
    return o;
  };
  /** The session holds this job's edit and the other writer's, and the digests check out. */
  const expectBothEdits = async (bucket: Bucket, s: string, result: { sha256: string }): Promise<void> => {
    expect(await catText(bucket, s, EDITED)).toBe('mine\n');
    expect(await catText(bucket, s, OTHER)).toBe('the other writer\n');
    const file = join(tmp.path, `${s}.tgz`);
    expect(await download(s3, bucketName, s, file)).toBe(result.sha256);
    expect(sha(await readFile(file))).toBe(result.sha256);
  };

  beforeAll(async () => {
    [redis, s3, plainS3, tmp] = await Promise.all([startRedis(), startS3rver(), startS3rver({ uploadPartCopy: false }), tempDir('stevedore-splice-')]);
    conn = redisConnection(redis.url, 'worker');
    staging = join(tmp.path, 'staging');
    await mkdir(staging, { recursive: true });
    bucketName = await s3.bucket();
    // 600 text files between incompressible binaries: an edit in the middle has megabytes of
    // untouched segments on both sides.
    const src = join(tmp.path, 'src');
    await mkdir(join(src, 'a'), { recursive: true });
    await mkdir(join(src, 'z'), { recursive: true });
    await writeFile(join(src, 'a/blob-0.bin'), randomBytes(9 * MiB));
    await writeFile(join(src, 'a/blob-1.bin'), randomBytes(5 * MiB));
    for (let d = 0; d < 30; d++) {
      await mkdir(join(src, `m/pkg-${d}`), { recursive: true });
      for (let f = 0; f < 20; f++) await writeFile(join(src, `m/pkg-${d}/mod-${f}.txt`), `${d}/${f}\n${randomBytes(1500).toString('base64')}\n`);
    }
    await writeFile(join(src, 'z/blob-2.bin'), randomBytes(9 * MiB));
    await writeFile(join(src, 'z/blob-3.bin'), randomBytes(6 * MiB));
    const gnu = join(tmp.path, 'gnu.tgz');
    // gzip -1: the conversion recompresses it anyway, and the random blobs take gzip -6 long.
    await run('tar', ['--sort=name', '-I', 'gzip -1', '-cf', gnu, '-C', src, '.']);
    // The first repack converts it (streamed: it has no index yet).
    const bucket = newBucket(s3, bucketName);
    await bucket.put(sessionKey(base), { path: gnu });
    await repack(bucket, base, [{ op: 'put', path: 'NOTES.md', text: 'converted\n' }]);
    seekable = join(tmp.path, 'seekable.tgz');
    await download(s3, bucketName, base, seekable);
    archiveSize = (await readFile(seekable)).length;
  }, 120_000);
  afterAll(async () => {
    await conn?.quit();
    await Promise.all([redis?.stop(), s3?.stop(), plainS3?.stop()]);
    await tmp?.remove();
  });

  it('a one-file edit uploads under 2 x 5 MiB plus the new segment and index, and every reader reads the archive as before plus the edit', async () => {
    expect(archiveSize).toBeGreaterThan(28 * MiB);
    const bucket = newBucket(s3, bucketName);
    const s = await fresh(bucket);
    const text = `edited\n${randomBytes(20_000).toString('hex')}\n`;
    const before = await s3.stats();
    const result = await repack(bucket, s, [{ op: 'put', path: EDITED, text }]);
    const after = await s3.stats();
    const uploaded = after.uploadedBytes - before.uploadedBytes;
    // The README's bound: the new segment and the index, plus at most 2 x 5 MiB of old bytes beside them.
    expect(uploaded).toBeLessThanOrEqual(2 * 5 * MiB + text.length + NEW_SEGMENT_AND_INDEX);
    // The untouched bytes were copied inside the store: at least one part on each side of the edit.
    expect(after.copiedParts - before.copiedParts).toBeGreaterThanOrEqual(2);

    const file = join(tmp.path, `${s}.tgz`);
    const recorded = await download(s3, bucketName, s, file);
    const bytes = await readFile(file);
    expect(recorded).toBe(sha(bytes));
    expect(result.sha256).toBe(sha(bytes));
    expect(result.size).toBe(bytes.length);
    expect((await bucket.stat(sessionKey(s))).sha256).toBe(sha(bytes));

    // GNU tar, bsdtar, Python r:gz and r|gz, gzip -t, Node read it alike (the one readEveryWay of
    // this file); every member's header and bytes as before but the edited one.
    const now = await readEveryWay(file, join(tmp.path, 'x-after'));
    const was = await members(seekable, 'r:gz');
    const others = (ms: typeof was) => ms.filter((m) => plain(m.name) !== EDITED);
    expect(others(now.members)).toEqual(others(was));
    expect(now.members.map((m) => m.name)).toEqual(was.map((m) => m.name));
    const edited = now.members.find((m) => plain(m.name) === EDITED)!;
    expect({ size: edited.size, sha256: edited.sha256 }).toEqual({ size: text.length, sha256: sha(text) });
    expect(await catText(bucket, s, EDITED)).toBe(text);
    expect(await catText(bucket, s, 'm/pkg-29/mod-19.txt')).toBe(await readFile(join(tmp.path, 'x-after/gnu/m/pkg-29/mod-19.txt'), 'utf8'));

    // A spliced archive splices again: another file, elsewhere.
    const second = await s3.stats();
    await repack(bucket, s, [{ op: 'put', path: 'm/pkg-2/mod-7.txt', text: 'second\n' }]);
    expect((await s3.stats()).uploadedBytes - second.uploadedBytes).toBeLessThanOrEqual(2 * 5 * MiB + 7 + NEW_SEGMENT_AND_INDEX);
    expect(await catText(bucket, s, 'm/pkg-2/mod-7.txt')).toBe('second\n');
    expect(await catText(bucket, s, EDITED)).toBe(text);
    const again = join(tmp.path, `${s}-2.tgz`);
    expect(await download(s3, bucketName, s, again)).toBe(sha(await readFile(again)));
  }, 120_000);

  it('a source replaced after the padding reads fails the next copy (412), and the edit is applied again on the new archive', async () => {
    const bucket = newBucket(s3, bucketName);
    const s = await fresh(bucket);
    // Part 1 copies the head, part 2 sends the new segment padded by a ranged GET, part 3 copies
    // the rest: the other writer replaces the archive as that second copy arrives, after every GET.
    await s3.arm({ bucket: bucketName, key: sessionKey(s), from: sessionKey(await otherWriter()), on: 'copy', nth: 2 });
    const before = await s3.stats();
    const result = await repack(bucket, s, [{ op: 'put', path: EDITED, text: 'mine\n' }]);
    expect((await s3.stats()).copiesRefused - before.copiesRefused).toBe(1);
    await expectBothEdits(bucket, s, result);
  }, 60_000);

  it('a source replaced after the last copy is seen by the stat before the complete (a store without If-Match)', async () => {
    const bucket = newBucket(s3, bucketName);
    const s = await fresh(bucket);
    // s3rver conditions no complete: the other writer's version lands just before the stat that stands in for it.
    await s3.arm({ bucket: bucketName, key: sessionKey(s), from: sessionKey(await otherWriter()), on: 'head', nth: 2 });
    const result = await repack(bucket, s, [{ op: 'put', path: EDITED, text: 'mine\n' }]);
    await expectBothEdits(bucket, s, result);
  }, 60_000);

  it('a source deleted mid-splice (404 on a copy) is a conflict: the edit lands on a new session, not lost', async () => {
    const bucket = newBucket(s3, bucketName);
    const s = await fresh(bucket);
    await s3.arm({ bucket: bucketName, key: sessionKey(s), on: 'copy', nth: 2 });
    const before = await s3.stats();
    const result = await repack(bucket, s, [{ op: 'put', path: EDITED, text: 'mine\n' }]);
    expect((await s3.stats()).copiesMissing - before.copiesMissing).toBe(1);
    expect(await catText(bucket, s, EDITED)).toBe('mine\n');
    const file = join(tmp.path, `${s}.tgz`);
    expect(await download(s3, bucketName, s, file)).toBe(result.sha256);
    expect(sha(await readFile(file))).toBe(result.sha256);
    expect((await nodeMembers(file)).filter((m) => m.type === 'file').map((m) => plain(m.name))).toEqual([EDITED]);
  }, 60_000);

  it('old bytes read to pad a part are checked against the segment digests the first read checked (rot between the reads)', async () => {
    const bucket = newBucket(s3, bucketName);
    const s = await fresh(bucket);
    const ix = (await openSeekable(bucket, sessionKey(s), undefined))!.index;
    const entry = ix.entries.find((e) => plain(e.path) === EDITED)!;
    // The segment after the edited one is the first the padding reads.
    const rot = ix.segments[segmentAt(ix, entry.start) + 1]!.cOff + 100;
    await s3.arm({ bucket: bucketName, key: sessionKey(s), rot, on: 'create' });
    const was = await bucket.stat(sessionKey(s));
    await expect(repack(bucket, s, [{ op: 'put', path: EDITED, text: 'mine\n' }])).rejects.toMatchObject({ code: ErrorCode.ChecksumMismatch });
    const now = await bucket.stat(sessionKey(s));
    expect({ etag: now.etag, sha256: now.sha256 }).toEqual({ etag: was.etag, sha256: was.sha256 });
  }, 60_000);

  it('splices only when the most it can upload, (2 x groups + 1) x 5 MiB plus the new bytes, is under the archive, and never with splice=0', () => {
    const bucket = newBucket(s3, bucketName);
    const ix = { segments: Array.from({ length: 8 }, () => ({ uLen: 100_000 })) } as unknown as SeekIndex;
    const ops = [{ op: 'put' as const, path: EDITED, body: { bytes: Buffer.alloc(1000) } }];
    const at = (size: number): ObjectInfo => ({ key: 'k', size, sha256: undefined, etag: '"e"', contentType: undefined, metadata: {}, modified: new Date(0) });
    const one = new Map([[2, 2]]);
    const three = new Map([[0, 0], [3, 3], [6, 6]]);
    expect(shouldSplice(bucket, at(30 * MiB), ix, ops, one)).toBe(true);
    expect(shouldSplice(bucket, at(15 * MiB + 101_000), ix, ops, one)).toBe(false);
    expect(shouldSplice(bucket, at(15 * MiB + 101_001), ix, ops, one)).toBe(true);
    expect(shouldSplice(bucket, at(30 * MiB), ix, ops, three)).toBe(false);
    expect(shouldSplice(bucket, at(36 * MiB), ix, ops, three)).toBe(true);
    // splice=0: never.
    const off = newBucket(s3, bucketName, { splice: false });
    expect(off.canSplice).toBe(false);
    expect(shouldSplice(off, at(30 * MiB), ix, ops, one)).toBe(false);
  });

  it('a splice whose pieces do not make its size, or that names no range, fails InvalidInput before any request', async () => {
    const bucket = newBucket(s3, bucketName);
    const key = sessionKey(base);
    const was = await bucket.stat(key);
    const opts = { ifMatch: was.etag!, sha256: sha('eleven byte'), size: 11, checked: [{ offset: 0, length: 11, sha256: sha('eleven byte') }] };
    const before = await s3.stats();
    await expect(bucket.splice(key, [{ copy: { offset: 0, length: 10 } }], opts)).rejects.toMatchObject({ code: ErrorCode.InvalidInput });
    await expect(bucket.splice(key, [{ copy: { offset: -1, length: 11 } }], opts)).rejects.toMatchObject({ code: ErrorCode.InvalidInput });
    await expect(bucket.splice(key, [{ bytes: Buffer.from('eleven byte') }], { ...opts, checked: [{ offset: 0, length: 0, sha256: sha('') }] })).rejects.toMatchObject({ code: ErrorCode.InvalidInput });
    expect(await s3.stats()).toEqual(before);
    expect((await bucket.stat(key)).etag).toBe(was.etag);
  });

  it('a job committed alone and two queued behind the session lock (one batch) are each spliced, every edit kept; a redelivered job splices nothing', async () => {
    const bucket = newBucket(s3, bucketName);
    const s = await fresh(bucket);
    const paths = [0, 17, 29].map((d) => `m/pkg-${d}/mod-${d % 20}.txt`);
    const deps = paths.map((_, i) => jobDeps(bucket, conn, staging, { jobId: `c${i}`, enqueuedAt: Date.parse('2026-12-03T11:00:00Z') + i }));
    const edit = (i: number) => repackSession(parsePayload(RepackPayload, { session: s, ops: [{ op: 'put', path: paths[i]!, text: `edit ${i}\n` }] }), deps[i]!);
    // The first job, nothing queued with it: its one-file edit spliced, copied parts on both sides.
    const s0 = await s3.stats();
    expect((await edit(0)).batched).toBeUndefined();
    const s1 = await s3.stats();
    expect(s1.uploadedBytes - s0.uploadedBytes).toBeLessThanOrEqual(2 * 5 * MiB + 10 + NEW_SEGMENT_AND_INDEX);
    expect(s1.copiedParts - s0.copiedParts).toBeGreaterThanOrEqual(2);
    // The other two queue while the test holds the lock; once it is free, one of them commits both.
    const lease = await deps[0]!.locks!.acquire(sessionLockName(s), new AbortController().signal);
    const queue = `bull:repack-test:group:session:${s}:default:queue`;
    const batch = [edit(1), edit(2)];
    while ((await conn.zcard(queue)) < 2) await new Promise((r) => setTimeout(r, 25));
    await lease.release();
    const results = await Promise.all(batch);
    const s2 = await s3.stats();
    expect(results.map((r) => r.batched)).toEqual([2, 2]);
    expect(results[1]!.sha256).toBe(results[0]!.sha256);
    // Spliced too: both dirty groups lie in the 1.5 MiB of text files, so the old bytes between
    // them and the padding after the second are at most 2 x 5 MiB.
    expect(s2.uploadedBytes - s1.uploadedBytes).toBeLessThanOrEqual(2 * 5 * MiB + 20 + 2 * NEW_SEGMENT_AND_INDEX);
    expect(s2.copiedParts - s1.copiedParts).toBeGreaterThanOrEqual(2);
    for (const [i, path] of paths.entries()) expect(await catText(bucket, s, path)).toBe(`edit ${i}\n`);
    const again = await edit(2);
    expect((await s3.stats()).uploadedBytes).toBe(s2.uploadedBytes);
    const file = join(tmp.path, `${s}.tgz`);
    expect(await download(s3, bucketName, s, file)).toBe(sha(await readFile(file)));
    expect(again.sha256).toBe(sha(await readFile(file)));
  }, 120_000);

  it('a store without UploadPartCopy (remembered) takes the streaming put', async () => {
    const name = await plainS3.bucket();
    const bucket = newBucket(plainS3, name);
    expect(bucket.canSplice).toBe(true);
    const t = `splice__repo__plain${++n}`;
    await bucket.put(sessionKey(t), { path: seekable });
    const p0 = await plainS3.stats();
    await repack(bucket, t, [{ op: 'put', path: EDITED, text: 'plain\n' }]);
    const p1 = await plainS3.stats();
    // It tried (NotImplemented), then streamed the whole archive; the driver remembers.
    expect(p1.copiedParts - p0.copiedParts).toBeGreaterThanOrEqual(1);
    expect(p1.uploadedBytes - p0.uploadedBytes).toBeGreaterThan(archiveSize - MiB);
    // Remembered: shouldSplice asks canSplice, so the next edit streams at once.
    expect(bucket.canSplice).toBe(false);
    expect(await catText(bucket, t, EDITED)).toBe('plain\n');
    const head = await plainS3.client.send(new HeadObjectCommand({ Bucket: name, Key: sessionKey(t) }));
    const file = join(tmp.path, `${t}.tgz`);
    await download(plainS3, name, t, file);
    expect(head.Metadata?.[SHA256_META]).toBe(sha(await readFile(file)));
  }, 120_000);
});
