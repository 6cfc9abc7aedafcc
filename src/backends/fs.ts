import { createHash, randomUUID } from 'node:crypto';
import { constants, type BigIntStats, type Dirent } from 'node:fs';
import { link, lstat, mkdir, open, readdir, readFile, realpath, rename, unlink } from 'node:fs/promises';
import { dirname, join, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCode, StorageError } from '../errors.js';
import type { ByteRange, Driver, DriverGetResult, DriverPutOptions, ListPage, ObjectInfo, PutBody } from '../storage/driver.js';
import { SourceBody } from '../storage/body.js';
import { closeFd, fdatasyncFd, fstatFd, fsyncFd, openFd, writeFully } from '../storage/fd.js';
import { CHUNK } from '../storage/hashing.js';
import { mkdirDurable, syncDir } from '../storage/sync-dir.js';

/**
 * Folder, in every directory that holds objects, for temp files and metadata sidecars. A key with
 * a segment of this name is refused, so nothing a user stores can collide with it.
 */
export const META_DIR = '.stevedore';
const TMP_PREFIX = 'tmp-';
const INSIDE_TTL_MS = 1000;
const INSIDE_MAX = 4096;

export interface FsDriverOptions {
  /** Absolute root directory; object `k` is the plain file `<root>/<k>`. */
  root: string;
  /**
   * fsync file and directories before a put returns, so an acknowledged object survives a power
   * cut. Only benchmarks of the rest of the path turn this off. @defaultValue true
   */
  fsync?: boolean;
}

interface Sidecar {
  key: string;
  sha256: string;
  size: number;
  contentType?: string | undefined;
  metadata: Record<string, string>;
}

/**
 * Filesystem backend, for a local disk or NFS. A put writes a temp file beside the target, fsyncs
 * it, writes the metadata sidecar named after the temp file's inode, then renames (or, for
 * ifAbsent, hard-links) the temp file into place: that single rename is the commit, so a reader
 * sees the old object with its own sidecar or the new one with its, never a mix.
 */
export class FsDriver implements Driver {
  readonly kind = 'file';
  readonly metadataAtEnd = true;
  readonly atomicIfAbsent = true;
  readonly atomicIfMatch = false;
  readonly listHasDigest = true;
  readonly root: string;
  private readonly fsync: boolean;
  private realRoot: string | undefined;
  /** Folders found inside the root, and when: a realpath walks every component, so it is cached briefly. */
  private readonly inside = new Map<string, number>();

  constructor(opts: FsDriverOptions) {
    this.root = opts.root.replace(/\/+$/, '') || '/';
    this.fsync = opts.fsync ?? true;
  }

  async put(key: string, body: PutBody, opts: DriverPutOptions): Promise<ObjectInfo> {
    const { dir, name } = await this.prepareDir(key);
    const tmp = join(dir, META_DIR, `${TMP_PREFIX}${randomUUID()}`);
    const fd = await openFd(tmp, 'wx', 0o644).catch(async (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOTDIR') throw folderTaken(key, err);
      // The folder exists but has no META_DIR yet (its files were put there by hand).
      if (err.code !== 'ENOENT') throw err;
      await this.makeMetaDir(dir, key);
      return openFd(tmp, 'wx', 0o644);
    });
    let sidecar: string | undefined;
    try {
      let st: BigIntStats;
      let meta: Sidecar;
      // The sidecar is named after the temp file's inode, known at once: created now, its folder
      // entry reaches the disk while the bytes stream, so the end of the put waits for two fsyncs
      // in a row (data and sidecar together, then the folder after the rename), as a bare atomic
      // write does. The name belongs to an inode nobody can see yet: no temp-and-rename needed.
      let sc: number | undefined;
      try {
        sidecar = this.sidecarPath(dir, name, (await fstatFd(fd)).ino);
        sc = await openFd(sidecar, 'w', 0o644);
        const sidecarFd = sc;
        const entries = this.fsync ? syncDir(join(dir, META_DIR)) : Promise.resolve();
        entries.catch(() => {}); // awaited below; a failure must not be unhandled meanwhile
        try {
          await writeAll(fd, body, opts.signal, this.fsync);
          st = await fstatFd(fd);
          const { sha256, size } = body.digest();
          meta = { key, sha256, size, contentType: opts.contentType, metadata: opts.metadata };
          const writeMeta = async () => {
            await writeFully(sidecarFd, Buffer.from(JSON.stringify(meta)));
            if (this.fsync) await fsyncFd(sidecarFd);
          };
          const done = await Promise.allSettled([this.fsync ? fsyncFd(fd) : undefined, writeMeta(), entries]);
          for (const r of done) if (r.status === 'rejected') throw r.reason;
        } finally {
          await entries.catch(() => {});
        }
      } finally {
        // Both descriptors, whatever failed (the first fstat or the sidecar's open included).
        await Promise.allSettled([closeFd(fd), sc === undefined ? undefined : closeFd(sc)]);
      }
      const path = join(dir, name);
      const old = opts.ifAbsent ? undefined : await lstat(path, { bigint: true }).catch(() => undefined);
      if (opts.ifAbsent) {
        // link() fails with EEXIST when the key exists: an atomic create-if-absent, also on NFS.
        await link(tmp, path).catch((err: NodeJS.ErrnoException) => {
          if (err.code === 'EEXIST') throw new StorageError(ErrorCode.PreconditionFailed, 'object already exists', { op: 'put', key, cause: err });
          throw err;
        });
        await unlink(tmp);
      } else {
        await rename(tmp, path);
      }
      sidecar = undefined;
      if (this.fsync) await syncDir(dir);
      if (old && old.ino !== st.ino) await unlinkQuiet(this.sidecarPath(dir, name, old.ino));
      return toInfo(key, st, meta);
    } catch (err) {
      await unlinkQuiet(tmp);
      if (sidecar) await unlinkQuiet(sidecar);
      throw err;
    }
  }

