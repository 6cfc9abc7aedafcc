import { z } from 'zod';
import { ErrorCode, StorageError } from '../src/errors.js';
import { failureOf, mergeFailures, type Failure } from '../src/fanout/failures.js';
import type { Listed } from '../src/fanout/listing.js';
import { reportChunk, type ChunkResult } from '../src/fanout/parent.js';
import { VerifiedRecord } from '../src/fanout/record.js';
import { codeOf, retrying } from '../src/fanout/retry.js';
import { BackendName, Key, type JobDeps } from '../src/payload.js';
import type { Bucket } from '../src/storage/bucket.js';
import { copyObject } from '../src/storage/copy.js';
import type { ObjectInfo } from '../src/storage/driver.js';
import type { MigrateCounter } from './migrate.js';

/** Internal job name of a migration's chunks (the contract allows internal names on the queue). */
export const MIGRATE_CHUNK = 'migrate-chunk';

const N = z.number().int().nonnegative();
const S = z.string().nullable();
/** One listed object, compact (a chunk of 1000 is kept in Redis while it waits): key, size, mtime, etag, sha256, then the destination's size, etag, sha256. */
const Item = z.tuple([Key, N, N, S, S, N.nullable(), S, S]);
type Item = z.infer<typeof Item>;

export const MigrateChunkPayload = z.strictObject({
  from: BackendName.unwrap(),
  to: BackendName.unwrap(),
  dryRun: z.boolean(),
  deleteSource: z.boolean(),
  recheck: z.boolean(),
  items: z.array(Item).min(1).max(100_000),
});
export type MigrateChunkPayload = z.infer<typeof MigrateChunkPayload>;

export function encodeItem(l: Listed): Item {
  const { src, dst } = l;
  return [src.key, src.size, src.modified.getTime(), src.etag ?? null, src.sha256 ?? null, dst ? dst.size : null, dst?.etag ?? null, dst?.sha256 ?? null];
}

function decodeItem(i: Item): Listed {
  const info = (key: string, size: number, mtime: number, etag: string | null, sha256: string | null): ObjectInfo =>
    ({ key, size, modified: new Date(mtime), etag: etag ?? undefined, sha256: sha256 ?? undefined, contentType: undefined, metadata: {} });
  return { src: info(i[0], i[1], i[2], i[3], i[4]), dst: i[5] === null ? undefined : info(i[0], i[5], 0, i[6], i[7]) };
}

/** How often a running chunk writes its record, so a worker killed mid-chunk loses little of it. */
const RECORD_FLUSH_MS = 2_000;

/**
 * One chunk of a migration: each object is skipped when the destination provably holds its bytes
 * (the record of an earlier verified copy, or equal recorded digests; `recheck` reads both),
 * otherwise copied with copyObject (streamed, SHA-256 checked before the destination object
 * becomes visible, server-side within one backend). A failing object is reported, not thrown;
 * the chunk fails only when cancelled or stopped.
 */
export async function migrateChunk(p: MigrateChunkPayload, d: JobDeps): Promise<ChunkResult<MigrateCounter>> {
  const src = d.bucket(p.from);
  const dst = d.bucket(p.to);
  const items = p.items.map(decodeItem);
  const c: Record<MigrateCounter, number> = { scanned: 0, copied: 0, skipped: 0, failed: 0, bytes: 0, missingDigest: 0, deleted: 0 };
  const last = items[items.length - 1]!.src.key;
  let failures: Failure[] = [];
  const record = await VerifiedRecord.open(d.staging.root, p.from, p.to, items[0]!.src.key, last);
  // Run before by this very job (a worker died mid-chunk): objects it copied are not in the
  // listing's view of the destination, so the destination is looked at before copying.
  const again = record.ranBefore(d.jobId);
  if (!p.dryRun) await record.claim(d.jobId);
  const flusher = p.dryRun ? undefined : setInterval(() => { record.flush().catch(() => {}); }, RECORD_FLUSH_MS);
  const ctx: Ctx = { p, d, src, dst, record, again, c };
  try {
    let next = 0;
    const lane = async () => {
      for (let i = next++; i < items.length; i = next++) {
        if (d.signal.aborted) throw new StorageError(ErrorCode.Transient, `stopped: ${String(d.signal.reason)}`, { op: 'migrate' });
        const it = items[i]!;
        c.scanned += 1;
        try {
          await migrateOne(ctx, it);
        } catch (err) {
          if (d.signal.aborted) throw err;
          c.failed += 1;
          failures = mergeFailures(failures, [failureOf(it.src.key, codeOf(err), err instanceof Error ? err.message : String(err))]);
          d.log.warn({ key: it.src.key, err }, 'object not migrated');
        }
      }
    };
    await Promise.all(Array.from({ length: Math.max(1, Math.min(d.fanout?.limits.lanes ?? 8, items.length)) }, lane));
  } finally {
    if (flusher) clearInterval(flusher);
    if (!p.dryRun) await record.flush().catch((err: unknown) => d.log.warn({ err }, 'migration record not written'));
  }
  await reportChunk(d, c, 'failed');
  return { ...c, failures, last };
}

interface Ctx {
  p: MigrateChunkPayload;
  d: JobDeps;
  src: Bucket;
  dst: Bucket;
  record: VerifiedRecord;
  again: boolean;
  c: Record<MigrateCounter, number>;
}

