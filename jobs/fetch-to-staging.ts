import { createWriteStream } from 'node:fs';
import { pipeline } from 'node:stream/promises';
import { z } from 'zod';
import { extractArchive } from '../src/archive/extract.js';
import { BackendName, Key, Sha256, StagingPath, type JobDeps } from '../src/payload.js';

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
  /**
   * True when the bytes were checked against the digest recorded when the object was written;
   * false for an object without one (written by another tool, or its metadata lost), even when
   * they matched the payload's `sha256`: only the recorded digest vouches for the stored object.
   */
  verified: boolean;
  entries?: number;
}

/**
 * Copies an object into the staging area. The bytes are verified as they flow (against the digest
 * recorded at write time and against `sha256`) and land in a temp file or directory that is renamed
 * to `dest` only after the check passed at the stream's end.
 */
export async function fetchToStaging(p: FetchPayload, d: JobDeps): Promise<FetchResult> {
  const dest = await d.staging.resolve(p.dest, 'dest');
  await d.staging.ensureParent(dest);
  // Named before the object is opened, so a staging error cannot leave its stream open.
  const tmp = p.extract ? undefined : await d.staging.tempBeside(dest);
  let total: number | undefined;
  // One pass checks both the digest recorded at write time and `sha256`, and gives the result's digest.
  const got = await d.bucket(p.backend).get(p.key, { signal: d.signal, sha256: p.sha256, progress: (n) => d.progress(n, total) });
  total = got.info.size;
  const verified = got.info.sha256 !== undefined;
  if (!verified) {
    d.log.warn({ key: p.key, checkedAgainstPayload: p.sha256 !== undefined }, 'object has no recorded sha256 (written by another tool, or its metadata lost); fetched with verified: false');
  }
  if (tmp === undefined) {
    // extract: the archive is unpacked into a fresh temp directory of its own.
    const res = await extractArchive(got.stream, dest, { replace: true, signal: d.signal });
    const { sha256, size } = got.digest();
    d.log.info({ key: p.key, dest: p.dest, entries: res.entries }, 'fetched and extracted');
    return { path: p.dest, size, sha256, verified, entries: res.entries };
  }
  try {
    // flush: fsync before close, so a rename after a crash never exposes an empty or partial file.
    await pipeline(got.stream, createWriteStream(tmp, { flags: 'wx', flush: true }), { signal: d.signal });
    await d.staging.commitFile(tmp, dest);
  } catch (err) {
    await d.staging.discard(tmp);
    throw err;
  }
  const { sha256, size } = got.digest();
  d.log.info({ key: p.key, dest: p.dest, size }, 'fetched');
  return { path: p.dest, size, sha256, verified };
}
