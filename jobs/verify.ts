import { z } from 'zod';
import type { Failure } from '../src/fanout/failures.js';
import { runParent } from '../src/fanout/parent.js';
import { BackendName, Prefix, type JobDeps } from '../src/payload.js';
import type { ObjectInfo } from '../src/storage/driver.js';
import { VERIFY_CHUNK } from './verify-chunk.js';

export const VerifyPayload = z.strictObject({
  backend: BackendName,
  prefix: Prefix.optional(),
});
export type VerifyPayload = z.infer<typeof VerifyPayload>;

export const VERIFY_COUNTERS = ['scanned', 'ok', 'mismatched', 'missingDigest', 'bytes'] as const;
export type VerifyCounter = (typeof VERIFY_COUNTERS)[number];
export type VerifyResult = Record<VerifyCounter, number> & { failures: Failure[] };

/** Re-reads every object under `prefix` against its recorded SHA-256, fanned out like migrate. */
export async function verify(p: VerifyPayload, d: JobDeps): Promise<VerifyResult> {
  const b = d.bucket(p.backend);
  const result = await runParent<ObjectInfo, VerifyCounter>({
    child: VERIFY_CHUNK,
    counters: VERIFY_COUNTERS,
    items: (after) => listAfter(b.list(p.prefix ?? ''), after),
    key: (o) => o.key,
    size: (o) => o.size,
    chunk: (items) => ({ backend: p.backend, items: items.map((o) => [o.key, o.size]) }),
  }, d);
  d.log.info({ ...result, failures: result.failures.length }, 'verify finished');
  return result;
}

async function* listAfter(list: AsyncIterable<ObjectInfo>, after: string | undefined): AsyncGenerator<ObjectInfo> {
  const past = after === undefined ? undefined : Buffer.from(after);
  for await (const o of list) if (!past || Buffer.compare(Buffer.from(o.key), past) > 0) yield o;
}
