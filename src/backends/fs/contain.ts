import { mkdir } from 'node:fs/promises';
import { lstatPath, realpathPath } from '../../storage/fd.js';
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
  private readonly inside = new Map<string, { at: number; meta: 'dir' | 'absent' }>();

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
   * META_DIR link (metaDirState). A folder found inside, with a real META_DIR or none, is trusted
   * for INSIDE_TTL_MS: like any realpath check this guards against links planted in the tree, not
   * against someone racing the worker, and a link swapped in for a checked folder (or planted as
   * its META_DIR) is caught within that time. A folder without META_DIR gets one at its first put
   * (prepareDir looks again, makeMetaDir checks what it made), as before; the cache only spares
   * every read of a tree another tool wrote (a migration's source) the realpath and the look.
   */
  async assertInside(dir: string, key: string): Promise<void> {
    const now = Date.now();
    const seen = this.inside.get(dir);
    if (seen !== undefined && now - seen.at < INSIDE_TTL_MS) return;
    // Not cached until the root exists: a root under a symlinked path must resolve for real.
    const realRoot = this.realRoot ?? (this.realRoot = await realpathPath(this.root).catch(() => undefined)) ?? this.root;
    const real = await realpathPath(dir);
    if (real !== realRoot && !real.startsWith(realRoot + sep)) {
      this.inside.delete(dir);
      throw new StorageError(ErrorCode.PermissionDenied, 'path leads outside the backend root through a symlink', { key });
    }
    const meta = await this.metaDirState(dir, key);
    if (this.inside.size >= INSIDE_MAX) this.inside.clear();
    this.inside.set(dir, { at: now, meta });
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
   * Before anything is written or removed in a folder cached without META_DIR: a link planted there
   * since would carry a temp file, a claim or a sidecar's unlink out of the root.
   */
  async recheckMeta(dir: string, key: string): Promise<void> {
    if (this.metaAbsent(dir)) await this.metaDirState(dir, key);
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
