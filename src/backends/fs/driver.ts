import { randomUUID } from 'node:crypto';
import { constants, type BigIntStats, type Dirent } from 'node:fs';
import { lstat, mkdir, open, readdir, rename, unlink } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCode, StorageError } from '../../errors.js';
import type { ByteRange, Driver, DriverDeleteOptions, DriverGetResult, DriverPutOptions, ListPage, ObjectInfo, PutBody } from '../../storage/driver.js';
import { SourceBody } from '../../storage/body.js';
import { closeFd, fstatFd, fsyncFd, openFd, writeFully } from '../../storage/fd.js';
import { CHUNK } from '../../storage/hashing.js';
import { syncDir } from '../../storage/sync-dir.js';
import { adoptFile, hashThrough } from './adopt.js';
import { claim } from './claim.js';
import { Containment } from './contain.js';
import { errno, etagOf, folderTaken, keyName, linkPath, META_DIR, notFound, preconditionFailed, sidecarPath, TMP_PREFIX, toInfo, unlinkPath, unlinkQuiet, type Sidecar } from './layout.js';
import { findSidecar, FolderCache } from './sidecar.js';
import { sweepTree } from './sweep.js';
import { writeAll } from './write.js';

export interface FsDriverOptions {
  /** Absolute root directory; object `k` is the plain file `<root>/<k>`. */
  root: string;
  /**
   * fsync file and directories before a put returns, so an acknowledged object survives a power
   * cut. Only benchmarks of the rest of the path turn this off. @defaultValue true
   */
  fsync?: boolean;
}

/** Reads of an object whose key was replaced while its metadata was looked up, before giving up on the metadata. */
const RACED_RETRIES = 3;

/**
 * Filesystem backend, for a local disk or NFS. A put writes a temp file beside the target, fsyncs
 * it, writes the metadata sidecar named after the temp file's inode, then renames (or, for
 * ifAbsent, hard-links) the temp file into place: that single rename is the commit, so a reader
 * sees the old object with its own sidecar or the new one with its, never a mix. A copied tree
 * (new inodes) finds its sidecars by name, size and mtime and adopts them (sidecar.ts); ifMatch
 * claims the version by link() (claim.ts).
 */
export class FsDriver implements Driver {
  readonly kind = 'file';
  readonly metadataAtEnd = true;
  readonly atomicIfAbsent = true;
  /** Among conditional writers (and ifAbsent creators); see claim.ts for what an unconditional put does. */
  readonly atomicIfMatch = true;
  readonly listHasDigest = true;
  readonly root: string;
  private readonly fsync: boolean;
  private readonly contain: Containment;

  constructor(opts: FsDriverOptions) {
    this.root = opts.root.replace(/\/+$/, '') || '/';
    this.fsync = opts.fsync ?? true;
    this.contain = new Containment(this.root, this.fsync);
  }

