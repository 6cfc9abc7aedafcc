import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { ErrorCode, StorageError } from '../errors.js';
import type { Bucket, GetResult } from '../storage/bucket.js';
import { readArchive, type ArchiveEntry } from './archive.js';
import { parseSessionId, sessionKey, validateOpPath } from './ids.js';
import { readEntryData } from './seek-entry.js';
import type { IndexEntry } from './seek-format.js';
import { ArchiveReplaced, openSeekable, type SeekView } from './seek-read.js';

/**
 * File-level reads of a session archive, without a job: the CLI's `session ls` and `session cat`,
 * and the HTTP routes on top of them. A seekable archive (seek-format.ts) is read by ranges: `ls`
 * reads its index, `cat` the index and the segments holding the file, each segment checked
 * against the index's digest. An archive without an index, and `ls` with per-file digests, read
 * the whole stored archive once and trust nothing before its recorded digest was checked at the end.
 */

export type SessionEntryType = 'file' | 'directory' | 'symlink' | 'link';

export interface SessionEntryInfo {
  path: string;
  type: SessionEntryType;
  /** Data bytes (files only; 0 otherwise). */
  size: number;
  mode: number;
  /** ISO 8601. */
  mtime: string;
  /** A symlink's target, or a hard link's target path. */
  linkname?: string;
  /** Regular files, when digests are asked for: the value an op's `ifSha256` compares with. */
  sha256?: string;
}

export interface SessionListing {
  key: string;
  /** The archive's size, digest and time as stored. */
  size: number;
  sha256: string | undefined;
  modified: string;
  /** False when the archive has no recorded digest (written by another tool): read unverified. */
  verified: boolean;
  /** One per path, in archive order; an archive holding a path twice lists the later entry (as extraction keeps it). */
  entries: SessionEntryInfo[];
}

export interface ReadOptions {
  signal?: AbortSignal | undefined;
}

/** Lists a session's entries; with `digests`, the sha256 of each regular file. NotFound when there is no such session. */
export async function listSession(bucket: Bucket, session: string, opts: ReadOptions & { digests?: boolean } = {}): Promise<SessionListing> {
  parseSessionId(session);
  const key = sessionKey(session);
  if (!opts.digests) {
    const view = await seekable(bucket, key, opts.signal);
    if (view) {
      return {
        key, size: view.info.size, sha256: view.info.sha256, modified: view.info.modified.toISOString(), verified: view.info.sha256 !== undefined,
        entries: [...latest(view).values()].map(indexInfo),
      };
    }
  }
  const got = await openSession(bucket, key, opts.signal);
  const byPath = new Map<string, SessionEntryInfo>();
  await readArchive(got.stream, async (e) => {
    const info = entryInfo(e);
    if (opts.digests && info.type === 'file') {
      const h = createHash('sha256');
      for await (const chunk of e.data) h.update(chunk);
      info.sha256 = h.digest('hex');
    }
    byPath.delete(e.path);
    byPath.set(e.path, info);
  }, { signal: opts.signal });
  return {
    key, size: got.info.size, sha256: got.info.sha256, modified: got.info.modified.toISOString(), verified: got.info.sha256 !== undefined,
    entries: [...byPath.values()],
  };
}

/** Link hops `cat` follows inside the archive before giving up. */
const MAX_HOPS = 8;

export interface CatResult {
  /** The path whose bytes were written (the target, after links). */
  path: string;
  size: number;
  sha256: string;
  /** As in the listing: false for an archive without a recorded digest. */
  verified: boolean;
}

/** One file of a session, verified and spooled to a local temp file: read it, then `close`. */
export interface SessionFile extends CatResult {
  /** The spooled bytes (whole, verified), for reads of any range. */
  spool: string;
  /** Removes the spool. */
  close(): Promise<void>;
}

/**
 * Writes one regular file's bytes to `out` (not ended), only once the whole archive has passed its
 * digest check: the file is spooled to a temp file while the archive streams. Symlinks and hard
 * links inside the archive are followed. NotFound when the session or the path is missing;
 * InvalidInput for a directory, a link leading out of the archive, or a corrupt archive;
 * ChecksumMismatch when the stored archive fails its digest.
 */
export async function catSession(bucket: Bucket, session: string, path: string, out: Writable, opts: ReadOptions = {}): Promise<CatResult> {
  const file = await openSessionFile(bucket, session, path, opts);
  try {
    await copyTo(file.spool, out);
    return { path: file.path, size: file.size, sha256: file.sha256, verified: file.verified };
  } finally {
    await file.close();
  }
}

