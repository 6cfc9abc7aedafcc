import { randomUUID } from 'node:crypto';
import { lstat, mkdtemp, rename, rm } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import type { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { extract as tarExtract, type Extract } from 'tar-stream';
import { classifyCommon, ErrorCode, StorageError } from '../errors.js';
import { STAGING_TMP } from '../staging.js';
import { syncDir } from '../storage/sync-dir.js';
import { entrySegments } from './entry-path.js';
import { ArchiveMeter, limitError, resolveLimits, type ExtractLimits, type Limits } from './limits.js';
import { ExtractTree } from './tree.js';

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

/** One entry as tar-stream yields it: a readable of its data, with `header` and `offset`. */
type EntryStream = Extract extends AsyncIterable<infer S> ? S : never;

/** Where an error first surfaced: decides its code when it is not already a StorageError. */
type Origin = 'source' | 'archive' | 'signal';

/**
 * Unpacks a tar or gzip-compressed tar (told apart by the gzip magic bytes, never by a name) into
 * `destDir`, which appears only when every entry was extracted. Work happens in a fresh directory
 * made with mkdtemp beside `destDir` (its name starts with STAGING_TMP, so a sweep of the staging
 * area finds what a killed worker left) and is renamed into place at the end; on any failure the
 * temp directory is removed and `destDir` is untouched.
 *
 * Only regular files and directories are extracted. Symlinks and hardlinks are refused outright,
 * whatever their target: allowing "safe" links means proving every later entry never resolves
 * through one, which is the bug class of every tar advisory; a build artifact can dereference them
 * (`tar -h`). Devices, FIFOs and unknown types are refused too. See entry-path.ts for names and
 * tree.ts for collisions. Errors: InvalidInput for anything the archive did wrong (with "limit"
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
  let first: { origin: Origin; err: unknown } | undefined;
  const note = (origin: Origin) => (err: unknown) => { first ??= { origin, err }; };
  const stop = new AbortController();
  const onAbort = (): void => {
    note('signal')(signal?.reason);
    stop.abort();
    source.destroy();
  };
  // Listeners go on before pipeline() adds its own, so the stream that failed first is the one noted.
  source.on('error', note('source'));
  if (source.errored) note('source')(source.errored);
  signal?.addEventListener('abort', onAbort, { once: true });
  let done: Promise<void> | undefined;
  let tree: ExtractTree | undefined;
  try {
    const head = await peek(source, 2);
    const gunzip = head[0] === 0x1f && head[1] === 0x8b ? createGunzip() : undefined;
    gunzip?.on('error', note('archive'));
    const ex = tarExtract();
    ex.on('error', note('archive'));
    // The iterator listens for 'entry' from the moment it exists; made after the pipeline starts,
    // an entry announced in between would be lost and the extraction would hang.
    const iterator = ex[Symbol.asyncIterator]();
    const meter = new ArchiveMeter(limits, gunzip);
    const tap = (s: AsyncIterable<Buffer>): AsyncGenerator<Buffer> => meter.tap(s);
    // tar-stream's extract is a streamx Writable, which pipeline() drives like a Node one.
    const sink = ex as unknown as Writable;
    done = gunzip
      ? pipeline(source, gunzip, tap, sink, { signal: stop.signal })
      : pipeline(source, tap, sink, { signal: stop.signal });
    done.catch(() => {}); // awaited below; until then its rejection is not unhandled
    tree = new ExtractTree(root, limits.maxEntries);
    const entries = await readEntries({ [Symbol.asyncIterator]: () => iterator }, meter, tree, limits);
    await done;
    meter.finish();
    await tree.finish();
    return { ...entries, files: tree.files, dirs: tree.dirs };
  } catch (err) {
    stop.abort();
    await done?.catch(() => {});
    // No file of the tree still open or being fsynced when the caller removes it.
    await tree?.settle();
    throw classify(err, first);
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
}

async function readEntries(ex: AsyncIterable<EntryStream>, meter: ArchiveMeter, tree: ExtractTree, limits: Limits): Promise<{ entries: number; bytes: number }> {
  let entries = 0;
  let bytes = 0;
  // One entry at a time: tar-stream reads no further until the loop asks for the next one.
  for await (const entry of ex) {
    const h = entry.header;
    if (++entries > limits.maxEntries) throw limitError(`more than ${limits.maxEntries} entries (maxEntries)`, h.name);
    const isDir = h.type === 'directory';
    // Frontier bookkeeping first, so the header limit holds whatever this entry turns out to be.
    meter.entry(h.name, entry.offset, isDir ? 0 : h.size);
    // GNU tar extracts 'contiguous-file' (typeflag 7) as a regular file, and so does this.
    if (!isDir && h.type !== 'file' && h.type !== 'contiguous-file') {
      const what = h.type === 'symlink' || h.type === 'link' ? `${h.type} entries are refused (target ${JSON.stringify(h.linkname)})` : `${h.type ?? 'unknown'} entries are refused`;
      throw new StorageError(ErrorCode.InvalidInput, what, { op: 'extract', key: h.name });
    }
    const segments = entrySegments(h.name, isDir, limits.maxPathDepth);
    const meta = { mode: h.mode, mtime: h.mtime };
    if (isDir) {
      await tree.directory(h.name, segments ?? [], meta);
      continue;
    }
    if (h.size > limits.maxEntryBytes) throw limitError(`entry of ${h.size} bytes over maxEntryBytes ${limits.maxEntryBytes}`, h.name);
    if (bytes + h.size > limits.maxTotalBytes) throw limitError(`more than ${limits.maxTotalBytes} bytes in total (maxTotalBytes)`, h.name);
    // tar-stream entry streams yield Buffers; its typings say unknown.
    bytes += await tree.file(h.name, segments!, h.size, meta, entry as AsyncIterable<Uint8Array>);
  }
  return { entries, bytes };
}

/** Gives an error that is not yet a StorageError the code its origin calls for. */
function classify(err: unknown, first: { origin: Origin; err: unknown } | undefined): StorageError {
  if (err instanceof StorageError) return err;
  if (first?.err instanceof StorageError) return first.err;
  const cause = first?.err ?? err;
  const message = cause instanceof Error ? cause.message : String(cause);
  if ((cause as NodeJS.ErrnoException | undefined)?.code === 'ERR_STREAM_PREMATURE_CLOSE' && first?.origin !== 'signal') {
    // The source went away without ending (a dropped connection): worth a retry, unlike a short archive.
    return new StorageError(ErrorCode.Transient, 'the archive stream closed before its end', { op: 'extract', cause });
  }
  switch (first?.origin) {
    case 'signal':
      return new StorageError(ErrorCode.Transient, 'extraction aborted', { op: 'extract', cause });
    case 'source':
      return new StorageError(classifyCommon(cause) ?? ErrorCode.Unknown, `reading the archive failed: ${message}`, { op: 'extract', cause });
    default:
      // zlib and tar-stream errors: the bytes are not a whole, valid tar(.gz).
      if (message.includes('Header exceeds max size')) return limitError(`a header over tar-stream's 4 MiB cap (maxHeaderBytes): ${message}`);
      return new StorageError(ErrorCode.InvalidInput, `corrupt or truncated archive: ${message}`, { op: 'extract', cause });
  }
}

/**
 * Reads at least `n` bytes (one chunk or a few) and puts them back, so the format is known
 * before the pipeline is built. Short of `n` bytes the input cannot be an archive.
 */
function peek(source: Readable, n: number): Promise<Buffer> {
  return new Promise<Buffer>((resolvePeek, reject) => {
    if (source.destroyed) return reject(source.errored ?? new Error('the archive stream was already closed'));
    const chunks: Buffer[] = [];
    let have = 0;
    const settle = (err?: unknown): void => {
      source.off('readable', onReadable).off('end', onEnd).off('error', settle).off('close', onClose);
      if (err !== undefined) return reject(err);
      if (have < n) return reject(new StorageError(ErrorCode.InvalidInput, `corrupt or truncated archive: ${have} bytes`, { op: 'extract' }));
      const all = Buffer.concat(chunks);
      source.unshift(all);
      resolvePeek(all.subarray(0, n));
    };
    const onReadable = (): void => {
      let chunk: unknown;
      while (have < n && (chunk = source.read()) !== null) {
        const buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk as Uint8Array);
        chunks.push(buf);
        have += buf.length;
      }
      if (have >= n) settle();
    };
    const onEnd = (): void => settle();
    const onClose = (): void => settle(new Error('the archive stream closed before its first bytes'));
    source.on('readable', onReadable).on('end', onEnd).on('error', settle).on('close', onClose);
  });
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
