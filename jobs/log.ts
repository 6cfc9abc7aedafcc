import { createHash } from 'node:crypto';
import { z } from 'zod';
import { ErrorCode, StorageError } from '../src/errors.js';
import { BackendName, SiteId, type JobDeps } from '../src/payload.js';
import type { Bucket } from '../src/storage/bucket.js';
import type { ObjectInfo } from '../src/storage/driver.js';
import { JOB_ID_META, isCounterJobId, jobIdMeta, jobIdentity, logKey, parseLogKey } from '../src/versions.js';

const Word = z.string().min(1).max(128).regex(/^[\u0020-\u007e]+$/, 'must be printable ASCII');

/** ISO 8601 with a zone (`Z`, `±HH:MM`, `±HHMM`, `±HH`), seconds required, any fraction (cut to ms). */
const ISO = /^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:[.,](\d+))?(?:([Zz])|([+-])(\d{2})(?::?(\d{2}))?)$/;
const MIN_MS = 0; // 1970-01-01T00:00:00.000Z
const MAX_MS = Date.UTC(9999, 11, 31, 23, 59, 59, 999);

export const LogPayload = z.strictObject({
  backend: BackendName,
  site: SiteId,
  build: SiteId,
  action: Word,
  status: Word,
  metadata: z.record(z.string(), z.unknown()).optional(),
  /**
   * ISO 8601 with a zone offset or `Z`, or epoch milliseconds as a number; defaults to when the job
   * was enqueued, so a retry writes the same entry. Checked here, so a bad one fails at parse time.
   */
  timestamp: z.union([z.string(), z.number()]).superRefine((t, ctx) => {
    try {
      normalizeTimestamp(t);
    } catch (err) {
      ctx.addIssue({ code: 'custom', message: err instanceof StorageError ? err.detail.replace(/^timestamp: /, '') : String(err) });
    }
  }).optional(),
});
export type LogPayload = z.infer<typeof LogPayload>;

export interface LogResult {
  key: string;
  timestamp: string;
}

/** The seed format: the one JSON object a log entry holds. */
export interface LogEntry {
  timestamp: string;
  build_id: string;
  site_id: string;
  action: string;
  status: string;
  metadata: Record<string, unknown>;
}

/** Longest JSON entry: log entries are small records, not log files. */
const MAX_ENTRY_BYTES = 256 * 1024;
/** Keys tried for one entry before the job gives up for now (Transient: a retry tries again). */
const MAX_KEY_TRIES = 100;
/**
 * Suffixes of entries on stores without an atomic ifAbsent: 16 digits (so `~` x 16, sorting after
 * every counted suffix below 10^15), the rest a 48-bit digest of the job's identity.
 */
const OWN_SEQ_BASE = 10 ** 15;

/**
 * Writes one log entry as a single atomic object. Keys start with a fixed-width UTC ISO timestamp,
 * so they sort chronologically in every backend's listing order. The job's identity
 * (`jobIdentity`) lives in the object's user metadata, so the entry's JSON keeps the seed format,
 * and a key holding this job's own entry (a redelivery, or two runs at once after a lost lock) is
 * this job's result.
 *
 * Where ifAbsent is atomic, every write is `ifAbsent`: a key already taken by another job's entry
 * sends this one to the next free suffix (`~1`, `~2`, ..., `~~10`, which all sort after the first
 * key). Where it is not (S3 without conditional writes: the Bucket checks with a stat, so two
 * racing writers both pass), no key is shared between jobs: the entry goes to a suffix derived
 * from the job's identity (`~~~~~~~~~~~~~~~~1<15 digits>`), which only this job writes, so no
 * entry can overwrite another's; entries of one site, build and millisecond then sort by that
 * digest rather than in job order.
 */
export async function log(p: LogPayload, d: JobDeps): Promise<LogResult> {
  const timestamp = normalizeTimestamp(p.timestamp ?? d.enqueuedAt);
  const base = logKey(p.site, timestamp, p.build);
  const entry: LogEntry = { timestamp, build_id: p.build, site_id: p.site, action: p.action, status: p.status, metadata: p.metadata ?? {} };
  const bytes = Buffer.from(`${JSON.stringify(entry)}\n`);
  if (bytes.length > MAX_ENTRY_BYTES) {
    throw new StorageError(ErrorCode.InvalidInput, `metadata: entry of ${bytes.length} bytes is over ${MAX_ENTRY_BYTES}`, { op: 'log', key: base });
  }
  const bucket = d.bucket(p.backend);
  const identity = jobIdentity(d.jobId, d.enqueuedAt);
  // Wanted only when a key is taken (to tell our own earlier entry from another's): most jobs never hash twice.
  let digest: string | undefined;
  // Entries from before identities were recorded carry no job id, or a counter id alone (which
  // another job may share): the same bytes there are this job's own earlier run (the key already
  // held its time, site and build), anything else another entry.
  const plain = isCounterJobId(d.jobId) ? jobIdMeta(d.jobId) : undefined;
  const isOurs = (o: ObjectInfo) => {
    const recorded = o.metadata[JOB_ID_META];
    return recorded === identity || ((recorded === undefined || recorded === plain) && o.sha256 === (digest ??= createHash('sha256').update(bytes).digest('hex')));
  };
  const put = (key: string, ifAbsent: boolean) => bucket.put(key, bytes, { contentType: 'application/json', metadata: { [JOB_ID_META]: identity }, ifAbsent, signal: d.signal });
  const done = (key: string, again: boolean) => {
    d.log.info({ key }, again ? 'already logged by an earlier run of this job' : 'logged');
    return { key, timestamp };
  };

  if (!bucket.atomicIfAbsent) {
    const taken = await entriesAt(bucket, p.site, timestamp, p.build);
    const ours = taken.find(isOurs);
    if (ours) return done(ours.key, true);
    const used = new Set(taken.map((o) => o.key));
    // A digest shared with another job's entry is next to impossible; it only moves us on.
    for (let n = 0; ; n++) {
      const key = logKey(p.site, timestamp, p.build, ownSeq(identity, n));
      if (used.has(key)) continue;
      // Only this job writes this key: two runs of it at once write the same bytes.
      await put(key, false);
      return done(key, false);
    }
  }

  let key = base;
  for (let tries = 0; tries < MAX_KEY_TRIES; tries++) {
    try {
      await put(key, true);
      return done(key, false);
    } catch (err) {
      if (!(err instanceof StorageError && err.code === ErrorCode.PreconditionFailed)) throw err;
    }
    // Taken: by this job's own entry (return it), or by others (the next key after all of them).
    const taken = await entriesAt(bucket, p.site, timestamp, p.build);
    const ours = taken.find(isOurs);
    if (ours) return done(ours.key, true);
    // Counted suffixes only: one derived from an identity (written where ifAbsent was not atomic) is no count.
    const last = Math.max(0, ...taken.map((o) => parseLogKey(o.key)?.seq ?? 0).filter((seq) => seq < OWN_SEQ_BASE));
    key = logKey(p.site, timestamp, p.build, last + 1);
  }
  throw new StorageError(ErrorCode.Transient, `${MAX_KEY_TRIES} keys for this site, build and millisecond were taken while trying`, { op: 'log', key: base });
}