  async get(key: string, range: ByteRange | undefined, signal: AbortSignal | undefined): Promise<DriverGetResult> {
    const path = await this.pathOf(key);
    for (let attempt = 0; ; attempt++) {
      // O_NOFOLLOW: a symlink planted at a key is never followed out of the root.
      const fh = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW);
      try {
        const st = await fh.stat({ bigint: true });
        if (!st.isFile()) throw notFound('get', key);
        const meta = await this.readSidecar(path, key, st);
        if (meta === 'raced' && attempt < 3) { await fh.close(); continue; }
        const info = toInfo(key, st, meta === 'raced' ? undefined : meta);
        if (range && range.start >= info.size && info.size > 0) {
          throw new StorageError(ErrorCode.InvalidInput, `range starts at ${range.start}, past the end (${info.size} bytes)`, { op: 'get', key });
        }
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

  async stat(key: string): Promise<ObjectInfo> {
    const path = await this.pathOf(key);
    for (let attempt = 0; ; attempt++) {
      const st = await lstat(path, { bigint: true });
      if (!st.isFile()) throw notFound('stat', key);
      const meta = await this.readSidecar(path, key, st);
      if (meta === 'raced' && attempt < 3) continue;
      return toInfo(key, st, meta === 'raced' ? undefined : meta);
    }
  }

  async list(prefix: string, pageToken: string | undefined, pageSize: number): Promise<ListPage> {
    const objects: ObjectInfo[] = [];
    let more = false;
    const after = pageToken === undefined ? undefined : Buffer.from(pageToken);
    const walk = async (rel: string): Promise<void> => {
      let entries: Dirent[];
      try {
        entries = await readdir(rel ? join(this.root, rel) : this.root, { withFileTypes: true });
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as NodeJS.ErrnoException).code === 'ENOTDIR') return;
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
        const info = await this.stat(key).catch((err: unknown) => {
          if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined; // deleted while listing
          throw err;
        });
        if (info) objects.push(info);
      }
    };
    const slash = prefix.lastIndexOf('/');
    await walk(slash < 0 ? '' : prefix.slice(0, slash));
    return { objects, next: more ? objects[objects.length - 1]?.key : undefined };
  }

