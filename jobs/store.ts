import { z } from 'zod';
import { ErrorCode, StorageError } from '../src/errors.js';
import { hashFile, type PutSource } from '../src/storage/bucket.js';
import { createHash } from 'node:crypto';
import { BackendName, Key, Metadata, Sha256, StagingPath, type JobDeps } from '../src/payload.js';

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

export const StorePayload = z.strictObject({
  backend: BackendName,
  key: Key,
  source: z.union([
    z.strictObject({ path: StagingPath }),
    z.strictObject({ base64: z.string().regex(BASE64, 'must be base64').refine((s) => s.length % 4 === 0, 'must be padded base64') }),
  ]),
  sha256: Sha256.optional(),
  contentType: z.string().optional(),
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
 */
export async function store(p: StorePayload, d: JobDeps): Promise<StoreResult> {
  const bucket = d.bucket(p.backend);
  let source: PutSource;
  let total: number | undefined;
  if ('base64' in p.source) {
    const bytes = Buffer.from(p.source.base64, 'base64');
    if (bytes.length > d.limits.maxInlineBytes) {
      throw new StorageError(ErrorCode.InvalidInput, `source.base64: ${bytes.length} bytes is over the inline limit of ${d.limits.maxInlineBytes}; stage a file instead`, { op: 'store', key: p.key });
    }
    source = bytes;
    total = bytes.length;
  } else {
    source = { path: await d.staging.source(p.source.path) };
  }
  const opts = { sha256: p.sha256, contentType: p.contentType, metadata: p.metadata, ifAbsent: p.ifAbsent, signal: d.signal, progress: (n: number) => d.progress(n, total) };
  try {
    const info = await bucket.put(p.key, source, opts);
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
