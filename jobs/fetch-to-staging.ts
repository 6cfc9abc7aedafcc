import { createWriteStream } from 'node:fs';
import { pipeline } from 'node:stream/promises';
import { z } from 'zod';
import { extractArchive } from '../src/archive/extract.js';
import { HashingStream } from '../src/storage/hashing.js';
import { BackendName, Key, Sha256, StagingPath, type JobDeps } from '../src/queue/payload.js';

export const FetchPayload = z.strictObject({
  backend: BackendName,
  key: Key,
  dest: StagingPath,
  sha256: Sha256.optional(),
  extract: z.boolean().optional(),
});
export type FetchPayload = z.infer<typeof FetchPayload>;

export interface FetchResult {
  path: string;
  size: number;
  sha256: string;
  entries?: number;
}

/**
 * Copies an object into the staging area. The bytes are verified twice as they flow (against the
 * digest recorded at write time by the Bucket, and against `sha256` here) and land in a temp file
 * or directory that is renamed to `dest` only after both checks passed at the stream's end.
 */
export async function fetchToStaging(p: FetchPayload, d: JobDeps): Promise<FetchResult> {
  const dest = await d.staging.resolve(p.dest, 'dest');
  await d.staging.ensureParent(dest);
  let total: number | undefined;
  const { stream, info } = await d.bucket(p.backend).get(p.key, { signal: d.signal, progress: (n) => d.progress(n, total) });
  total = info.size;
  if (info.sha256 === undefined && p.sha256 === undefined) {
    d.log.warn({ key: p.key }, 'object has no recorded sha256 (written by another tool); fetched unverified');
  }
  const check = new HashingStream({ sha256: p.sha256, op: 'fetch-to-staging', key: p.key });
  if (p.extract) {
    stream.on('error', (err) => check.destroy(err));
    check.on('error', () => {}); // met by extractArchive through the stream; see Bucket.put
    stream.pipe(check);
    const res = await extractArchive(check, dest, { replace: true, signal: d.signal });
    const { sha256, size } = check.digest();
    d.log.info({ key: p.key, dest: p.dest, entries: res.entries }, 'fetched and extracted');
    return { path: p.dest, size, sha256, entries: res.entries };
  }
  const tmp = await d.staging.tempBeside(dest);
  try {
    // flush: fsync before close, so a rename after a crash never exposes an empty or partial file.
    await pipeline(stream, check, createWriteStream(tmp, { flags: 'wx', flush: true }), { signal: d.signal });
    await d.staging.commitFile(tmp, dest);
  } catch (err) {
    await d.staging.discard(tmp);
    throw err;
  }
  const { sha256, size } = check.digest();
  d.log.info({ key: p.key, dest: p.dest, size }, 'fetched');
  return { path: p.dest, size, sha256 };
}
