import { z } from 'zod';
import { ErrorCode, StorageError } from '../src/errors.js';
import { listMerged, type Listed } from '../src/fanout/listing.js';
import { runParent } from '../src/fanout/parent.js';
import type { Failure } from '../src/fanout/failures.js';
import { BackendName, Prefix, type JobDeps } from '../src/payload.js';
import { encodeItem, MIGRATE_CHUNK } from './migrate-chunk.js';

export const MigratePayload = z.strictObject({
  from: BackendName.unwrap(),
  to: BackendName.unwrap(),
  prefix: Prefix.optional(),
  dryRun: z.boolean().optional(),
  deleteSource: z.boolean().optional(),
  recheck: z.boolean().optional(),
});
export type MigratePayload = z.infer<typeof MigratePayload>;

export const MIGRATE_COUNTERS = ['scanned', 'copied', 'skipped', 'failed', 'bytes', 'missingDigest', 'deleted'] as const;
export type MigrateCounter = (typeof MIGRATE_COUNTERS)[number];
export type MigrateResult = Record<MigrateCounter, number> & { failures: Failure[] };

/**
 * The parent of a migration: lists the source beside the destination and hands chunks of keys
 * (never bytes) to `migrate-chunk` jobs that every worker takes (src/fanout/parent.ts); its result
 * sums theirs.
 */
export async function migrate(p: MigratePayload, d: JobDeps): Promise<MigrateResult> {
  if (p.from === p.to) throw new StorageError(ErrorCode.InvalidInput, `to: the destination is the source ("${p.from}")`);
  const src = d.bucket(p.from);
  const dst = d.bucket(p.to);
  const opts = { from: p.from, to: p.to, dryRun: p.dryRun ?? false, deleteSource: p.deleteSource ?? false, recheck: p.recheck ?? false };
  const result = await runParent<Listed, MigrateCounter>({
    child: MIGRATE_CHUNK,
    counters: MIGRATE_COUNTERS,
    lostInto: 'failed',
    abortOn: 'failed',
    items: (after) => listMerged(src, dst, p.prefix ?? '', after),
    key: (l) => l.src.key,
    size: (l) => l.src.size,
    chunk: (items) => ({ ...opts, items: items.map(encodeItem) }),
  }, d);
  d.log.info({ ...result, failures: result.failures.length }, 'migration finished');
  return result;
}
