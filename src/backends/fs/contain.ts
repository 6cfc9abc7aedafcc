import { mkdir } from 'node:fs/promises';
import { lstatPath, realpathPath, statPath } from '../../storage/fd.js';
import { dirname, join, sep } from 'node:path';
import { ErrorCode, StorageError } from '../../errors.js';
import { mkdirDurable } from '../../storage/sync-dir.js';
import { errno, folderTaken, keyName, META_DIR } from './layout.js';

const INSIDE_TTL_MS = 1000;
const INSIDE_MAX = 4096;

/**
 * Keeps every path the backend touches inside its root: keys naming the reserved folder are
 * refused, and a symlinked folder inside the root never leads a read or a write outside it.
 */
export class Containment {
  private realRoot: string | undefined;
  /**
   * Folders found inside the root, when, and whether their META_DIR was there: a realpath walks
   * every component, so it is cached briefly.
   */
  private readonly inside = new Map<string, { at: number; meta: 'dir' | 'absent'; id?: string }>();

  constructor(readonly root: string, private readonly fsync: boolean) {}

  async pathOf(key: string): Promise<string> {
    if (key.split('/').includes(META_DIR)) {
      throw new StorageError(ErrorCode.InvalidInput, `invalid key: "${META_DIR}" is reserved by the filesystem backend`, { key });
    }
    const path = join(this.root, key);
    await this.assertInside(dirname(path), key);
    return path;
  }

  /**
   * The folder a put writes into, checked to lie inside the root. An existing folder costs one
   * realpath (the put makes its META_DIR when missing). For a new one, the nearest folder that
   * exists is checked before anything is created (a symlink higher up would carry the mkdir out of
   * the root, as staging's resolve() guards too), then the new folders and their META_DIR are made
   * and the result checked again.
   */
  async prepareDir(key: string): Promise<{ dir: string; name: string }> {
    const path = await this.pathOf(key).catch(async (err: unknown) => {
      if (errno(err) !== 'ENOENT') throw err;
      const p = join(this.root, key);
      await this.assertInside(await this.nearestExisting(dirname(p)), key);
      await this.makeMetaDir(dirname(p), key);
      await this.assertInside(dirname(p), key);
      return p;
    });
    await this.recheckMeta(dirname(path), key);
    return { dir: dirname(path), name: keyName(key) };
  }

  async makeMetaDir(dir: string, key: string): Promise<void> {
    // A link planted as META_DIR would carry the put's temp file, sidecar and claims out of the
    // root (mkdir -p follows it without a word), so what is there is looked at first and after.
    if ((await this.metaDirState(dir, key)) === 'dir') return;
    try {
      // Each new folder is made durable in its parent. Not covered: a concurrent put that finds
      // the folders already made returns without waiting for this one's fsyncs (a few ms).
      const meta = join(dir, META_DIR);
      if (this.fsync) await mkdirDurable(meta);
      else await mkdir(meta, { recursive: true });
    } catch (err) {
      const code = errno(err);
      if (code === 'ENOTDIR' || code === 'EEXIST') throw folderTaken(key, err);
      throw err;
    }
    await this.metaDirState(dir, key);
  }

  /**
   * A folder's META_DIR must be a real directory, never a symlink (nor another file): the put's
   * temp files, sidecars, claims and adoption links go there, and reads take sidecars from it.
   * Absent is fine (made on a first put). One lstat, no realpath: a real directory of a folder
   * checked to be inside the root is inside too.
   */
  private async metaDirState(dir: string, key: string): Promise<'dir' | 'absent'> {
    const st = await lstatPath(join(dir, META_DIR)).catch((err: unknown) => {
      // ENOTDIR: a file where a folder should be, which the mkdir then reports as such.
      if (errno(err) === 'ENOENT' || errno(err) === 'ENOTDIR') return undefined;
      throw err;
    });
    const seen = this.inside.get(dir);
    if (!st) return 'absent';
    if (st.isDirectory()) {
      // Made since the folder was checked (a first put): later reads look for sidecars at once.
      if (seen) seen.meta = 'dir';
      return 'dir';
    }
    this.inside.delete(dir);
    throw new StorageError(ErrorCode.PermissionDenied, `"${META_DIR}" in this folder is ${st.isSymbolicLink() ? 'a symlink' : 'not a directory'}: it could lead outside the backend root`, { key });
  }

