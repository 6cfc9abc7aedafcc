import { randomUUID } from 'node:crypto';
import { lstat, mkdtemp, rename, rm } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import type { Readable } from 'node:stream';
import { classifyCommon, ErrorCode, StorageError } from '../errors.js';
import { STAGING_TMP } from '../staging.js';
import { syncDir } from '../storage/sync-dir.js';
import { EntryChecker } from './entry-check.js';
import { resolveLimits, type ExtractLimits, type Limits } from './limits.js';
import { readTar } from './tar-read.js';
import { ExtractTree, type EntryMeta } from './tree.js';

export interface ExtractOptions extends ExtractLimits {
  /**
   * What to do when `destDir` already exists (as anything, a symlink included). By default the
   * extraction is refused with PreconditionFailed before the archive is read. With `replace`, the
   * old entry is renamed aside (never followed: a planted symlink is moved, not its target), the
   * new tree renamed into place, then the old one removed. Between those two renames `destDir`
   * briefly does not exist; it never holds a partial tree.
   * @defaultValue false
   */
  replace?: boolean;
  /** Aborting stops the extraction, removes the temp directory and fails with Transient. */
  signal?: AbortSignal;
}

export interface ExtractResult {
  /** Tar entries read (files, directories and the root `./` entry; not PAX or long-name headers). */
  entries: number;
  /** File data bytes written. */
  bytes: number;
  /** Regular files in the result. */
  files: number;
  /** Directories in the result, implied ones included, the root not counted. */
  dirs: number;
}

/**
 * Unpacks a tar or gzip-compressed tar (told apart by the gzip magic bytes, never by a name) into
 * `destDir`, which appears only when every entry was extracted. It is one consumer of the shared
 * stream pieces: tar-read.ts (format, limits), entry-check.ts (the entry rules) and tree.ts (the
 * files). Work happens in a fresh directory made with mkdtemp beside `destDir` (its name starts with STAGING_TMP, so a sweep of the staging
 * area finds what a killed worker left) and is renamed into place at the end; on any failure the
 * temp directory is removed and `destDir` is untouched.
 *
 * Only regular files and directories are extracted. Symlinks and hardlinks are refused outright,
 * whatever their target: allowing "safe" links means proving every later entry never resolves
 * through one, which is the bug class of every tar advisory; a build artifact can dereference them
 * (`tar -h`). Devices, FIFOs and unknown types are refused too. See entry-path.ts for names and
 * entry-check.ts for collisions. Errors: InvalidInput for anything the archive did wrong (with "limit"
 * for limit violations), PreconditionFailed for an existing `destDir`, Transient when aborted, and
 * the source's own code when reading it fails. The source is consumed or destroyed in all cases.
 */
export async function extractArchive(source: Readable, destDir: string, opts: ExtractOptions = {}): Promise<ExtractResult> {
  const dest = resolve(destDir);
  let tmp: string | undefined;
  try {
    const limits = resolveLimits(opts);
    throwIfAborted(opts.signal);
    if (!opts.replace && (await exists(dest))) throw destExists(dest);
    // The name is cut so the temp name stays under NAME_MAX whatever the destination is called.
    tmp = await mkdtemp(join(dirname(dest), `${STAGING_TMP}${basename(dest).slice(0, 64)}.extract-`)).catch((err: unknown) => {
      throw new StorageError(classifyCommon(err) ?? ErrorCode.Unknown, 'cannot create the temp directory beside dest', { op: 'extract', key: destDir, cause: err });
    });
    const result = await unpack(source, tmp, limits, opts.signal);
    throwIfAborted(opts.signal);
    await commit(tmp, dest, opts.replace === true);
    tmp = undefined;
    return result;
  } catch (err) {
    source.destroy();
    // A temp dir that cannot be removed is left to the staging sweep; the original error matters more.
    if (tmp !== undefined) await rm(tmp, { recursive: true, force: true }).catch(() => {});
    if (err instanceof StorageError) throw err;
    throw new StorageError(classifyCommon(err) ?? ErrorCode.Unknown, `extraction failed: ${(err as Error).message}`, { op: 'extract', key: destDir, cause: err });
  }
}