  async delete(key: string): Promise<void> {
    const path = await this.pathOf(key).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return undefined;
      throw err;
    });
    if (!path) return;
    const st = await lstat(path, { bigint: true }).catch(() => undefined);
    if (!st) return;
    if (!st.isFile()) throw notFound('delete', key);
    await unlinkQuiet(path);
    await unlinkQuiet(this.sidecarPath(dirname(path), keyName(key), st.ino));
  }

  async copy(src: string, dst: string, opts: { ifAbsent: boolean }): Promise<ObjectInfo> {
    // Bytes stream through, checked against the source's digest, so a rotten source is not copied as good.
    const { stream, info } = await this.get(src, undefined, undefined);
    const body = new SourceBody({ stream }, info.sha256, info.size, { sha256: info.sha256, size: info.size, op: 'copy', key: src });
    try {
      return await this.put(dst, body, { contentType: info.contentType, metadata: info.metadata, ifAbsent: opts.ifAbsent, signal: undefined });
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
    const code = (err as NodeJS.ErrnoException | undefined)?.code;
    if (code === 'ENAMETOOLONG' || code === 'ELOOP') return ErrorCode.InvalidInput;
    return undefined;
  }

  async close(): Promise<void> {}

  /**
   * Removes what killed writers left: temp files older than `maxAgeMs`, and sidecars whose object
   * is gone or was replaced. Returns how many files it removed.
   */
  async sweep(maxAgeMs = 60 * 60_000): Promise<number> {
    let removed = 0;
    const cutoff = Date.now() - maxAgeMs;
    const visit = async (dir: string): Promise<void> => {
      const entries = await readdir(dir, { withFileTypes: true }).catch(() => [] as Dirent[]);
      for (const e of entries) {
        if (!e.isDirectory()) continue;
        const path = join(dir, e.name);
        if (e.name !== META_DIR) { await visit(path); continue; }
        const files = await readdir(path).catch(() => [] as string[]);
        // A sidecar is created when its put starts, so one of a live temp file belongs to a put
        // still streaming (its temp file's mtime moves as it writes; the sidecar's does not).
        const writing = new Set<bigint>();
        for (const f of files) {
          if (!f.startsWith(TMP_PREFIX)) continue;
          const st = await lstat(join(path, f), { bigint: true }).catch(() => undefined);
          if (st && Number(st.mtimeMs) > cutoff) writing.add(st.ino);
        }
        for (const f of files) {
          const file = join(path, f);
          const st = await lstat(file).catch(() => undefined);
          if (!st || st.mtimeMs > cutoff) continue;
          if (f.startsWith(TMP_PREFIX) || (await this.orphanSidecar(dir, file, writing))) {
            await unlinkQuiet(file);
            removed++;
          }
        }
      }
    };
    await visit(this.root);
    return removed;
  }

  private async orphanSidecar(dir: string, file: string, writing: Set<bigint>): Promise<boolean> {
    const ino = /\.(\d+)\.json$/.exec(file)?.[1];
    if (!ino || writing.has(BigInt(ino))) return false;
    let meta: Partial<Sidecar> = {};
    try {
      meta = JSON.parse(await readFile(file, 'utf8')) as Partial<Sidecar>;
    } catch { /* empty or torn: its put never finished */ }
    if (typeof meta.key !== 'string') return true;
    const st = await lstat(join(dir, keyName(meta.key)), { bigint: true }).catch(() => undefined);
    return !st || st.ino !== BigInt(ino);
  }

  private sidecarPath(dir: string, name: string, ino: bigint): string {
    // Hashed so a 255-byte file name still has a legal sidecar name.
    const h = createHash('sha256').update(name).digest('hex').slice(0, 32);
    return join(dir, META_DIR, `${h}.${ino}.json`);
  }

  /** The sidecar of the inode `st`, `undefined` for a file some other tool put there, `raced` if it was replaced meanwhile. */
  private async readSidecar(path: string, key: string, st: BigIntStats): Promise<Sidecar | undefined | 'raced'> {
    try {
      return JSON.parse(await readFile(this.sidecarPath(dirname(path), keyName(key), st.ino), 'utf8')) as Sidecar;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      const now = await lstat(path, { bigint: true }).catch(() => undefined);
      return now && now.ino === st.ino ? undefined : 'raced';
    }
  }

  private async pathOf(key: string): Promise<string> {
    if (key.split('/').includes(META_DIR)) {
      throw new StorageError(ErrorCode.InvalidInput, `invalid key: "${META_DIR}" is reserved by the filesystem backend`, { key });
    }
    const path = join(this.root, key);
    await this.assertInside(dirname(path), key);
    return path;
  }

  /**
   * The folder a put writes into, checked to lie inside the root. An existing folder costs one
   * realpath (the put makes its META_DIR when missing); a new one is created with its META_DIR
   * and then checked.
   */
  private async prepareDir(key: string): Promise<{ dir: string; name: string }> {
    const path = await this.pathOf(key).catch(async (err: NodeJS.ErrnoException) => {
      if (err.code !== 'ENOENT') throw err;
      // A new folder: create it with its META_DIR, then check where it really landed.
      const p = join(this.root, key);
      await this.makeMetaDir(dirname(p), key);
      await this.assertInside(dirname(p), key);
      return p;
    });
    return { dir: dirname(path), name: keyName(key) };
  }

  private async makeMetaDir(dir: string, key: string): Promise<void> {
    try {
      // Each new folder is made durable in its parent. Not covered: a concurrent put that finds
      // the folders already made returns without waiting for this one's fsyncs (a few ms).
      await (this.fsync ? mkdirDurable : mkdirPlain)(join(dir, META_DIR));
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOTDIR' || code === 'EEXIST') throw folderTaken(key, err);
      throw err;
    }
  }

  /**
   * A symlinked folder inside the root must not lead a write or read outside it. A folder found
   * inside is trusted for INSIDE_TTL_MS: like any realpath check this guards against links
   * planted in the tree, not against someone racing the worker, and a link swapped in for a
   * checked folder is caught within that time.
   */
  private async assertInside(dir: string, key: string): Promise<void> {
    const now = Date.now();
    const seen = this.inside.get(dir);
    if (seen !== undefined && now - seen < INSIDE_TTL_MS) return;
    this.realRoot ??= await realpath(this.root).catch(() => this.root);
    const real = await realpath(dir);
    if (real !== this.realRoot && !real.startsWith(this.realRoot + sep)) {
      this.inside.delete(dir);
      throw new StorageError(ErrorCode.PermissionDenied, 'path leads outside the backend root through a symlink', { key });
    }
    if (this.inside.size >= INSIDE_MAX) this.inside.clear();
    this.inside.set(dir, now);
  }
}