async function migrateOne(x: Ctx, { src: s, dst: listed }: Listed): Promise<void> {
  const { p, d, src, dst, record, c } = x;
  const io = <T>(work: () => Promise<T>) => retrying(d.signal, work);
  let there = listed;
  if (!there && x.again) there = await io(() => statOrNone(dst, s.key));
  let sha: string | undefined;
  // The destination's bytes were read and matched in this run (recheck): deleteSource needs no second read.
  let dstReadNow = false;
  if (there && p.recheck) {
    // Both sides read and hashed: a source that fails its own digest is this object's failure; a
    // destination that fails its digest (rotted since its copy), differs, or has no recorded
    // digest is copied again.
    const mine = await io(() => hashWhole(src, s.key, d.signal));
    const theirs = await io(() => readWhole(dst, s.key, d.signal)).catch((err: unknown) => {
      if (codeOf(err) === ErrorCode.ChecksumMismatch || codeOf(err) === ErrorCode.NotFound) return undefined;
      throw err;
    });
    if (theirs !== undefined && theirs.sha256 === mine && theirs.recorded === mine) {
      sha = mine;
      dstReadNow = true;
    } else if (theirs === undefined) {
      d.log.warn({ key: s.key }, 'destination object failed its digest; copying it again');
    }
  } else if (there) {
    sha = record.trusted(s, there);
    if (sha === undefined && there.size === s.size) {
      let mine = s.sha256 ?? record.sourceDigest(s);
      if (mine === undefined && !src.driver.listHasDigest) mine = (await io(() => src.stat(s.key))).sha256;
      let theirs = there.sha256;
      if (theirs === undefined && !dst.driver.listHasDigest) theirs = (await io(() => statOrNone(dst, s.key)))?.sha256;
      // A source without a digest (another tool's tree): one read of it is cheaper than a copy.
      if (mine === undefined && theirs !== undefined) mine = await io(() => hashWhole(src, s.key, d.signal));
      if (mine !== undefined && mine === theirs) sha = mine;
    }
  }
  if (sha !== undefined) {
    c.skipped += 1;
    if (!p.dryRun) record.set(s, there!.etag, sha);
    if (p.deleteSource) {
      // Deleted only once verified in this run: the destination is read and checked against its
      // recorded digest, the source's (read now, or its own recorded digest).
      if (!p.dryRun) {
        if (!dstReadNow) {
          const theirs = await io(() => hashWhole(dst, s.key, d.signal));
          if (theirs !== sha) throw new StorageError(ErrorCode.ChecksumMismatch, `destination holds ${theirs}, not ${sha}; source kept`, { op: 'migrate', key: s.key });
        }
        await deleteSource(x, s);
      } else c.deleted += 1;
    }
    return;
  }
  if (p.dryRun) {
    c.copied += 1;
    c.bytes += s.size;
    if (p.deleteSource) c.deleted += 1;
    if (s.sha256 === undefined && (src.driver.listHasDigest || (await io(() => src.stat(s.key))).sha256 === undefined)) c.missingDigest += 1;
    return;
  }
  // A source without a digest going to a store that needs it before the first byte (S3 above its
  // single-PutObject size, GCS): hashing it in a first read (as rclone does for S3) is cheaper than
  // the spool to a temp file a put of unknown digest makes. The copy checks the second read
  // against that digest. Smaller objects to S3 are hashed as the upload buffers them: one read.
  const first = s.sha256 === undefined && dst.digestFirst(s.size) && src.driver.listHasDigest ? await io(() => hashWhole(src, s.key, d.signal)) : undefined;
  const out = await io(() => copyObject(src, s.key, dst, s.key, { signal: d.signal, sha256: first }));
  c.copied += 1;
  c.bytes += out.size;
  if (!out.verified) c.missingDigest += 1;
  d.log.debug({ key: s.key, size: out.size, verified: out.verified }, 'copied');
  // The listing's source version is the one read unless it changed in between (another size).
  if (out.size === s.size) record.set(s, out.etag, out.sha256);
  if (p.deleteSource) await deleteSource(x, s);
}

/** Deletes the source version that was listed (and so read): never one that changed since. */
async function deleteSource(x: Ctx, s: ObjectInfo): Promise<void> {
  if (s.etag === undefined) throw new StorageError(ErrorCode.PreconditionFailed, 'the source listed no etag to delete it by; kept', { op: 'migrate', key: s.key });
  try {
    await retrying(x.d.signal, () => x.src.delete(s.key, { ifMatch: s.etag }));
  } catch (err) {
    if (codeOf(err) !== ErrorCode.PreconditionFailed) throw err;
    throw new StorageError(ErrorCode.PreconditionFailed, 'the source changed since it was read; copied, not deleted', { op: 'migrate', key: s.key, cause: err });
  }
  x.c.deleted += 1;
}

async function statOrNone(b: Bucket, key: string): Promise<ObjectInfo | undefined> {
  try {
    return await b.stat(key);
  } catch (err) {
    if (codeOf(err) === ErrorCode.NotFound) return undefined;
    throw err;
  }
}

/** Reads the whole object (checked against its recorded digest, if any) and returns its SHA-256. */
export async function hashWhole(b: Bucket, key: string, signal?: AbortSignal): Promise<string> {
  return (await readWhole(b, key, signal)).sha256;
}

/** Reads the whole object, checked against its recorded digest: the digest of its bytes, and the recorded one (undefined without). */
async function readWhole(b: Bucket, key: string, signal?: AbortSignal): Promise<{ sha256: string; recorded: string | undefined }> {
  const got = await b.get(key, { signal });
  for await (const _ of got.stream) { /* hashed and checked as it flows */ }
  return { sha256: got.digest().sha256, recorded: got.info.sha256 };
}
