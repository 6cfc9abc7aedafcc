import { createHash } from 'node:crypto';
import type { Bucket } from './storage/bucket.js';
import { ErrorCode, StorageError } from './errors.js';

export interface BuildVersion {
  build: string;
  /** The artifact at `sites/<site>/artifacts/<build>.tar.gz`, if stored. */
  artifact?: {
    key: string;
    size: number;
    /** When the object was last written (changes with every re-store, copy or migration). */
    modified: string;
    /** When the build was first stored: the `stored_at` the store job recorded, else `modified`. */
    storedAt: string;
  } | undefined;
  /** Log entry keys for this build, oldest first. */
  logs: string[];
  /** When the build was first stored or logged: the order of `versions`, newest first. */
  first: string;
  /** Newest of the artifact's modified time and the last log entry's timestamp. */
  updated: string;
}

/**
 * User metadata the store job puts on every object: when its key was first stored (fixed-width UTC
 * ISO), kept across overwrites, so a re-store or a migration (copies keep metadata) does not move a
 * build in `versions`.
 */
export const STORED_AT_META = 'stored_at';
/**
 * User metadata on a log entry: the job that wrote it (`jobIdentity`), so a second run of that job
 * finds its own entry. Entries written before identities were recorded carry the plain job id.
 */
export const JOB_ID_META = 'job_id';

const SITE = /^[A-Za-z0-9._-]{1,128}$/;
const ISO_MS = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;
// `<24-char ISO timestamp>-<build>[~<n>].json`: `~` is outside the build id's alphabet, so the
// suffix cannot be read as part of a build; `~` sorts after `.`, so every suffixed key sorts after
// the unsuffixed one, and one `~` per digit makes `~~10` sort after `~9`.
const LOG_KEY = /^sites\/([A-Za-z0-9._-]{1,128})\/logs\/(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z)-([A-Za-z0-9._-]{1,128}?)(?:(~+)(\d+))?\.json$/;
const ARTIFACT_NAME = /^(.+)\.tar\.gz$/;

/**
 * The key of a log entry. `seq` 0 is the plain key; 1, 2, ... are the entries that met a key
 * already taken (same site, build and millisecond), in the order they took their keys.
 */
export function logKey(site: string, timestamp: string, build: string, seq = 0): string {
  const suffix = seq > 0 ? `${'~'.repeat(String(seq).length)}${seq}` : '';
  return `sites/${site}/logs/${timestamp}-${build}${suffix}.json`;
}

/** The parts of a log entry key; undefined for anything else under `logs/`. */
export function parseLogKey(key: string): { site: string; timestamp: string; build: string; seq: number } | undefined {
  const m = LOG_KEY.exec(key);
  if (!m?.[1] || !m[2] || !m[3]) return undefined;
  if (m[5] !== undefined && m[4]!.length !== m[5].length) return undefined;
  return { site: m[1], timestamp: m[2], build: m[3], seq: m[5] === undefined ? 0 : Number(m[5]) };
}

/** A job id as a metadata value (printable ASCII without spaces, short); others by their digest. */
export function jobIdMeta(jobId: string): string {
  return /^[\u0021-\u007e]{1,200}$/.test(jobId) ? jobId : `sha256:${createHash('sha256').update(jobId).digest('hex')}`;
}

/** True for an id from BullMQ's per-Redis counter (BullMQ refuses integer custom ids). */
export function isCounterJobId(jobId: string): boolean {
  return `${Number.parseInt(jobId, 10)}` === jobId;
}

/**
 * What a log entry records to know its job again: the same on every attempt and redelivery of one
 * job, different between jobs. A counter id restarts after a Redis flush and repeats in a second
 * deployment on the same backend, so it is qualified with the job's enqueue time (`17@<ms>`); a
 * custom id is the producer's idempotency key (the same job however often it is enqueued) and
 * stands alone. As a metadata value (see `jobIdMeta`).
 */
export function jobIdentity(jobId: string, enqueuedAt: number): string {
  return jobIdMeta(isCounterJobId(jobId) ? `${jobId}@${enqueuedAt}` : jobId);
}

/** A recorded `stored_at`, if it is one (our own fixed-width form, a real instant). */
export function storedAt(metadata: Record<string, string>): string | undefined {
  const v = metadata[STORED_AT_META];
  return v !== undefined && ISO_MS.test(v) && !Number.isNaN(Date.parse(v)) && new Date(v).toISOString() === v ? v : undefined;
}

/**
 * A site's builds from its artifacts and log entries, newest first by the time each was first
 * stored or logged. Log entries carry that time in their key; artifacts in their `stored_at`
 * metadata (a HEAD each on S3, whose listings carry no metadata), else their modified time.
 */
export async function versions(bucket: Bucket, site: string): Promise<BuildVersion[]> {
  if (!SITE.test(site) || site === '.' || site === '..') {
    throw new StorageError(ErrorCode.InvalidInput, 'site: must match [A-Za-z0-9._-]{1,128}', { op: 'versions', key: site });
  }
  const builds = new Map<string, BuildVersion>();
  const entry = (build: string) => {
    let v = builds.get(build);
    if (!v) builds.set(build, (v = { build, logs: [], first: '', updated: '' }));
    return v;
  };
  const seen = (v: BuildVersion, first: string, last: string) => {
    if (v.first === '' || first < v.first) v.first = first;
    if (last > v.updated) v.updated = last;
  };
  const artifacts = `sites/${site}/artifacts/`;
  for await (const o of bucket.list(artifacts, { digests: true })) {
    const m = ARTIFACT_NAME.exec(o.key.slice(artifacts.length));
    if (!m?.[1] || m[1].includes('/')) continue;
    const v = entry(m[1]);
    const modified = o.modified.toISOString();
    const stored = storedAt(o.metadata) ?? modified;
    v.artifact = { key: o.key, size: o.size, modified, storedAt: stored };
    seen(v, stored, modified);
  }
  for await (const o of bucket.list(`sites/${site}/logs/`)) {
    const k = parseLogKey(o.key);
    if (!k || k.site !== site) continue;
    const v = entry(k.build);
    v.logs.push(o.key);
    seen(v, k.timestamp, k.timestamp);
  }
  return [...builds.values()].sort((a, b) => (a.first === b.first ? (a.build < b.build ? 1 : -1) : a.first < b.first ? 1 : -1));
}