  async put(key: string, body: PutBody, opts: DriverPutOptions): Promise<ObjectInfo> {
    const { dir, name } = await this.contain.prepareDir(key);
    const path = join(dir, name);
    // Before any byte is written (the claim at the commit is what makes it atomic).
    if (opts.ifMatch !== undefined) await checkEtag(key, path, opts.ifMatch);
    const tmp = join(dir, META_DIR, `${TMP_PREFIX}${randomUUID()}`);
    // A source its producer gave up becomes the temp file itself, on the same filesystem (adopt.ts).
    const adopted = opts.consumable ? await adoptFile(opts.consumable, tmp) : undefined;
    const fd = adopted ?? await openFd(tmp, 'wx', 0o644).catch(async (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOTDIR') throw folderTaken(key, err);
      // The folder exists but has no META_DIR yet (its files were put there by hand).
      if (err.code !== 'ENOENT') throw err;
      await this.contain.makeMetaDir(dir, key);
      return openFd(tmp, 'wx', 0o644);
    });
    let sidecar: string | undefined;
    // Set once both descriptors are done with: their closes run beside the commit.
    let closing: Promise<unknown> | undefined;
    try {
      let st: BigIntStats;
      let meta: Sidecar;
      // The sidecar is named after the temp file's inode, known at once: created now, its folder
      // entry reaches the disk while the bytes stream, so the end of the put waits for two fsyncs
      // in a row (data and sidecar together, then the folder after the rename), as a bare atomic
      // write does. The name belongs to an inode nobody can see yet: no temp-and-rename needed.
      let sc: number | undefined;
      try {
        let entries: Promise<void> = Promise.resolve();
        // The bytes stream while the sidecar is made (a small body is written before its fstat
        // and open come back): neither waits on the other, and both end before anything else.
        const opening = (async () => {
          sidecar = sidecarPath(dir, name, (await fstatFd(fd)).ino);
          sc = await openSidecar(sidecar);
          if (this.fsync) entries = syncDir(join(dir, META_DIR));
          entries.catch(() => {}); // awaited below; a failure must not be unhandled meanwhile
        })();
        const writing = adopted === undefined ? writeAll(fd, body, opts.signal, this.fsync) : hashThrough(fd, body, opts.signal, this.fsync);
        try {
          const started = await Promise.allSettled([writing, opening]);
          for (const r of started) if (r.status === 'rejected') throw r.reason;
          const sidecarFd = sc!;
          const { sha256, size } = body.digest();
          // Beside the data's fsync (which changes no mtime): the sidecar's fstat, write and fsync.
          const writeMeta = async (): Promise<[BigIntStats, Sidecar]> => {
            const written = await fstatFd(fd);
            // The mtime too: after a copy that keeps it, it tells this version's sidecar from others.
            const m: Sidecar = { key, sha256, size, contentType: opts.contentType, metadata: opts.metadata, mtimeNs: String(written.mtimeNs) };
            await writeFully(sidecarFd, Buffer.from(JSON.stringify(m)));
            if (this.fsync) await fsyncFd(sidecarFd);
            return [written, m];
          };
          const done = await Promise.allSettled([this.fsync ? fsyncFd(fd) : undefined, writeMeta(), entries]);
          for (const r of done) if (r.status === 'rejected') throw r.reason;
          [st, meta] = (done[1] as PromiseFulfilledResult<[BigIntStats, Sidecar]>).value;
        } finally {
          await entries.catch(() => {});
        }
      } finally {
        // Both descriptors, whatever failed (the first fstat or the sidecar's open included). Both
        // files are written and fsynced by now (or the put failed): the commit need not wait for it.
        closing = Promise.allSettled([closeFd(fd), sc === undefined ? undefined : closeFd(sc)]);
      }
      // The replaced version is held (open, or linked by the claim) until its sidecar is removed:
      // freed, its inode number could go to a new put's temp file, whose sidecar has that name.
      let old: { st: BigIntStats; release(): Promise<void> } | undefined;
      try {
        if (opts.ifMatch !== undefined) {
          old = await claim('put', key, dir, name, opts.ifMatch);
          if (!old) throw preconditionFailed('put', key, `object is gone (expected etag ${opts.ifMatch})`);
          await rename(tmp, path).catch(swept(key));
        } else if (opts.ifAbsent) {
          // link() fails with EEXIST when the key exists: an atomic create-if-absent, also on NFS.
          await linkPath(tmp, path).catch((err: NodeJS.ErrnoException) => {
            if (err.code === 'EEXIST') throw new StorageError(ErrorCode.PreconditionFailed, 'object already exists', { op: 'put', key, cause: err });
            return swept(key)(err);
          });
        } else {
          old = await holdObject(path);
          await rename(tmp, path).catch(swept(key));
        }
        sidecar = undefined;
        // After a link the temp name goes beside the folder's fsync (a temp file the sweep removed
        // first, or one left behind, is no failure: the link committed).
        await Promise.all([opts.ifAbsent && opts.ifMatch === undefined ? unlinkQuiet(tmp) : undefined, this.fsync ? syncDir(dir) : undefined]);
        if (old && old.st.ino !== st.ino) await unlinkQuiet(sidecarPath(dir, name, old.st.ino));
      } finally {
        await Promise.all([old?.release(), closing]);
      }
      return toInfo(key, st, meta);
    } catch (err) {
      await closing;
      // The sidecar first: it must never be left without its temp file, by which readers of a
      // copied tree tell a put under way from a copied sidecar (sidecar.ts).
      if (sidecar) await unlinkQuiet(sidecar);
      await unlinkQuiet(tmp);
      throw err;
    }
  }

