import { createHash, randomUUID } from 'node:crypto';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { STAGING_RECORDS, STAGING_TMP } from '../staging.js';
import type { ObjectInfo } from '../storage/driver.js';

/** What one verified copy proved: source size, mtime (ms) and etag as listed, destination etag, sha256. */
type Entry = [number, number, string, string, string];

const hash = (...parts: string[]) => createHash('sha256').update(parts.join('\0')).digest('hex');

/**
 * The record of what migrations from one backend to another verified, one file per chunk (named by
 * the chunk's first and last key, so a re-run that cuts the same chunks finds it). A re-run skips
 * an object without reading or HEADing it when the source as listed has the recorded size,
 * modification time and etag and the destination as listed has the recorded etag (S3 ETag, GCS
 * generation, Azure ETag, filesystem mtime+size+inode): both sides are then the very versions
 * whose bytes were hashed equal. It is a cache: lost or stale, it costs reads, never a wrong skip;
 * the staging sweep removes records not written for STEVEDORE_MIGRATE_RECORDS_DAYS.
 */
export class VerifiedRecord {
  private dirty = false;

  private constructor(private readonly path: string, private readonly entries: Map<string, Entry>, private job: string | undefined) {}

  /** Opens the record of the chunk `first`..`last` of `from` -> `to` (empty when there is none or it is unreadable). */
  static async open(stagingRoot: string, from: string, to: string, first: string, last: string): Promise<VerifiedRecord> {
    const path = join(stagingRoot, STAGING_RECORDS, hash(from, to).slice(0, 16), `${hash(first, last).slice(0, 32)}.json`);
    try {
      const doc = JSON.parse(await readFile(path, 'utf8')) as { job?: string; entries?: Record<string, Entry> };
      return new VerifiedRecord(path, new Map(Object.entries(doc.entries ?? {})), doc.job);
    } catch {
      return new VerifiedRecord(path, new Map(), undefined);
    }
  }

  /** True when this very chunk job wrote the record before: it is running again (stalled, retried). */
  ranBefore(jobId: string): boolean {
    return this.job === jobId;
  }

  /** The digest recorded for `src` at `dst`, when both are the versions recorded; else undefined. */
  trusted(src: ObjectInfo, dst: ObjectInfo | undefined): string | undefined {
    const e = this.entries.get(src.key);
    if (!e || !dst) return undefined;
    return e[0] === src.size && e[1] === src.modified.getTime() && e[2] === (src.etag ?? '') && e[3] === (dst.etag ?? '') && dst.size === src.size ? e[4] : undefined;
  }

  /** The digest recorded for a source version (whatever the destination), for a legacy source. */
  sourceDigest(src: ObjectInfo): string | undefined {
    const e = this.entries.get(src.key);
    return e && e[0] === src.size && e[1] === src.modified.getTime() && e[2] === (src.etag ?? '') ? e[4] : undefined;
  }

  /** The destination etag recorded for this key. */
  destinationEtag(key: string): string | undefined {
    return this.entries.get(key)?.[3];
  }

  set(src: ObjectInfo, dstEtag: string | undefined, sha256: string): void {
    this.entries.set(src.key, [src.size, src.modified.getTime(), src.etag ?? '', dstEtag ?? '', sha256]);
    this.dirty = true;
  }

  /** Marks the record as this chunk job's before it copies anything (see ranBefore); the write also keeps it from the sweep while the chunk runs. */
  async claim(jobId: string): Promise<void> {
    if (this.job === jobId) return;
    this.job = jobId;
    this.dirty = true;
    await this.flush();
  }

  /** Writes it whole under a temp name, then renames (no fsync: a record lost in a crash only costs reads). */
  async flush(): Promise<void> {
    if (!this.dirty) return;
    this.dirty = false;
    const dir = join(this.path, '..');
    await mkdir(dir, { recursive: true });
    const tmp = join(dir, `${STAGING_TMP}${randomUUID()}`);
    try {
      await writeFile(tmp, JSON.stringify({ job: this.job, entries: Object.fromEntries(this.entries) }));
      await rename(tmp, this.path);
    } catch (err) {
      this.dirty = true;
      await rm(tmp, { force: true });
      throw err;
    }
  }
}
