import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { lstat, mkdir, readdir, realpath, rename, rm } from 'node:fs/promises';
import type { Dirent } from 'node:fs';
import { basename, dirname, isAbsolute, join, normalize, sep } from 'node:path';
import { ErrorCode, StorageError } from './errors.js';
import { mkdirDurable, syncDir } from './storage/sync-dir.js';

/** Prefix of temp files and directories the worker creates inside the staging area. */
export const STAGING_TMP = '.stevedore-tmp-';

export interface StagingOptions {
  /** How long a staged source that is not (yet) visible is looked up again before NotFound. @defaultValue 2000 */
  sourceWaitMs?: number | undefined;
}

export interface SweepOptions {
  /** Age (by ctime) past which a killed worker's temp file or tree is removed. @defaultValue 1 hour */
  maxAgeMs?: number | undefined;
  /**
   * Age (by ctime) past which a file the CLI staged under `incoming/` is removed: `store` without
   * `--wait` (or past its `--timeout`) leaves its copy for the job, which may wait in the queue a
   * long while first. @defaultValue 24 hours
   */
  incomingMaxAgeMs?: number | undefined;
  /**
   * Age (by mtime) past which a migration's record of verified copies (under STAGING_RECORDS) is
   * removed. @defaultValue 30 days
   */
  recordsMaxAgeMs?: number | undefined;
}

/** Folder of the staging area where the CLI stages the files it enqueues `store` jobs for. */
export const STAGING_INCOMING = 'incoming';

/** Folder of the staging area holding migrations' records of verified copies (src/fanout/record.ts). */
export const STAGING_RECORDS = 'migrate-records';

/**
 * The staging area shared by producers and workers. Payload paths are relative to it; anything
 * that resolves outside it (absolute, `..`, or through a symlink) is InvalidInput.
 */
export class Staging {
  private realRoot: string | undefined;
  readonly sourceWaitMs: number;

  constructor(readonly root: string, opts: StagingOptions = {}) {
    this.sourceWaitMs = opts.sourceWaitMs ?? 2_000;
  }

  /** Absolute path of `rel`, checked to stay inside the staging area (parents resolved through symlinks). */
  async resolve(rel: string, field = 'path'): Promise<string> {
    const bad = (why: string): never => {
      throw new StorageError(ErrorCode.InvalidInput, `${field}: ${why}`, { op: 'staging', key: rel });
    };
    if (typeof rel !== 'string' || rel.length === 0) return bad('empty');
    if (/[\u0000-\u001f]/.test(rel)) return bad('contains a control character');
    if (isAbsolute(rel) || rel.startsWith('\\')) return bad('must be relative to the staging directory');
    const parts = rel.split(/[\\/]/);
    if (parts.includes('..')) return bad('must not contain ".."');
    const path = join(this.root, normalize(rel));
    if (path === this.root) return bad('names the staging directory itself');
    await mkdir(this.root, { recursive: true });
    // The nearest existing ancestor decides: a symlinked folder higher up would carry a later
    // mkdir outside the area.
    let dir = dirname(path);
    while (dir.length > this.root.length && !(await exists(dir))) dir = dirname(dir);
    await this.assertInside(dir, rel, field);
    return path;
  }

  /** A staged file to read: a regular file inside the area, not a symlink. */
  async source(rel: string, field = 'source.path', opts: { signal?: AbortSignal | undefined } = {}): Promise<string> {
    return (await this.sourceFile(rel, field, opts)).path;
  }