  async get(key: string, range: ByteRange | undefined, signal: AbortSignal | undefined): Promise<DriverGetResult> {
    const path = await this.contain.pathOf(key);
    for (let attempt = 0; ; attempt++) {
      // O_NOFOLLOW: a symlink planted at a key is never followed out of the root.
      const fh = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW);
      try {
        const st = await fh.stat({ bigint: true });
        if (!st.isFile()) throw notFound('get', key);
        const meta = await findSidecar(path, keyName(key), st);
        if (meta === 'raced' && attempt < RACED_RETRIES) { await fh.close(); continue; }
        const info = toInfo(key, st, meta === 'raced' ? undefined : meta);
        // A start past the end (decision 2) is the Bucket's to refuse, for every backend.
        const stream = fh.createReadStream({
          start: range?.start ?? 0, highWaterMark: CHUNK, signal,
          ...(range?.end === undefined ? {} : { end: range.end }),
        });
        return { stream, info };
      } catch (err) {
        await fh.close().catch(() => {});
        throw err;
      }
    }
  }

  stat(key: string): Promise<ObjectInfo> {
    return this.statWith(key, undefined);
  }

  async list(prefix: string, pageToken: string | undefined, pageSize: number): Promise<ListPage> {
    const objects: ObjectInfo[] = [];
    let more = false;
    const after = pageToken === undefined ? undefined : Buffer.from(pageToken);
    // Objects of a copied tree look for their sidecars by name: one readdir per folder, not per object.
    const cache = new FolderCache();
    const walk = async (rel: string): Promise<void> => {
      let entries: Dirent[];
      try {
        entries = await readdir(rel ? join(this.root, rel) : this.root, { withFileTypes: true });
      } catch (err) {
        if (errno(err) === 'ENOENT' || errno(err) === 'ENOTDIR') return;
        throw err;
      }
      // Sorting a directory's entries by `name` for files and `name/` for folders yields the whole
      // tree in UTF-8 byte order of key, the order S3, GCS and Azure list in.
      const sorted = entries
        .filter((e) => e.name !== META_DIR && (e.isFile() || e.isDirectory()))
        .map((e) => ({ e, sortKey: Buffer.from(e.isDirectory() ? `${e.name}/` : e.name) }))
        .sort((a, b) => Buffer.compare(a.sortKey, b.sortKey));
      for (const { e } of sorted) {
        if (more) return;
        const key = rel ? `${rel}/${e.name}` : e.name;
        if (e.isDirectory()) {
          const folder = `${key}/`;
          if (!folder.startsWith(prefix) && !prefix.startsWith(folder)) continue;
          if (after && Buffer.compare(Buffer.from(folder), after) < 0 && !pageToken!.startsWith(folder)) continue;
          await walk(key);
          continue;
        }
        if (!key.startsWith(prefix) || (after && Buffer.compare(Buffer.from(key), after) <= 0)) continue;
        if (objects.length === pageSize) { more = true; return; }
        const info = await this.statWith(key, cache).catch((err: unknown) => {
          if (errno(err) === 'ENOENT') return undefined; // deleted while listing
          // Replaced by a folder while listing, or removed with its folder: not an object any more.
          if (err instanceof StorageError && err.code === ErrorCode.NotFound) return undefined;
          throw err;
        });
        if (info) objects.push(info);
      }
    };
    const slash = prefix.lastIndexOf('/');
    await walk(slash < 0 ? '' : prefix.slice(0, slash));
    return { objects, next: more ? objects[objects.length - 1]?.key : undefined };
  }

  /**
   * Decision 1: a missing key, or one that names a folder, succeeds and deletes nothing; any real
   * failure (EIO, EACCES) fails with its code, so a caller that deletes a source after copying it
   * can trust a success.
   */
  async delete(key: string, opts: DriverDeleteOptions = {}): Promise<void> {
    const path = await this.contain.pathOf(key).catch((err: unknown) => {
      if (errno(err) === 'ENOENT' || errno(err) === 'ENOTDIR') return undefined;
      throw err;
    });
    if (!path) return;
    const dir = dirname(path);
    const name = keyName(key);
    // Held (by the claim, or open) until its sidecar is removed, so its inode number is not reused meanwhile.
    const held = opts.ifMatch !== undefined ? await claim('delete', key, dir, name, opts.ifMatch) : await holdObject(path);
    // Nothing there, or not a regular file (a folder, a symlink planted at the key): no object, nothing to delete.
    if (!held) return;
    try {
      if (opts.ifMatch !== undefined) {
        const now = await lstatOrGone(path);
        if (!now) return;
        // Replaced since the claim (by a put that asked for no condition): not the version asked for.
        if (now.ino !== held.st.ino) throw preconditionFailed('delete', key, `object changed (etag ${etagOf(now)}, expected ${opts.ifMatch})`);
      }
      await unlinkObject(path);
      // The object is gone; a sidecar left by a failure here is the sweep's.
      await unlinkQuiet(sidecarPath(dir, name, held.st.ino));
    } finally {
      await held.release();
    }
  }

  async copy(src: string, dst: string, opts: { ifAbsent: boolean; ifMatch?: string | undefined }): Promise<ObjectInfo> {
    // Bytes stream through, checked against the source's digest, so a rotten source is not copied as good.
    const { stream, info } = await this.get(src, undefined, undefined);
    const body = new SourceBody({ stream }, info.sha256, info.size, { sha256: info.sha256, size: info.size, op: 'copy', key: src });
    try {
      return await this.put(dst, body, { contentType: info.contentType, metadata: info.metadata, ifAbsent: opts.ifAbsent, ifMatch: opts.ifMatch, signal: undefined });
    } finally {
      await body.close();
    }
  }

  async health(): Promise<void> {
    await mkdir(this.root, { recursive: true });
    const probe = join(this.root, `${META_DIR}-health-${randomUUID()}`);
    await (await open(probe, 'wx')).close();
    await unlink(probe);
  }

  classify(err: unknown): ErrorCode | undefined {
    const code = errno(err);
    if (code === 'ENAMETOOLONG' || code === 'ELOOP') return ErrorCode.InvalidInput;
    return undefined;
  }

  async close(): Promise<void> {}

  /**
   * Removes what killed writers left: temp files and ifMatch claims older than `maxAgeMs`, and
   * sidecars no object can use (never an object's only digest). Returns how many files it removed.
   */
  sweep(maxAgeMs = 60 * 60_000): Promise<number> {
    return sweepTree(this.root, maxAgeMs);
  }

  private async statWith(key: string, cache: FolderCache | undefined): Promise<ObjectInfo> {
    const path = await this.contain.pathOf(key);
    for (let attempt = 0; ; attempt++) {
      const st = await lstat(path, { bigint: true });
      if (!st.isFile()) throw notFound('stat', key);
      const meta = await findSidecar(path, keyName(key), st, cache);
      if (meta === 'raced' && attempt < RACED_RETRIES) continue;
      return toInfo(key, st, meta === 'raced' ? undefined : meta);
    }
  }
}

