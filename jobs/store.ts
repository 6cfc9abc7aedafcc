import { z } from 'zod';
import { ErrorCode, StorageError } from '../src/errors.js';
import { hashFile, type Bucket, type PutOptions, type PutSource } from '../src/storage/bucket.js';
import type { ObjectInfo } from '../src/storage/driver.js';
import { createHash } from 'node:crypto';
import { BackendName, Key, Metadata, Sha256, StagingPath, type JobDeps } from '../src/payload.js';
import { STORED_AT_META, storedAt } from '../src/versions.js';

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;
/** Puts tried before a re-store stops guarding an earlier first-store time and puts unconditionally. */
const MAX_PUT_TRIES = 5;

export const StorePayload = z.strictObject({
  backend: BackendName,
  key: Key,
  source: z.union([
    // consume: the producer gives the staged file up (never modifies it afterwards, removes only
    // its name once the job is over); the filesystem backend may link it into place.
    z.strictObject({ path: StagingPath, consume: z.boolean().optional() }),
    z.strictObject({ base64: z.string().regex(BASE64, 'must be base64').refine((s) => s.length % 4 === 0, 'must be padded base64') }),
  ]),
  sha256: Sha256.optional(),
  contentType: z.string().optional(),
  /** User metadata; `stored_at` is the worker's (when the key was first stored) and is replaced. */
  metadata: Metadata.optional(),
  ifAbsent: z.boolean().optional(),
});
export type StorePayload = z.infer<typeof StorePayload>;

export interface StoreResult {
  backend: string;
  key: string;
  size: number;
  sha256: string;
}

/**
 * Streams a staged file (or small inline bytes) into a backend. Safe to run twice: a plain put
 * rewrites the same bytes, and an `ifAbsent` put that finds its own bytes already there succeeds.
 * Every object records when its key was first stored (`stored_at`, the job's enqueue time, or the
 * earlier value of the object it replaces), which orders `versions`.
 */
export async function store(p: StorePayload, d: JobDeps): Promise<StoreResult> {
  const bucket = d.bucket(p.backend);
  let source: PutSource;
  let total: number;
  if ('base64' in p.source) {
    const bytes = Buffer.from(p.source.base64, 'base64');
    if (bytes.length > d.limits.maxInlineBytes) {
      throw new StorageError(ErrorCode.InvalidInput, `source.base64: ${bytes.length} bytes is over the inline limit of ${d.limits.maxInlineBytes}; stage a file instead`, { op: 'store', key: p.key });
    }
    source = bytes;
    total = bytes.length;
  } else {
    // The size of the very file checked to be regular and inside the area, as the Bucket will
    // announce it (a file that changes size meanwhile fails the put's size check).
    const staged = await d.staging.sourceFile(p.source.path, 'source.path', { signal: d.signal });
    source = { path: staged.path, ...(p.source.consume ? { consume: true } : {}) };
    total = staged.size;
  }
  const enqueued = new Date(d.enqueuedAt).toISOString();
  const opts: PutOptions = { sha256: p.sha256, contentType: p.contentType, ifAbsent: p.ifAbsent, signal: d.signal, progress: (n: number) => d.progress(n, total) };
  const withStoredAt = (at: string) => ({ ...opts, metadata: { ...p.metadata, [STORED_AT_META]: at } });
  try {
    const info = p.ifAbsent ? await bucket.put(p.key, source, withStoredAt(enqueued)) : await replaceKeepingStoredAt(bucket, p.key, source, enqueued, withStoredAt);
    d.log.info({ key: p.key, size: info.size }, 'stored');
    return { backend: p.backend, key: p.key, size: info.size, sha256: info.sha256! };
  } catch (err) {
    if (!(p.ifAbsent && err instanceof StorageError && err.code === ErrorCode.PreconditionFailed)) throw err;
    // A redelivered job whose first run already stored these very bytes has nothing left to do.
    // Gone again (the other writer's upload never completed, or it was deleted): the original error stands.
    const existing = await bucket.stat(p.key).catch(() => { throw err; });
    const ours = p.sha256 ?? (source instanceof Uint8Array ? createHash('sha256').update(source).digest('hex') : (await hashFile((source as { path: string }).path)).sha256);
    if (existing.sha256 !== ours) throw err;
    return { backend: p.backend, key: p.key, size: existing.size, sha256: ours };
  }
}

