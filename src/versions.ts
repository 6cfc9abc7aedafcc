import type { Bucket } from './storage/bucket.js';
import { ErrorCode, StorageError } from './errors.js';

export interface BuildVersion {
  build: string;
  /** The artifact at `sites/<site>/artifacts/<build>.tar.gz`, if stored. */
  artifact?: { key: string; size: number; modified: string } | undefined;
  /** Log entry keys for this build, oldest first. */
  logs: string[];
  /** Newest of the artifact's time and the last log entry's timestamp. */
  updated: string;
}

const SITE = /^[A-Za-z0-9._-]{1,128}$/;
// Log keys are `<24-char ISO timestamp>-<build>.json`.
const LOG_NAME = /^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z)-(.+)\.json$/;
const ARTIFACT_NAME = /^(.+)\.tar\.gz$/;

/** A site's builds from its artifacts and log entries, newest first; read from listings only. */
export async function versions(bucket: Bucket, site: string): Promise<BuildVersion[]> {
  if (!SITE.test(site) || site === '.' || site === '..') {
    throw new StorageError(ErrorCode.InvalidInput, 'site: must match [A-Za-z0-9._-]{1,128}', { op: 'versions', key: site });
  }
  const builds = new Map<string, BuildVersion>();
  const entry = (build: string) => {
    let v = builds.get(build);
    if (!v) builds.set(build, (v = { build, logs: [], updated: '' }));
    return v;
  };
  const artifacts = `sites/${site}/artifacts/`;
  for await (const o of bucket.list(artifacts)) {
    const m = ARTIFACT_NAME.exec(o.key.slice(artifacts.length));
    if (!m?.[1] || m[1].includes('/')) continue;
    const v = entry(m[1]);
    v.artifact = { key: o.key, size: o.size, modified: o.modified.toISOString() };
    if (v.artifact.modified > v.updated) v.updated = v.artifact.modified;
  }
  const logs = `sites/${site}/logs/`;
  for await (const o of bucket.list(logs)) {
    const m = LOG_NAME.exec(o.key.slice(logs.length));
    if (!m?.[1] || !m[2] || m[2].includes('/')) continue;
    const v = entry(m[2]);
    v.logs.push(o.key);
    if (m[1] > v.updated) v.updated = m[1];
  }
  return [...builds.values()].sort((a, b) => (a.updated === b.updated ? (a.build < b.build ? 1 : -1) : a.updated < b.updated ? 1 : -1));
}
