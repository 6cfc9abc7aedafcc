import { z } from 'zod';
import { ErrorCode, StorageError } from '../src/errors.js';
import { hashFile, type Bucket, type PutOptions, type PutSource } from '../src/storage/bucket.js';
import type { ObjectInfo } from '../src/storage/driver.js';
import { createHash } from 'node:crypto';
import { BackendName, Key, Metadata, Sha256, StagingPath, type JobDeps } from '../src/payload.js';
import { STORED_AT_META, storedAt } from '../src/versions.js';

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;
/** Conditional puts tried when other writers keep replacing the key between our stat and our put. */
const MAX_PUT_TRIES = 5;

export const StorePayload = z.strictObject({
  backend: BackendName,
  key: Key,
  source: z.union([
    z.strictObject({ path: StagingPath }),
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
    source = { path: staged.path };
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
 * A plain put that keeps the replaced object's first-store time. New key: a plain put (two new
 * writers racing on one key both carry a first-store time from within the race). Existing key:
 * a put conditional on the version whose time we read, retried when another writer replaced it
 * meanwhile, so a re-store never records a later time than the one it replaces.
 */
async function replaceKeepingStoredAt(bucket: Bucket, key: string, source: PutSource, enqueued: string, withStoredAt: (at: string) => PutOptions): Promise<ObjectInfo> {
  for (let tries = 1; ; tries++) {
    const existing = await bucket.stat(key).catch((err: unknown) => {
      if (err instanceof StorageError && err.code === ErrorCode.NotFound) return undefined;
      throw err;
    });
    if (!existing) return bucket.put(key, source, withStoredAt(enqueued));
    // An object stored before stored_at existed (or by another tool): its modified time is the
    // best known first-store time, as `versions` would have used it.
    const before = storedAt(existing.metadata) ?? existing.modified.toISOString();
    const at = before < enqueued ? before : enqueued;
    try {
      return await bucket.put(key, source, existing.etag === undefined ? withStoredAt(at) : { ...withStoredAt(at), ifMatch: existing.etag });
    } catch (err) {
      if (!(err instanceof StorageError && err.code === ErrorCode.PreconditionFailed)) throw err;
      // A plain store never fails for a precondition of its own making: the job retries later.
      if (tries >= MAX_PUT_TRIES) throw new StorageError(ErrorCode.Transient, `replaced by other writers ${tries} times while storing`, { op: 'store', key, cause: err });
    }
  }
}
