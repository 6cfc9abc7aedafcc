import { z } from 'zod';
import { ErrorCode } from '../src/errors.js';
import { failureOf, mergeFailures, type Failure } from '../src/fanout/failures.js';
import { reportChunk, type ChunkResult } from '../src/fanout/parent.js';
import { codeOf, retrying } from '../src/fanout/retry.js';
import { BackendName, Key, type JobDeps } from '../src/payload.js';
import type { VerifyCounter } from './verify.js';

/** Internal job name of a verify's chunks. */
export const VERIFY_CHUNK = 'verify-chunk';

export const VerifyChunkPayload = z.strictObject({
  backend: BackendName.unwrap(),
  items: z.array(z.tuple([Key, z.number().int().nonnegative()])).min(1).max(100_000),
});
export type VerifyChunkPayload = z.infer<typeof VerifyChunkPayload>;

type Outcome = 'ok' | 'missingDigest';

/**
 * One chunk of a verify: each object read whole and hashed against its recorded digest. A
 * mismatch is a finding (counted, and named in `failures`), not the chunk's failure; an object
 * without a recorded digest is `missingDigest` (never `ok`) and is not read further.
 */
export async function verifyChunk(p: VerifyChunkPayload, d: JobDeps): Promise<ChunkResult<VerifyCounter>> {
  const b = d.bucket(p.backend);
  const c: Record<VerifyCounter, number> = { scanned: 0, ok: 0, mismatched: 0, missingDigest: 0, bytes: 0 };
  let failures: Failure[] = [];
  let next = 0;
  const one = async (key: string): Promise<Outcome> => {
    const got = await b.get(key, { signal: d.signal });
    if (got.info.sha256 === undefined) {
      got.stream.destroy();
      return 'missingDigest';
    }
    let n = 0;
    try {
      for await (const chunk of got.stream) n += (chunk as Buffer).length;
    } finally {
      c.bytes += n;
    }
    return 'ok';
  };
  const lane = async () => {
    for (let i = next++; i < p.items.length; i = next++) {
      const [key] = p.items[i]!;
      c.scanned += 1;
      try {
        c[await retrying(d.signal, () => one(key))] += 1;
      } catch (err) {
        if (d.signal.aborted) throw err;
        const code = codeOf(err);
        if (code === ErrorCode.ChecksumMismatch) c.mismatched += 1;
        failures = mergeFailures(failures, [failureOf(key, code, err instanceof Error ? err.message : String(err))]);
        d.log.warn({ key, code }, code === ErrorCode.ChecksumMismatch ? 'object failed its digest' : 'object not verified');
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(d.fanout?.limits.lanes ?? 8, p.items.length)) }, lane));
  await reportChunk(d, c);
  return { ...c, failures, last: p.items[p.items.length - 1]![0] };
}
