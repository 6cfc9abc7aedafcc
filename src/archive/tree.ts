import { constants, mkdir, open, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { classifyCommon, ErrorCode, StorageError } from '../errors.js';
import { Lanes } from '../storage/lanes.js';
import { collisionKey } from './entry-path.js';
import { limitError } from './limits.js';

const { O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_RDONLY, O_DIRECTORY } = constants;

/** fsyncs of finished files that may run beside the extraction. */
const SYNC_LANES = 16;

/** Permission bits only (no setuid, setgid or sticky), never group- or world-writable. */
export const fileMode = (mode: number | undefined): number => (mode ?? 0o644) & 0o755;
/** As for files, plus owner rwx always, so the worker can fill and later remove every directory. */
export const dirMode = (mode: number | undefined): number => ((mode ?? 0o755) & 0o755) | 0o700;

/**
 * One path this tree created. Kept as a trie of segments rather than a map of whole paths, so
 * memory grows with the segments created (each at most NAME_MAX bytes), not with path length
 * times entry count.
 */
interface PathNode {
  /** The spelling that created it; another spelling with the same collision key is refused. */
  segment: string;
  /** Children by collision key; undefined for a file. */
  children?: Map<string, PathNode>;
  /** A directory entry's mode and mtime, applied last: a 0o555 directory must not block its children. */
  meta?: EntryMeta;
}

export interface EntryMeta {
  mode?: number;
  mtime?: Date;
}

/**
 * The tree being extracted, rooted at a fresh directory this process created (so nothing in it
 * predates the extraction). Only directories and regular files are ever made, every path component
 * is created here and remembered, files are created with O_EXCL | O_NOFOLLOW and their metadata is
 * set through the open handle, so no write can be redirected by a symlink, planted or otherwise.
 * Every file and directory is fsynced before `finish` returns, so the tree the caller then renames
 * into place survives a power cut whole, as a fetched file does.
 */
export class ExtractTree {
  private readonly top: PathNode = { segment: '', children: new Map(), meta: {} };
  private paths = 0;
  /** fsyncs (then closes) of written files, run while later entries are extracted. */
  private readonly syncs = new Lanes(SYNC_LANES);
  files = 0;
  dirs = 0;

  constructor(
    private readonly root: string,
    /** Cap on paths created (files and directories, implied ones included). */
    private readonly maxPaths: number,
  ) {}

  /** A directory entry; `segments` empty is the root itself (`./`). */
  async directory(name: string, segments: string[], meta: EntryMeta): Promise<void> {
    const node = await this.ensureDirs(name, segments, segments.length);
    node.meta = meta;
  }

  /** A regular file entry; returns the bytes written. An exact duplicate name replaces the earlier file, as tar does. */
  async file(name: string, segments: string[], size: number, meta: EntryMeta, data: AsyncIterable<Uint8Array>): Promise<number> {
    const parent = await this.ensureDirs(name, segments, segments.length - 1);
    const rel = segments.join('/');
    const abs = join(this.root, rel);
    const last = segments[segments.length - 1]!;
    const key = collisionKey(last);
    const node = parent.children!.get(key);
    if (node) {
      sameSpelling(node, last, segments, segments.length - 1, name);
      if (node.children) throw refuse(name, `"${rel}" is already a directory`);
      // unlink(2) removes a name, never what it points to; the O_EXCL open below then makes a new file.
      await fsCall(unlink(abs), name);
    } else {
      this.add(parent, key, { segment: last }, name);
      this.files++;
    }
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
    const stack: Array<[PathNode, string]> = [[this.top, '']];
    for (let item = stack.pop(); item !== undefined; item = stack.pop()) {
      const [node, rel] = item;
      for (const child of node.children?.values() ?? []) {
        if (child.children) stack.push([child, rel === '' ? child.segment : `${rel}/${child.segment}`]);
      }
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

  /** Makes the first `count` segments exist as directories created by this tree; returns the last. */
  private async ensureDirs(name: string, segments: string[], count: number): Promise<PathNode> {
    let node = this.top;
    for (let i = 0; i < count; i++) {
      const segment = segments[i]!;
      const key = collisionKey(segment);
      const child = node.children!.get(key);
      if (child) {
        sameSpelling(child, segment, segments, i, name);
        if (!child.children) throw refuse(name, `"${segments.slice(0, i + 1).join('/')}" is a file, not a directory`);
        node = child;
        continue;
      }
      const made = this.add(node, key, { segment, children: new Map() }, name);
      // Not recursive: each component is made here, so EEXIST means something this tree did not
      // make (a case-insensitive filesystem folding two names) and is refused, never followed.
      await fsCall(mkdir(join(this.root, ...segments.slice(0, i + 1)), 0o755), name);
      this.dirs++;
      node = made;
    }
    return node;
  }

  private add(parent: PathNode, key: string, node: PathNode, name: string): PathNode {
    if (this.paths >= this.maxPaths) throw limitError(`more than ${this.maxPaths} paths (maxEntries)`, name);
    this.paths++;
    parent.children!.set(key, node);
    return node;
  }
}

function sameSpelling(node: PathNode, segment: string, segments: string[], i: number, name: string): void {
  if (node.segment !== segment) {
    const at = segments.slice(0, i).concat(segment).join('/');
    const other = segments.slice(0, i).concat(node.segment).join('/');
    throw refuse(name, `"${at}" collides with "${other}" (same name after Unicode NFC and case folding)`);
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
