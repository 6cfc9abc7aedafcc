import { constants, mkdir, open, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { classifyCommon, ErrorCode, StorageError } from '../errors.js';
import { Lanes } from '../storage/lanes.js';
import type { EntryChecker, Inspected } from './entry-check.js';

const { O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_RDONLY, O_DIRECTORY } = constants;

/** fsyncs of finished files that may run beside the extraction. */
const SYNC_LANES = 16;

/** Permission bits only (no setuid, setgid or sticky), never group- or world-writable. */
export const fileMode = (mode: number | undefined): number => (mode ?? 0o644) & 0o755;
/** As for files, plus owner rwx always, so the worker can fill and later remove every directory. */
export const dirMode = (mode: number | undefined): number => ((mode ?? 0o755) & 0o755) | 0o700;

export interface EntryMeta {
  mode?: number;
  mtime?: Date;
}

/**
 * The tree being extracted, rooted at a fresh directory this process created (so nothing in it
 * predates the extraction). The entry rules (collisions, a path through a file, links) are the
 * EntryChecker's, shared with every other consumer of a tar stream; this class only does the
 * filesystem side. Only directories and regular files are ever made, every path component is
 * created here (the checker remembers which), files are created with O_EXCL | O_NOFOLLOW and
 * their metadata is set through the open handle, so no write can be redirected by a symlink,
 * planted or otherwise. Every file and directory is fsynced before `finish` returns, so the tree
 * the caller then renames into place survives a power cut whole, as a fetched file does.
 */
export class ExtractTree {
  /** fsyncs (then closes) of written files, run while later entries are extracted. */
  private readonly syncs = new Lanes(SYNC_LANES);

  constructor(
    private readonly root: string,
    /** Its policy refuses links; a directory's mode and mtime ride on its node, applied last. */
    private readonly checker: EntryChecker<EntryMeta>,
  ) {
    checker.top.meta = {};
  }

  get files(): number { return this.checker.files; }
  get dirs(): number { return this.checker.dirs; }

  /** A directory entry; no segments is the root itself (`./`). */
  async directory(e: Inspected, meta: EntryMeta): Promise<void> {
    const placed = this.checker.place(e);
    await this.makeDirs(e, placed.createdFrom, e.segments.length);
    placed.node.meta = meta;
  }

  /** A regular file entry; returns the bytes written. An exact duplicate name replaces the earlier file, as tar does. */
  async file(e: Inspected, meta: EntryMeta, data: AsyncIterable<Uint8Array>): Promise<number> {
    const { name, segments, size } = e;
    const placed = this.checker.place(e);
    await this.makeDirs(e, placed.createdFrom, segments.length - 1);
    const abs = join(this.root, ...segments);
    // unlink(2) removes a name, never what it points to; the O_EXCL open below then makes a new file.
    if (placed.replaces) await fsCall(unlink(abs), name);
    const fh = await fsCall(open(abs, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600), name);
    let written = 0;
    try {
      // Errors of the archive stream itself pass through unwrapped: the caller knows their origin.
      for await (const chunk of data) {
        written += chunk.length;
        if (written > size) throw refuse(name, 'more data than its header declares');
        for (let at = 0; at < chunk.length;) {
          at += (await fsCall(fh.write(chunk, at, chunk.length - at), name)).bytesWritten;
        }
      }
      if (written !== size) throw refuse(name, `truncated: ${written} of ${size} bytes`);
      await fsCall(fh.chmod(fileMode(meta.mode)), name);
      if (validDate(meta.mtime)) await fsCall(fh.utimes(meta.mtime, meta.mtime), name);
    } catch (err) {
      await fh.close();
      throw err;
    }
    // fsynced and closed beside the extraction. A failed fsync is never retried: it fails the
    // extraction, at a later file's start or in `finish`.
    try {
      await this.syncs.start(() => fsCall(fh.sync().finally(() => fh.close()), name));
    } catch (err) {
      await fh.close(); // an earlier fsync failed: this one never started
      throw err;
    }
    return written;
  }

  /** Waits for the files still being fsynced; call it before removing a tree that failed. */
  async settle(): Promise<void> {
    await this.syncs.settle();
  }

  /**
   * Waits for the files' fsyncs, then applies directory modes and mtimes (the root gets 0o755
   * unless a `./` entry said otherwise) and fsyncs every directory, so all their entries are durable.
   */
  async finish(): Promise<void> {
    await this.syncs.finish();
    for (const [node, rel] of this.checker.directories()) {
      const fh = await fsCall(open(join(this.root, rel), O_RDONLY | O_DIRECTORY | O_NOFOLLOW), rel);
      try {
        if (node.meta !== undefined) {
          await fsCall(fh.chmod(dirMode(node.meta.mode)), rel);
          if (validDate(node.meta.mtime)) await fsCall(fh.utimes(node.meta.mtime, node.meta.mtime), rel);
        }
        await fsCall(fh.sync(), rel);
      } finally {
        await fh.close();
      }
    }
  }

  /**
   * Makes the directories the checker says this entry creates, segments[from..to). Not recursive:
   * each component is made here, so EEXIST means something this tree did not make (a
   * case-insensitive filesystem folding two names) and is refused, never followed.
   */
  private async makeDirs(e: Inspected, from: number, to: number): Promise<void> {
    for (let i = from; i < to; i++) {
      await fsCall(mkdir(join(this.root, ...e.segments.slice(0, i + 1)), 0o755), e.name);
    }
  }
}

function refuse(name: string, detail: string): StorageError {
  return new StorageError(ErrorCode.InvalidInput, detail, { op: 'extract', key: name });
}

function validDate(d: Date | undefined): d is Date {
  return d instanceof Date && Number.isFinite(d.getTime());
}

function fsCall<T>(op: Promise<T>, name: string): Promise<T> {
  return op.catch((err: unknown) => { throw fsError(err, name); });
}

/** Filesystem errors that an archive can provoke are its fault; the rest keep their usual code. */
function fsError(err: unknown, name: string): StorageError {
  if (err instanceof StorageError) return err;
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  const detail = (err as Error | undefined)?.message ?? String(err);
  if (code === 'EEXIST') return new StorageError(ErrorCode.InvalidInput, 'collides with an existing path', { op: 'extract', key: name, cause: err });
  if (code === 'ELOOP') return new StorageError(ErrorCode.InvalidInput, 'would write through a symlink', { op: 'extract', key: name, cause: err });
  // Names and times come from the archive: a filesystem refusing them is the archive's fault.
  if (code === 'ENAMETOOLONG' || code === 'ENOTDIR' || code === 'EISDIR' || code === 'EINVAL' || code === 'EILSEQ') {
    return new StorageError(ErrorCode.InvalidInput, `unusable path: ${detail}`, { op: 'extract', key: name, cause: err });
  }
  return new StorageError(classifyCommon(err) ?? ErrorCode.Unknown, `writing the entry failed: ${detail}`, { op: 'extract', key: name, cause: err });
}
