import type { BigIntStats, Dirent } from 'node:fs';
import { lstat, readdir, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { CLAIM_PREFIX, errno, keyName, META_DIR, nameHash, sidecarIno, sidecarPath, TMP_PREFIX, unlinkQuiet } from './layout.js';
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
  let unsure = false;
  await Promise.all(files.map(async (f) => {
    const st = await lstat(join(meta, f), { bigint: true }).catch((err: unknown) => {
      if (!gone(err)) unsure = true;
      return undefined;
    });
    if (st) stats.set(f, st);
  }));
  // A temp file that could not be looked at may be a live put's: nothing here is judged this time.
  if (unsure) return 0;
  const old = (f: string) => { const st = stats.get(f); return st !== undefined && Number(st.mtimeMs) <= cutoff; };
  // A sidecar is created when its put starts; while its temp file exists the put may still commit
  // (a put stalled past the age too), so a temp file's sidecar is judged only after the sweep has
  // removed the temp file itself: that unlink and the put's rename (or link) are the arbiter, only
  // one of them finds the name. The put that loses fails Transient; a sweep that loses (the put
  // committed) leaves the sidecar, now the object's own.
  const tmpInos = new Set<bigint>();
  for (const f of files) if (f.startsWith(TMP_PREFIX) && stats.has(f)) tmpInos.add(stats.get(f)!.ino);
  const cache = new FolderCache();
  let removed = 0;
  const remove = async (f: string) => { await unlinkQuiet(join(meta, f)); removed++; };
  const judge = async (f: string, ino: bigint) => {
    // Unless rewritten meanwhile: a new put's temp file that got this inode number made it its own.
    if (await unusable(dir, f, ino, cache) && (await unchanged(join(meta, f), stats.get(f)!))) await remove(f);
  };
  try {
    for (const f of files) {
      const ino = sidecarIno(f);
      if (ino === undefined || !old(f) || tmpInos.has(ino)) continue;
      await judge(f, ino);
    }
    for (const f of files) {
      const st = stats.get(f);
      // A claim is a hard link to the version it claims, whose mtime is old: its age is its ctime.
      if (f.startsWith(CLAIM_PREFIX) && st && Number(st.ctimeMs) <= cutoff) await remove(f);
      else if (f.startsWith(TMP_PREFIX) && st && old(f)) {
        const won = await unlink(join(meta, f)).then(() => true, () => false);
        if (!won) continue;
        removed++;
        // Its put can no longer commit (its rename finds no temp file): its sidecar is judged as any.
        for (const s of files) if (sidecarIno(s) === st.ino && old(s)) await judge(s, st.ino);
      }
    }
  } catch (err) {
    // An object or sidecar that could not be looked at (EIO, ESTALE, EACCES) is not gone: the
    // folder is left as it is for the next sweep, never judged on a failed lookup.
    if (errno(err) === undefined) throw err;
  }
  return removed;
}

function gone(err: unknown): boolean {
  return errno(err) === 'ENOENT' || errno(err) === 'ENOTDIR';
}

async function unusable(dir: string, file: string, ino: bigint, cache: FolderCache): Promise<boolean> {
  // Empty or torn (its put never finished), or edited: no digest can come from it.
  const meta = await readParsed(join(dir, META_DIR, file));
  if (!meta || nameHash(keyName(meta.key)) !== file.slice(0, 32)) return true;
  const name = keyName(meta.key);
  const path = join(dir, name);
  // Only ENOENT and ENOTDIR mean the object is gone; any other failure propagates (sweepFolder
  // then leaves the folder alone): an EIO here must never cost a live object its only digest.
  const st = await lstat(path, { bigint: true }).catch((err: unknown) => {
    if (gone(err)) return undefined;
    throw err;
  });
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