/**
 * A plain put that keeps the key's first-store time, without ever failing because another writer
 * won: a plain overwrite race has no loser (RELIABILITY #17, #18). `stored_at` only ever moves
 * earlier, so when the object there records a time no later than ours, a plain put carrying that
 * time is correct and is the only put (the common re-store: one stream of the file). Only a writer
 * whose time is earlier than the object's replaces it conditionally (ifMatch), so as not to undo a
 * still earlier time written meanwhile, retried a few times and then done unconditionally with the
 * earliest time seen. After our bytes are in, one stat checks that no writer that read an older
 * state left a later time behind; if one did, we put again, conditionally, carrying the earlier
 * time. Residual: a writer that read the object before our earlier time landed and writes after that
 * check puts back the time it read, which is never later than the object's time before the race.
 */
async function replaceKeepingStoredAt(bucket: Bucket, key: string, source: PutSource, enqueued: string, withStoredAt: (at: string) => PutOptions): Promise<ObjectInfo> {
  let earliest = enqueued;
  // After our first put the digest is known: later puts pass it, so a store that needs the digest
  // before the upload (S3, GCS) does not read the whole file an extra time to hash it again.
  let known: string | undefined;
  const put = async (opts: PutOptions): Promise<ObjectInfo> => {
    const ownDigest = opts.sha256 === undefined && known !== undefined;
    try {
      const info = await bucket.put(key, source, ownDigest ? { ...opts, sha256: known } : opts);
      known ??= info.sha256;
      return info;
    } catch (err) {
      // Our digest, not the producer's: bytes that no longer match it mean the file changed.
      if (ownDigest && err instanceof StorageError && err.code === ErrorCode.ChecksumMismatch) {
        throw new StorageError(ErrorCode.Transient, 'the source file changed while it was being stored', { op: 'store', key, cause: err });
      }
      throw err;
    }
  };
  // Our own put's result, once our bytes were stored (possibly replaced by a later writer since).
  let ours: ObjectInfo | undefined;
  for (let tries = 1; ; tries++) {
    const current = await bucket.stat(key).catch((err: unknown) => {
      if (err instanceof StorageError && err.code === ErrorCode.NotFound) return undefined;
      throw err;
    });
    // An object stored before stored_at existed (or by another tool): its modified time is the
    // best known first-store time, as `versions` would have used it.
    const at = current && (storedAt(current.metadata) ?? current.modified.toISOString());
    const later = at !== undefined && at > earliest;
    if (at !== undefined && !later) earliest = at;
    if (!later) {
      // Gone, or no later than ours: our bytes (if stored) stand as one whole version, any later
      // writer's are a legitimate overwrite, and the time there is right.
      if (ours) return ours;
      if (current === undefined && bucket.atomicIfAbsent && tries === 1) {
        // A new key (the common case): created atomically, ours is the first store and its time
        // stands without a second look; a racer that created it first sends us round again.
        try {
          return await put({ ...withStoredAt(earliest), ifAbsent: true });
        } catch (err) {
          if (!(err instanceof StorageError && err.code === ErrorCode.PreconditionFailed)) throw err;
          continue;
        }
      }
      ours = await put(withStoredAt(earliest));
      continue; // check the time left behind
    }
    if (tries >= MAX_PUT_TRIES || current!.etag === undefined) return put(withStoredAt(earliest));
    try {
      ours = await put({ ...withStoredAt(earliest), ifMatch: current!.etag });
    } catch (err) {
      // Another writer replaced it between our stat and our put: look again.
      if (!(err instanceof StorageError && err.code === ErrorCode.PreconditionFailed)) throw err;
    }
  }
}