export function fsDriverFromUrl(url: URL): FsDriver {
  return new FsDriver({ root: fileURLToPath(url) });
}

function keyName(key: string): string {
  return key.slice(key.lastIndexOf('/') + 1);
}

function toInfo(key: string, st: BigIntStats, meta: Sidecar | undefined): ObjectInfo {
  return {
    key,
    size: Number(st.size),
    // The sidecar belongs to this inode, so its digest stands even if the size changed since
    // (truncation is corruption, and the read must fail rather than pass unverified).
    sha256: meta?.sha256,
    etag: `${st.ino}-${st.mtimeNs}-${st.size}`,
    contentType: meta?.contentType,
    metadata: { ...meta?.metadata },
    modified: new Date(Number(st.mtimeMs)),
  };
}

function folderTaken(key: string, cause: unknown): StorageError {
  return new StorageError(ErrorCode.InvalidInput, 'an object exists where this key needs a folder (the filesystem cannot hold both "a" and "a/b")', { op: 'put', key, cause });
}

function notFound(op: string, key: string): StorageError {
  return new StorageError(ErrorCode.NotFound, 'no such object', { op, key });
}

/** Bytes written between the fdatasync calls that start the disk early (see writeAll). */
const FLUSH_EVERY = 64 * 1024 * 1024;

/** Chunk buffers kept between puts: reusing them spares an allocation, and its page faults, per chunk. */
const spare: Buffer[] = [];
const SPARE_MAX = 12;

/**
 * Three buffers: while one is being written, the next is read and hashed, and the last written
 * one waits for the write before it to finish. A body smaller than a chunk gets buffers its size.
 */
function takeBuffers(size: number | undefined): Buffer[] {
  if (size !== undefined && size < CHUNK) return [0, 1, 2].map(() => Buffer.allocUnsafe(Math.max(1, size)));
  return [0, 1, 2].map(() => spare.pop() ?? Buffer.allocUnsafeSlow(CHUNK));
}

function giveBuffers(bufs: Buffer[]): void {
  for (const b of bufs) if (b.length === CHUNK && spare.length < SPARE_MAX) spare.push(b);
}

/**
 * Pulls the body through three reused buffers and writes each chunk at the handle's position; the
 * handle stays open for the fsync that follows. Reading (and hashing) the next chunk overlaps the
 * write of this one, so the disk and the hash work at once. With `flush`, an fdatasync starts every
 * FLUSH_EVERY bytes: the pages go to disk while we hash, not all at the final fsync (the kernel's
 * own writeback waits for 10% of RAM to be dirty, more than most objects).
 */
async function writeAll(fd: number, body: PutBody, signal: AbortSignal | undefined, flush: boolean): Promise<void> {
  const bufs = takeBuffers(body.size);
  let reading: Promise<number> = Promise.resolve(0);
  let writing: Promise<unknown> = Promise.resolve();
  let flushing: Promise<unknown> = Promise.resolve();
  let unflushed = 0;
  // A failure surfaces at the next await of the promise; until then it must not count as unhandled.
  const track = <T>(p: Promise<T>) => { p.catch(() => {}); return p; };
  try {
    reading = track(body.read(bufs[0]!));
    for (let i = 0; ; i++) {
      const n = await reading;
      if (n === 0) break;
      signal?.throwIfAborted();
      // Buffer i+1 is free: its last write (chunk i-2) finished before chunk i-1's write began.
      reading = track(body.read(bufs[(i + 1) % 3]!));
      await writing;
      writing = track(writeFully(fd, bufs[i % 3]!, n));
      unflushed += n;
      if (flush && unflushed >= FLUSH_EVERY) {
        await writing;
        await flushing;
        flushing = track(fdatasyncFd(fd));
        unflushed = 0;
      }
    }
    await writing;
    await flushing;
  } finally {
    // Never leave a read, write or flush running on a buffer or handle about to be reused or closed.
    await Promise.allSettled([reading, writing, flushing]);
    giveBuffers(bufs);
  }
}

async function mkdirPlain(path: string): Promise<void> {
  await mkdir(path, { recursive: true });
}

async function unlinkQuiet(path: string): Promise<void> {
  await unlink(path).catch(() => {});
}