  /**
   * A staged file to read and its size. A file not there yet is looked up again for a short,
   * bounded while (`sourceWaitMs`) before NotFound: on an NFS client a file another replica just
   * created can stay invisible for a moment (the negative lookup cache), and reading its folder
   * again makes the client revalidate it. The containment check is repeated with each lookup, as
   * folders may appear meanwhile too.
   */
  async sourceFile(rel: string, field = 'source.path', opts: { signal?: AbortSignal | undefined } = {}): Promise<{ path: string; size: number }> {
    const deadline = Date.now() + this.sourceWaitMs;
    for (let delay = 50; ; delay = Math.min(delay * 2, 400)) {
      const path = await this.resolve(rel, field);
      const st = await lstat(path).catch((err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT') return undefined;
        throw err;
      });
      if (st) {
        if (!st.isFile()) throw new StorageError(ErrorCode.InvalidInput, `${field}: not a regular file (symlinks are not followed)`, { op: 'staging', key: rel });
        // Again, now that the file was found: a folder on its way that became a symlink out of the
        // area between the check in resolve and the lookup led the lookup outside.
        await this.assertInside(dirname(path), rel, field);
        return { path, size: st.size };
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new StorageError(ErrorCode.NotFound, `${field}: no such staged file (looked for ${this.sourceWaitMs} ms)`, { op: 'staging', key: rel });
      await sleep(Math.min(delay, left), undefined, { signal: opts.signal });
      await this.relist(dirname(path));
    }
  }

  /** Reads the nearest existing folder of `dir` (inside the area), so an NFS client revalidates its entries. */
  private async relist(dir: string): Promise<void> {
    for (; dir.length >= this.root.length; dir = dirname(dir)) {
      if (await readdir(dir).then(() => true, () => false)) return;
      if (dir === dirname(dir)) return;
    }
  }

  /**
   * A fresh temp path beside `dest` (same directory, so the final rename is atomic), with the
   * parent created. Temp names start with STAGING_TMP so a sweep can find leftovers.
   */
  async tempBeside(dest: string): Promise<string> {
    await this.ensureParent(dest);
    // Cut, so a dest name near the 255-byte limit still leaves room for the prefix and the UUID.
    return join(dirname(dest), `${STAGING_TMP}${basename(dest).slice(0, 64)}-${randomUUID()}`);
  }

  /** Creates the folder `dest` goes in, checked to be inside the area once it exists. */
  async ensureParent(dest: string): Promise<void> {
    await mkdirDurable(dirname(dest)).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'EEXIST' && err.code !== 'ENOTDIR') throw err;
      throw new StorageError(ErrorCode.InvalidInput, 'dest: a file is where its folder must be', { op: 'staging', key: dest, cause: err });
    });
    await this.assertInside(dirname(dest), dest, 'dest');
  }

  /**
   * Makes a finished (fsynced) temp file visible at `dest`, durably. If the folder's fsync fails,
   * the rename is not known to be durable: `dest` is taken back and the error thrown (the job
   * fails Transient for EIO and runs again from scratch; the fsync itself is never retried).
   */
  async commitFile(tmp: string, dest: string): Promise<void> {
    await rename(tmp, dest);
    try {
      await syncDir(dirname(dest));
    } catch (err) {
      await rm(dest, { force: true });
      throw err;
    }
  }

  private async assertInside(dir: string, rel: string, field: string): Promise<void> {
    this.realRoot ??= await realpath(this.root);
    const real = await realpath(dir);
    if (real !== this.realRoot && !real.startsWith(this.realRoot + sep)) {
      throw new StorageError(ErrorCode.InvalidInput, `${field}: leads outside the staging directory through a symlink`, { op: 'staging', key: rel });
    }
  }

  async discard(tmp: string): Promise<void> {
    await rm(tmp, { recursive: true, force: true });
  }

  /**
   * Removes what killed workers left in the staging area: temp files and trees (STAGING_TMP) in
   * which nothing changed for `maxAgeMs`; the CLI's staged copies under `incoming/` older than
   * `incomingMaxAgeMs`; and migration records not written for `recordsMaxAgeMs`. A temp tree
   * counts as changed while any entry in it is newer, so a long extraction is never swept from
   * under its worker. Age is judged by ctime, which `utimes` cannot set back: extraction gives
   * files the archive's mtimes (often 1970). Records are the exception, judged by mtime: only our
   * own writer makes them, whole each time (temp file, rename), so their mtime is their last
   * write; and a chunk writes its record as it starts, so a running migration's is fresh (one
   * swept anyway is written again whole at the chunk's next flush). Symlinks are never followed.
   * Returns how many leftovers it removed. A number is `maxAgeMs`.
   */
  async sweep(options: number | SweepOptions = {}): Promise<number> {
    const opts = typeof options === 'number' ? { maxAgeMs: options } : options;
    const now = Date.now();
    const cutoff = now - (opts.maxAgeMs ?? 60 * 60_000);
    const incomingCutoff = now - (opts.incomingMaxAgeMs ?? 24 * 60 * 60_000);
    const recordsCutoff = now - (opts.recordsMaxAgeMs ?? 30 * 24 * 60 * 60_000);
    const incoming = join(this.root, STAGING_INCOMING);
    const records = join(this.root, STAGING_RECORDS);
    let removed = 0;
    const visit = async (dir: string): Promise<void> => {
      const entries = await readdir(dir, { withFileTypes: true }).catch(() => [] as Dirent[]);
      for (const e of entries) {
        const path = join(dir, e.name);
        if (e.name.startsWith(STAGING_TMP)) {
          if ((await newestChange(path)) <= cutoff) {
            await rm(path, { recursive: true, force: true });
            removed++;
          }
        } else if (dir === incoming && e.isFile()) {
          const st = await lstat(path).catch(() => undefined);
          if (st && st.ctimeMs <= incomingCutoff) {
            await rm(path, { force: true });
            removed++;
          }
        } else if (e.isFile() && (dir === records || dir.startsWith(records + sep))) {
          const st = await lstat(path).catch(() => undefined);
          if (st && st.mtimeMs <= recordsCutoff) {
            await rm(path, { force: true });
            removed++;
          }
        } else if (e.isDirectory()) {
          await visit(path);
        }
      }
    };
    await visit(this.root);
    return removed;
  }
}

/** The latest ctime of `path` and, for a directory, of everything under it (0 if it vanished). */
async function newestChange(path: string): Promise<number> {
  const st = await lstat(path).catch(() => undefined);
  if (!st) return 0;
  let newest = st.ctimeMs;
  if (st.isDirectory()) {
    for (const e of await readdir(path).catch(() => [] as string[])) newest = Math.max(newest, await newestChange(join(path, e)));
  }
  return newest;
}

async function exists(path: string): Promise<boolean> {
  return lstat(path).then(() => true, () => false);
}