/**
 * As catSession, but hands back the verified spool instead of copying it, so a caller knows the
 * file's size and digest before its first byte goes out (HTTP headers) and can serve ranges.
 */
export async function openSessionFile(bucket: Bucket, session: string, path: string, opts: ReadOptions = {}): Promise<SessionFile> {
  parseSessionId(session);
  validateOpPath(path);
  const key = sessionKey(session);
  const dir = await mkdtemp(join(tmpdir(), 'stevedore-cat-'));
  const close = () => rm(dir, { recursive: true, force: true });
  try {
    for (let tries = 1; ; tries++) {
      try {
        const view = await seekable(bucket, key, opts.signal);
        if (!view) break;
        // Read by the index: the file's verified bytes, spooled whole before anyone sees them.
        const spooled = join(dir, 'indexed');
        const ws = createWriteStream(spooled);
        try {
          const found = await catIndexed(bucket, view, path, join(dir, 'spool'), ws, opts.signal);
          await new Promise<void>((resolve, reject) => { ws.once('error', reject); ws.end(() => resolve()); });
          return { ...found, spool: spooled, close };
        } finally {
          ws.destroy();
        }
      } catch (err) {
        if (!(err instanceof ArchiveReplaced) || tries >= READ_TRIES) throw err instanceof ArchiveReplaced ? replaced(key) : err;
      }
    }
    let want = path;
    for (let hop = 0; hop <= MAX_HOPS; hop++) {
      const got = await openSession(bucket, key, opts.signal);
      const spool = join(dir, String(hop));
      let found: { kind: 'file'; size: number; sha256: string } | { kind: 'link'; to: string } | { kind: 'directory' } | undefined;
      await readArchive(got.stream, async (e) => {
        if (e.path !== want) return;
        const t = e.header.type;
        if (t === 'file' || t === 'contiguous-file') {
          const h = createHash('sha256');
          let size = 0;
          await pipeline(e.data, async function* (src: AsyncIterable<Buffer>) {
            for await (const chunk of src) {
              h.update(chunk);
              size += chunk.length;
              yield chunk;
            }
          }, createWriteStream(spool));
          found = { kind: 'file', size, sha256: h.digest('hex') };
        } else if (t === 'directory') {
          found = { kind: 'directory' };
        } else {
          const target = t === 'link' ? normalise(e.header.linkname ?? '') : resolveSymlink(want, e.header.linkname ?? '');
          if (target === undefined) throw new StorageError(ErrorCode.InvalidInput, `"${want}" is a symlink leading out of the session`, { op: 'cat', key });
          found = { kind: 'link', to: target };
        }
      }, { signal: opts.signal });
      // The archive passed its digest check: only now may its bytes be believed.
      if (found === undefined) throw new StorageError(ErrorCode.NotFound, `no file "${want}" in the session`, { op: 'cat', key });
      const f = found as NonNullable<typeof found>;
      if (f.kind === 'directory') throw new StorageError(ErrorCode.InvalidInput, `"${want}" is a directory`, { op: 'cat', key });
      if (f.kind === 'link') {
        want = f.to;
        continue;
      }
      return { path: want, size: f.size, sha256: f.sha256, verified: got.info.sha256 !== undefined, spool, close };
    }
    throw new StorageError(ErrorCode.InvalidInput, `"${path}": more than ${MAX_HOPS} links to follow`, { op: 'cat', key });
  } catch (err) {
    await close();
    throw err;
  }
}

/** Reads of one request that find the archive replaced between their ranges before giving up. */
const READ_TRIES = 3;
const replaced = (key: string): StorageError => new StorageError(ErrorCode.Transient, `the archive kept changing while it was read (${READ_TRIES} tries)`, { op: 'session', key });

/** The index of a seekable archive, undefined for one without; NotFound as 'no such session'. */
async function seekable(bucket: Bucket, key: string, signal: AbortSignal | undefined): Promise<SeekView | undefined> {
  for (let tries = 1; ; tries++) {
    try {
      return await openSeekable(bucket, key, signal);
    } catch (err) {
      if (err instanceof StorageError && err.code === ErrorCode.NotFound) throw new StorageError(ErrorCode.NotFound, 'no such session', { op: 'session', key, cause: err });
      if (!(err instanceof ArchiveReplaced)) throw err;
      if (tries >= READ_TRIES) throw replaced(key);
    }
  }
}

/** One entry per path, the later of a duplicated path winning (as extraction keeps it), in archive order. */
function latest(view: SeekView): Map<string, IndexEntry> {
  const byPath = new Map<string, IndexEntry>();
  for (const e of view.index.entries) {
    if (e.path === '') continue;
    byPath.delete(e.path);
    byPath.set(e.path, e);
  }
  return byPath;
}