async function unpack(source: Readable, root: string, limits: Limits, signal: AbortSignal | undefined): Promise<ExtractResult> {
  const checker = new EntryChecker<EntryMeta>({ links: 'refuse', maxPathDepth: limits.maxPathDepth, maxPaths: limits.maxEntries, op: 'extract' });
  const tree = new ExtractTree(root, checker);
  try {
    const read = await readTar(source, { limits, checker, signal, op: 'extract' }, async ({ inspected, header, stream }) => {
      const meta = { mode: header.mode, mtime: header.mtime };
      if (inspected.type === 'directory') return tree.directory(inspected, meta);
      // tar-stream entry streams yield Buffers; its typings say unknown.
      await tree.file(inspected, meta, stream as AsyncIterable<Uint8Array>);
    });
    await tree.finish();
    return { entries: read.entries, bytes: read.bytes, files: tree.files, dirs: tree.dirs };
  } catch (err) {
    // No file of the tree still open or being fsynced when the caller removes it.
    await tree.settle();
    throw err;
  }
}

/** How often a replacing commit moves aside a tree that a concurrent run put at dest meanwhile. */
const COMMIT_ATTEMPTS = 5;

/**
 * Puts the finished tree at `dest` and makes the rename durable. With `replace`, whatever is at
 * `dest` is moved aside first; a tree another run of the same job put there in between (a job
 * run twice at once) is moved aside in turn, so the last run wins whole instead of the others
 * failing. rename(2) of a directory fails on a non-empty directory or a non-directory (a symlink
 * included) at `dest`, so nothing is ever written through what is there.
 */
async function commit(tmp: string, dest: string, replace: boolean): Promise<void> {
  const asides: string[] = [];
  try {
    await placeTree(tmp, dest, replace, asides);
  } catch (err) {
    // Nothing of ours got to dest: put back the tree that was there (the last one moved aside).
    const last = asides.pop();
    if (last !== undefined) await rename(last, dest).catch(() => {});
    throw err;
  }
  // Best effort: a leftover carries the STAGING_TMP prefix, so the staging sweep removes it.
  for (const aside of asides) await rm(aside, { recursive: true, force: true }).catch(() => {});
  try {
    await syncDir(dirname(dest));
  } catch (err) {
    // Not known to be durable: take it back and fail (Transient for EIO), never retry the fsync.
    await rm(dest, { recursive: true, force: true });
    throw err;
  }
}

/** The rename loop of `commit`; trees it moved out of the way are added to `asides`. */
async function placeTree(tmp: string, dest: string, replace: boolean, asides: string[]): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    if (replace && (await exists(dest))) {
      const aside = join(dirname(dest), `${STAGING_TMP}${basename(dest).slice(0, 64)}.old-${randomUUID()}`);
      // Moves a symlink itself, never its target; gone already if the other run moved it.
      const moved = await rename(dest, aside).then(() => true, (err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT') return false;
        throw err;
      });
      if (moved) asides.push(aside);
    } else if (!replace && (await exists(dest))) {
      throw destExists(dest);
    }
    const taken = await rename(tmp, dest).then(() => false, (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOTEMPTY' || err.code === 'EEXIST' || err.code === 'ENOTDIR') return err;
      throw err;
    });
    if (!taken) break;
    if (!replace) throw destExists(dest, taken);
    if (attempt === COMMIT_ATTEMPTS) {
      throw new StorageError(ErrorCode.Transient, 'destination keeps being replaced by another writer', { op: 'extract', key: dest, cause: taken });
    }
  }
}

function destExists(dest: string, cause?: unknown): StorageError {
  return new StorageError(ErrorCode.PreconditionFailed, 'destination already exists', { op: 'extract', key: dest, cause });
}

async function exists(path: string): Promise<boolean> {
  return lstat(path).then(() => true, (err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return false;
    throw err;
  });
}

function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new StorageError(ErrorCode.Transient, 'extraction aborted', { op: 'extract', cause: signal.reason });
}
