import { createHash } from 'node:crypto';
import fs, { type BigIntStats } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ErrorCode, StorageError } from '../../errors.js';
// Decision 4's content type, the Bucket's own (a value, no cycle: bucket.ts imports no backend).
import { DEFAULT_CONTENT_TYPE } from '../../storage/bucket.js';
import type { ObjectInfo } from '../../storage/driver.js';

/**
 * Folder, in every directory that holds objects, for temp files, metadata sidecars and ifMatch
 * claims. A key with a segment of this name is refused, so nothing a user stores can collide with it.
 */
export const META_DIR = '.stevedore';
export const TMP_PREFIX = 'tmp-';
/** `if-<hash(name)>.<inode>`: a conditional put or delete is replacing that version (see claim.ts). */
export const CLAIM_PREFIX = 'if-';

/**
 * The sidecar, `<hash(name)>.<inode>.json`: the metadata of one version of one object. `mtimeNs`
 * is the object's own mtime when it was written (absent in sidecars older than it); a copy that
 * keeps mtimes (cp -a, rsync -a, tar to the second) lets it pick the right sidecar among several.
 */
export interface Sidecar {
  key: string;
  sha256: string;
  size: number;
  contentType?: string | undefined;
  metadata: Record<string, string>;
  mtimeNs?: string | undefined;
}

export function keyName(key: string): string {
  return key.slice(key.lastIndexOf('/') + 1);
}

/** Hashed so a 255-byte file name still has a legal sidecar name. */
export function nameHash(name: string): string {
  return createHash('sha256').update(name).digest('hex').slice(0, 32);
}

export function sidecarPath(dir: string, name: string, ino: bigint): string {
  return join(dir, META_DIR, `${nameHash(name)}.${ino}.json`);
}

/** The inode a sidecar's file name records, or undefined for a name that is not a sidecar's. */
export function sidecarIno(file: string): bigint | undefined {
  const m = /^[0-9a-f]{32}\.(\d+)\.json$/.exec(file);
  return m ? BigInt(m[1]!) : undefined;
}

export function etagOf(st: BigIntStats): string {
  return `${st.ino}-${st.mtimeNs}-${st.size}`;
}

export function toInfo(key: string, st: BigIntStats, meta: Sidecar | undefined): ObjectInfo {
  return {
    key,
    size: Number(st.size),
    // The sidecar belongs to this inode (or was matched to it by name and size), so its digest
    // stands even if the size changed since (truncation is corruption, and the read must fail
    // rather than pass unverified).
    sha256: meta?.sha256,
    etag: etagOf(st),
    contentType: meta?.contentType ?? DEFAULT_CONTENT_TYPE,
    metadata: { ...meta?.metadata },
    modified: new Date(Number(st.mtimeMs)),
  };
}

export function folderTaken(key: string, cause: unknown): StorageError {
  return new StorageError(ErrorCode.InvalidInput, 'an object exists where this key needs a folder (the filesystem cannot hold both "a" and "a/b")', { op: 'put', key, cause });
}

export function notFound(op: string, key: string): StorageError {
  return new StorageError(ErrorCode.NotFound, 'no such object', { op, key });
}

export function preconditionFailed(op: string, key: string, why: string): StorageError {
  return new StorageError(ErrorCode.PreconditionFailed, why, { op, key });
}

export function errno(err: unknown): string | undefined {
  return (err as NodeJS.ErrnoException | undefined)?.code;
}

/**
 * link and unlink on the callback API, as src/storage/fd.ts does for descriptors: fs/promises costs
 * about twice the main-thread CPU per call, and every put links or renames and unlinks.
 */
export const linkPath = promisify(fs.link);
export const unlinkPath = promisify(fs.unlink);

export async function unlinkQuiet(path: string): Promise<void> {
  await unlinkPath(path).catch(() => {});
}
