import type { BigIntStats, Dirent } from 'node:fs';
import { lstat, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { CLAIM_PREFIX, keyName, META_DIR, nameHash, sidecarIno, sidecarPath, TMP_PREFIX, unlinkQuiet } from './layout.js';
import { findSidecar, FolderCache, matches, readParsed } from './sidecar.js';

/**
 * Removes what killed writers left: temp files older than `maxAgeMs`, ifMatch claims as old, and
 * sidecars no object can use. Never the sidecar that is an object's only digest: an object without
 * a sidecar of its own inode (a copied tree) first adopts the one of its name that matches (see
 * sidecar.ts); a sidecar is removed only when its object is gone, has its own sidecar, or cannot
 * match it. Returns how many files it removed.
 */
export async function sweepTree(root: string, maxAgeMs: number): Promise<number> {
  let removed = 0;
  const cutoff = Date.now() - maxAgeMs;
  const visit = async (dir: string): Promise<void> => {
    const entries = await readdir(dir, { withFileTypes: true }).catch(() => [] as Dirent[]);
    for (const e of entries) {
      if (!e.isDirectory()) continue;
      const path = join(dir, e.name);
      if (e.name === META_DIR) removed += await sweepFolder(dir, cutoff);
      else await visit(path);
    }
  };
  await visit(root);
  return removed;
}

async function sweepFolder(dir: string, cutoff: number): Promise<number> {
  const meta = join(dir, META_DIR);
  const files = await readdir(meta).catch(() => [] as string[]);
  const stats = new Map<string, BigIntStats>();
  await Promise.all(files.map(async (f) => {
    const st = await lstat(join(meta, f), { bigint: true }).catch(() => undefined);
    if (st) stats.set(f, st);
  }));
  const old = (f: string) => { const st = stats.get(f); return st !== undefined && Number(st.mtimeMs) <= cutoff; };
  // A sidecar is created when its put starts, so one of a live temp file belongs to a put still
  // streaming (its temp file's mtime moves as it writes; the sidecar's does not).
  const writing = new Set<bigint>();
  for (const f of files) if (f.startsWith(TMP_PREFIX) && !old(f) && stats.has(f)) writing.add(stats.get(f)!.ino);
  const cache = new FolderCache();
  let removed = 0;
  const remove = async (f: string) => { await unlinkQuiet(join(meta, f)); removed++; };
  // Sidecars before temp files: a put's sidecar never outlives its temp file, which is how readers
  // tell a put under way from a copied sidecar.
  for (const f of files) {
    const ino = sidecarIno(f);
    if (ino === undefined || !old(f) || writing.has(ino)) continue;
    // Unless rewritten meanwhile: a new put's temp file that got this inode number made it its own.
    if (await unusable(dir, f, ino, cache) && (await unchanged(join(meta, f), stats.get(f)!))) await remove(f);
  }
  for (const f of files) {
    const st = stats.get(f);
    // A claim is a hard link to the version it claims, whose mtime is old: its age is its ctime.
    if (f.startsWith(CLAIM_PREFIX) && st && Number(st.ctimeMs) <= cutoff) await remove(f);
    else if (f.startsWith(TMP_PREFIX) && old(f)) await remove(f);
  }
  return removed;
}

async function unusable(dir: string, file: string, ino: bigint, cache: FolderCache): Promise<boolean> {
  // Empty or torn (its put never finished), or edited: no digest can come from it.
  const meta = await readParsed(join(dir, META_DIR, file));
  if (!meta || nameHash(keyName(meta.key)) !== file.slice(0, 32)) return true;
  const name = keyName(meta.key);
  const path = join(dir, name);
  const st = await lstat(path, { bigint: true }).catch(() => undefined);
  if (!st || !st.isFile()) return true;
  if (st.ino === ino) return false;
  // Gives the object its own sidecar if one of its name matches (a copied tree), then judges.
  await findSidecar(path, name, st, cache);
  if (await lstat(sidecarPath(dir, name, st.ino)).then(() => true, () => false)) return true;
  // Still none of its own (candidates that disagree, or a read-only tree): keep any that could be its digest.
  return (await cache.folder(dir)).busy.has(ino) || !matches(meta, name, st);
}

async function unchanged(path: string, before: BigIntStats): Promise<boolean> {
  const now = await lstat(path, { bigint: true }).catch(() => undefined);
  return now !== undefined && now.ino === before.ino && now.mtimeNs === before.mtimeNs;
}