/** A `file:` URL: its path is the root; it takes no parameters, and an unknown one is refused (a typo must not pass silently). */
export function fsDriverFromUrl(url: URL): FsDriver {
  const name = url.searchParams.keys().next();
  if (!name.done) throw new StorageError(ErrorCode.InvalidInput, `file: unknown parameter "${name.value}"`, { op: 'config' });
  return new FsDriver({ root: fileURLToPath(url) });
}

/** The precondition seen from outside, before a put streams its bytes. */
async function checkEtag(key: string, path: string, etag: string): Promise<void> {
  const st = await lstatOrGone(path);
  if (!st || !st.isFile()) throw preconditionFailed('put', key, `object is gone (expected etag ${etag})`);
  if (etagOf(st) !== etag) throw preconditionFailed('put', key, `object changed (etag ${etagOf(st)}, expected ${etag})`);
}

/**
 * The object at `path` opened (never following a link, never blocking on a FIFO) so that its inode
 * stays allocated while held; undefined when there is no regular file. Falls back to lstat when it
 * cannot be opened (no read permission).
 */
async function holdObject(path: string): Promise<{ st: BigIntStats; release(): Promise<void> } | undefined> {
  let fd: number;
  try {
    fd = await openFd(path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch (err) {
    if (errno(err) !== 'EACCES' && errno(err) !== 'EPERM') {
      if (errno(err) === 'ENOENT' || errno(err) === 'ENOTDIR' || errno(err) === 'ELOOP') return undefined;
      throw err;
    }
    const st = await lstatOrGone(path);
    return st?.isFile() ? { st, release: async () => {} } : undefined;
  }
  const release = () => closeFd(fd).catch(() => {});
  try {
    const st = await fstatFd(fd);
    if (st.isFile()) return { st, release };
  } catch (err) {
    await release();
    throw err;
  }
  await release();
  return undefined;
}

/**
 * Creates the sidecar of a new temp file's inode. One left under that name by an earlier holder
 * of the inode number is unlinked, not truncated: it may be a hard link shared with a sidecar
 * another object adopted (sidecar.ts), which must keep its content.
 */
async function openSidecar(path: string): Promise<number> {
  try {
    return await openFd(path, 'wx', 0o644);
  } catch (err) {
    if (errno(err) !== 'EEXIST') throw err;
    await unlinkPath(path).catch((e: unknown) => { if (errno(e) !== 'ENOENT') throw e; });
    return openFd(path, 'wx', 0o644);
  }
}

/**
 * The commit found no temp file: the put stalled past the sweep's age and the sweep removed it
 * (sweep.ts: that unlink and this rename decide which of them wins). Nothing was committed.
 */
function swept(key: string): (err: unknown) => never {
  return (err) => {
    if (errno(err) === 'ENOENT') throw new StorageError(ErrorCode.Transient, 'the temp file was swept before the put could commit (the put stalled past the sweep age)', { op: 'put', key, cause: err });
    throw err;
  };
}

async function lstatOrGone(path: string): Promise<BigIntStats | undefined> {
  return lstat(path, { bigint: true }).catch((err: unknown) => {
    if (errno(err) === 'ENOENT' || errno(err) === 'ENOTDIR') return undefined;
    throw err;
  });
}

/** Unlinks an object; already gone is success, anything else fails the delete. */
async function unlinkObject(path: string): Promise<void> {
  await unlink(path).catch((err: unknown) => {
    if (errno(err) !== 'ENOENT') throw err;
  });
}