function indexInfo(e: IndexEntry): SessionEntryInfo {
  const type: SessionEntryType = e.type === 'contiguous-file' ? 'file' : e.type;
  return {
    path: e.path, type, size: type === 'file' ? e.size : 0, mode: e.mode, mtime: new Date(e.mtime).toISOString(),
    ...(e.linkname !== undefined && (type === 'symlink' || type === 'link') ? { linkname: e.linkname } : {}),
  };
}

/** Files up to this size are gathered in memory; larger ones are spooled, so nothing is written before the last segment verified. */
const IN_MEMORY = 8 << 20;

/** `cat` from the index: links followed in it, the file's segments read and checked. */
async function catIndexed(bucket: Bucket, view: SeekView, path: string, spool: string, out: Writable, signal: AbortSignal | undefined): Promise<CatResult> {
  const byPath = latest(view);
  let want = path;
  for (let hop = 0; hop <= MAX_HOPS; hop++) {
    const e = byPath.get(want);
    if (e === undefined) throw new StorageError(ErrorCode.NotFound, `no file "${want}" in the session`, { op: 'cat', key: view.key });
    if (e.type === 'directory') throw new StorageError(ErrorCode.InvalidInput, `"${want}" is a directory`, { op: 'cat', key: view.key });
    if (e.type === 'link' || e.type === 'symlink') {
      const to = e.type === 'link' ? normalise(e.linkname ?? '') : resolveSymlink(want, e.linkname ?? '');
      if (to === undefined) throw new StorageError(ErrorCode.InvalidInput, `"${want}" is a symlink leading out of the session`, { op: 'cat', key: view.key });
      want = to;
      continue;
    }
    const h = createHash('sha256');
    const parts: Buffer[] = [];
    const file = e.size > IN_MEMORY ? createWriteStream(spool) : undefined;
    try {
      await readEntryData(bucket, view, e, signal, async (data) => {
        h.update(data);
        if (!file) parts.push(data);
        else if (!file.write(data)) await new Promise<void>((resolve) => file.once('drain', () => resolve()));
      });
    } finally {
      if (file) await new Promise<void>((resolve) => file.end(() => resolve()));
    }
    if (file) await copyTo(spool, out);
    else for (const p of parts) await copyBuffer(p, out);
    return { path: want, size: e.size, sha256: h.digest('hex'), verified: view.info.sha256 !== undefined };
  }
  throw new StorageError(ErrorCode.InvalidInput, `"${path}": more than ${MAX_HOPS} links to follow`, { op: 'cat', key: view.key });
}

async function openSession(bucket: Bucket, key: string, signal: AbortSignal | undefined): Promise<GetResult> {
  return bucket.get(key, { signal }).catch((err: unknown) => {
    if (err instanceof StorageError && err.code === ErrorCode.NotFound) throw new StorageError(ErrorCode.NotFound, 'no such session', { op: 'session', key, cause: err });
    throw err;
  });
}

function entryInfo(e: ArchiveEntry): SessionEntryInfo {
  const h = e.header;
  const type: SessionEntryType = h.type === 'contiguous-file' ? 'file' : h.type;
  return {
    path: e.path, type, size: type === 'file' ? h.size : 0, mode: h.mode, mtime: h.mtime.toISOString(),
    ...(h.linkname !== undefined && (type === 'symlink' || type === 'link') ? { linkname: h.linkname } : {}),
  };
}

const normalise = (p: string): string => p.split('/').filter((s) => s !== '' && s !== '.').join('/');

/** A symlink's target as a path in the archive, or undefined when it leads out of it. */
function resolveSymlink(link: string, target: string): string | undefined {
  if (target.startsWith('/')) return undefined;
  const at = link.split('/').slice(0, -1);
  for (const seg of target.split('/')) {
    if (seg === '' || seg === '.') continue;
    if (seg === '..') {
      if (at.length === 0) return undefined;
      at.pop();
    } else {
      at.push(seg);
    }
  }
  return at.join('/');
}

/** Copies a file to a writable that is not ended (stdout, a response), with back-pressure. */
async function copyTo(file: string, out: Writable): Promise<void> {
  for await (const chunk of createReadStream(file)) await copyBuffer(chunk as Buffer, out);
}

async function copyBuffer(chunk: Buffer, out: Writable): Promise<void> {
  if (out.write(chunk)) return;
  await new Promise<void>((resolve, reject) => {
    const onDrain = (): void => { out.off('error', onError); resolve(); };
    const onError = (err: Error): void => { out.off('drain', onDrain); reject(err); };
    out.once('drain', onDrain).once('error', onError);
  });
}