  /**
   * A symlinked folder inside the root must not lead a write or read outside it, nor a planted
   * META_DIR link (metaDirState). A folder found inside with a real META_DIR is trusted for
   * INSIDE_TTL_MS: like any realpath check this guards against links planted in the tree, not
   * against someone racing the worker within that time. A folder without META_DIR (a tree another
   * tool wrote, a migration's source) is cached too, to spare every read of it the realpath, but
   * with the identity (dev, ino) of what its path led to: each later hit stats the path again
   * (following links, so a folder or any folder above it swapped for a link out of the root shows
   * as another inode) and a different answer makes the full check run again. Writes and deletes in
   * such a folder do not use the cache at all (recheckMeta).
   */
  async assertInside(dir: string, key: string): Promise<void> {
    const now = Date.now();
    const seen = this.inside.get(dir);
    if (seen !== undefined && now - seen.at < INSIDE_TTL_MS && (seen.meta === 'dir' || await this.sameFolder(dir, seen.id))) return;
    // Not cached until the root exists: a root under a symlinked path must resolve for real.
    const realRoot = this.realRoot ?? (this.realRoot = await realpathPath(this.root).catch(() => undefined)) ?? this.root;
    const real = await realpathPath(dir);
    if (real !== realRoot && !real.startsWith(realRoot + sep)) {
      this.inside.delete(dir);
      throw new StorageError(ErrorCode.PermissionDenied, 'path leads outside the backend root through a symlink', { key });
    }
    const meta = await this.metaDirState(dir, key);
    // Taken after the realpath: a swap between the two shows at the next hit (another inode), or
    // already here as a realpath outside.
    const id = meta === 'absent' ? await statPath(dir).then(folderId, () => undefined) : undefined;
    if (this.inside.size >= INSIDE_MAX) this.inside.clear();
    this.inside.set(dir, { at: now, meta, ...(id === undefined ? {} : { id }) });
  }

  /** True when `dir` still leads to the folder whose identity the cache recorded. */
  private async sameFolder(dir: string, id: string | undefined): Promise<boolean> {
    if (id === undefined) return false;
    return statPath(dir).then((st) => folderId(st) === id, () => false);
  }

  /**
   * True when the folder's META_DIR was absent at its last check (a tree another tool wrote): a
   * read then looks for it (metaNow) after the object's own stat, instead of for the object's
   * sidecar. A hint only: what decides is that look.
   */
  metaAbsent(dir: string): boolean {
    return this.inside.get(dir)?.meta === 'absent';
  }

  /**
   * The folder's META_DIR as it is now: 'absent', or 'dir' (the cache learns it); PermissionDenied
   * when it is a link or another file (one planted since the folder was checked).
   */
  metaNow(dir: string, key: string): Promise<'dir' | 'absent'> {
    return this.metaDirState(dir, key);
  }

  /**
   * Before anything is written or removed in a folder cached without META_DIR: the whole check
   * again, uncached (realpath and META_DIR look), as for every such write before the cache. A link
   * planted as its META_DIR, or swapped in for the folder or one above it, since the folder was
   * cached would carry a temp file, a claim, a mkdir or an unlink out of the root.
   */
  async recheckMeta(dir: string, key: string): Promise<void> {
    if (!this.metaAbsent(dir)) return;
    this.inside.delete(dir);
    await this.assertInside(dir, key);
  }

  /**
   * The deepest of `dir` and its ancestors that exists, the root at the highest (created when
   * missing: the root itself is the backend's own).
   */
  private async nearestExisting(dir: string): Promise<string> {
    for (let d = dir; d.length > this.root.length; d = dirname(d)) {
      const found = await lstatPath(d).then(() => true, (err: unknown) => {
        if (errno(err) === 'ENOENT') return false;
        throw err;
      });
      if (found) return d;
    }
    if (this.fsync) await mkdirDurable(this.root);
    else await mkdir(this.root, { recursive: true });
    return this.root;
  }
}

const folderId = (st: { dev: bigint; ino: bigint }): string => `${st.dev}:${st.ino}`;