/** The suffix only this job writes, on stores without an atomic ifAbsent (`n` > 0 after a digest collision). */
function ownSeq(identity: string, n: number): number {
  return OWN_SEQ_BASE + Number.parseInt(createHash('sha256').update(n === 0 ? identity : `${identity}#${n}`).digest('hex').slice(0, 12), 16);
}

/** The entries of one site, build and millisecond, with their user metadata (a stat each where listings carry none). */
async function entriesAt(bucket: Bucket, site: string, timestamp: string, build: string): Promise<ObjectInfo[]> {
  const out: ObjectInfo[] = [];
  // The prefix also matches other builds that start with this one (`b` and `b2`): parse to filter.
  for await (const o of bucket.list(logKey(site, timestamp, build).slice(0, -'.json'.length), { digests: true })) {
    const k = parseLogKey(o.key);
    if (k && k.site === site && k.timestamp === timestamp && k.build === build) out.push(o);
  }
  return out;
}

/**
 * The fixed-width `YYYY-MM-DDTHH:mm:ss.sssZ` form of a timestamp given as ISO 8601 with a zone, or
 * as epoch milliseconds (a number). Anything else is InvalidInput: a string without a zone would
 * depend on the worker's TZ, and `Date`'s lenient parser reads `'1'` as 2001. Years outside
 * 1970-9999 would break the key's sort and are refused.
 */
export function normalizeTimestamp(t: string | number): string {
  // The payload's check and the handler ask for the same value one after the other.
  if (t === lastTimestamp.t) return lastTimestamp.out;
  const out = parseTimestamp(t);
  lastTimestamp = { t, out };
  return out;
}

let lastTimestamp: { t: string | number | undefined; out: string } = { t: undefined, out: '' };

function parseTimestamp(t: string | number): string {
  const bad = (why: string): never => {
    throw new StorageError(ErrorCode.InvalidInput, `timestamp: ${JSON.stringify(t).slice(0, 64)} ${why}`, { op: 'log' });
  };
  let ms: number;
  if (typeof t === 'number') {
    if (!Number.isSafeInteger(t)) return bad('is not a whole number of epoch milliseconds');
    ms = t;
  } else if (typeof t === 'string') {
    const m = ISO.exec(t);
    if (!m) return bad('is not ISO 8601 with a zone offset or Z (e.g. 2026-12-02T07:00:00Z), nor epoch milliseconds as a number');
    const [year, month, day, hour, minute, second] = m.slice(1, 7).map(Number) as [number, number, number, number, number, number];
    const fraction = Number((m[7] ?? '').padEnd(3, '0').slice(0, 3));
    if (year < 1969 || year > 9999) return bad('is not between 1970 and 9999');
    const local = Date.UTC(year, month - 1, day, hour, minute, second, fraction);
    const check = new Date(local);
    // Date.UTC rolls over (Feb 30 becomes Mar 2): a field out of range shows as a different date.
    if (check.getUTCFullYear() !== year || check.getUTCMonth() !== month - 1 || check.getUTCDate() !== day
      || check.getUTCHours() !== hour || check.getUTCMinutes() !== minute || check.getUTCSeconds() !== second) {
      return bad('names no such date or time');
    }
    let offset = 0;
    if (!m[8]) {
      const oh = Number(m[10]);
      const om = Number(m[11] ?? '0');
      if (oh > 23 || om > 59) return bad('has an impossible zone offset');
      offset = (m[9] === '-' ? -1 : 1) * (oh * 60 + om) * 60_000;
    }
    ms = local - offset;
  } else {
    return bad('must be a string or a number');
  }
  if (ms < MIN_MS || ms > MAX_MS) return bad('is not between 1970 and 9999');
  return new Date(ms).toISOString();
}
