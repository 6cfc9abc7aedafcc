import type { BigIntStats } from 'node:fs';
import { link, readdir, unlink } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { lstatPath, readTextPath as readText } from '../../storage/fd.js';
import { errno, keyName, META_DIR, nameHash, sidecarIno, sidecarPath, TMP_PREFIX, type Sidecar } from './layout.js';

/**
 * How an object finds its metadata.
 *
 * Fast path: the sidecar named after the object's inode. The temp file's inode names it before the
 * rename that commits the object, so a reader holding inode I reads I's own sidecar, never another
 * version's, however writers race; a missing one while the key now holds another inode is 'raced'
 * (the caller reads again).
 *
 * Fallback, when the object's own inode has no sidecar: a copied tree (cp -a, rsync -a, tar, a
 * restore) keeps names, sizes and sometimes mtimes, never inode numbers, so its sidecars carry the
 * source's inodes. The sidecars of the same name in the folder are candidates; one whose recorded
 * name and size match the object's is the object's digest, preferring those whose recorded mtime
 * matches to the nanosecond (cp -a, rsync -a), then to the second (tar), and used only when the
 * best such group agrees on one digest. Candidates that cannot be this version are left out: a
 * sidecar whose inode is that of a temp file (a put still under way), and, since the key is
 * checked to still hold inode I after the choice, any a racing writer committed meanwhile. The
 * chosen sidecar is then hard-linked under I's name (adopted), so later reads take the fast path
 * and the sweep keeps it. A read-only tree serves the digest without adopting.
 *
 * What a wrong choice costs: a sidecar that matches by name and size but not by bytes (bit rot, a
 * foreign tool's overwrite of the same size) makes a full read fail ChecksumMismatch, as rot
 * should. The one race not excluded: a put's sidecar becomes complete only after its bytes are
 * written, a few milliseconds before its rename; a reader whose readdir missed that put's temp file
 * (entries created during a readdir of a large folder may be skipped) and that finds no other
 * candidate could adopt it for an object that had no digest of its own (another tool's file of the
 * very same size).
 */
export type Lookup = Sidecar | undefined | 'raced';

/** One readdir of each META_DIR, shared by the lookups of one listing so it stays O(n). */
export class FolderCache {
  private readonly entries = new Map<string, Promise<Folder>>();

  folder(dir: string): Promise<Folder> {
    let f = this.entries.get(dir);
    if (!f) {
      f = readFolder(dir);
      this.entries.set(dir, f);
    }
    return f;
  }
}

interface Folder {
  /** Sidecar file names by name hash. */
  sidecars: Map<string, string[]>;
  /** Inodes of temp files: puts under way. */
  busy: Set<bigint>;
}

async function readFolder(dir: string): Promise<Folder> {
  const meta = join(dir, META_DIR);
  const files = await readdir(meta).catch((err: unknown) => {
    if (errno(err) === 'ENOENT' || errno(err) === 'ENOTDIR') return [] as string[];
    throw err;
  });
  const sidecars = new Map<string, string[]>();
  const tmps: string[] = [];
  for (const f of files) {
    if (f.startsWith(TMP_PREFIX)) tmps.push(f);
    else if (sidecarIno(f) !== undefined) {
      const h = f.slice(0, 32);
      const list = sidecars.get(h);
      if (list) list.push(f);
      else sidecars.set(h, [f]);
    }
  }
  const busy = new Set<bigint>();
  await Promise.all(tmps.map(async (t) => {
    const st = await lstatPath(join(meta, t)).catch(() => undefined);
    if (st) busy.add(st.ino);
  }));
  return { sidecars, busy };
}

/** A sidecar's JSON, or undefined when it is not one a digest can be taken from (empty, torn, edited). */
export function parseSidecar(text: string): Sidecar | undefined {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (typeof v !== 'object' || v === null) return undefined;
  const s = v as Partial<Sidecar>;
  if (typeof s.key !== 'string' || typeof s.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(s.sha256)) return undefined;
  if (typeof s.size !== 'number' || !Number.isSafeInteger(s.size) || s.size < 0) return undefined;
  if (s.contentType !== undefined && typeof s.contentType !== 'string') return undefined;
  if (typeof s.metadata !== 'object' || s.metadata === null || Array.isArray(s.metadata)) return undefined;
  for (const val of Object.values(s.metadata)) if (typeof val !== 'string') return undefined;
  if (s.mtimeNs !== undefined && (typeof s.mtimeNs !== 'string' || !/^\d+$/.test(s.mtimeNs))) return undefined;
  return s as Sidecar;
}

/** Reads and parses a sidecar file; undefined when it is gone or unusable. */
export async function readParsed(path: string): Promise<Sidecar | undefined> {
  try {
    return parseSidecar(await readText(path));
  } catch (err) {
    if (errno(err) === 'ENOENT') return undefined;
    throw err;
  }
}

/**
 * The metadata of the object at `path` (file name `name`) whose inode is `st`: its sidecar,
 * undefined when it has no usable one (another tool's file; metadata lost, unreadable or corrupt:
 * decision 12), 'raced' when the key was replaced meanwhile.
 */
export async function findSidecar(path: string, name: string, st: BigIntStats, cache?: FolderCache): Promise<Lookup> {
  const dir = dirname(path);
  let text: string;
  try {
    text = await readText(sidecarPath(dir, name, st.ino));
  } catch (err) {
    if (errno(err) !== 'ENOENT') throw err;
    if (!(await stillAt(path, st))) return 'raced';
    return adopt(path, name, st, cache);
  }
  const meta = parseSidecar(text);
  if (!meta || matches(meta, name, st)) return meta;
  // Another version's: a restore onto the same filesystem can give the object an inode number
  // whose sidecar (copied along, or left by an earlier holder) records another size. A copied
  // sidecar of the name that matches wins and is adopted in its place. Without one it stays: it is
  // also what a truncated object finds (same inode, new size), whose full read must fail
  // ChecksumMismatch, never pass unverified.
  const found = await adopt(path, name, st, cache, true);
  return found === undefined ? meta : found;
}

async function stillAt(path: string, st: BigIntStats): Promise<boolean> {
  const now = await lstatPath(path).catch(() => undefined);
  return now !== undefined && now.ino === st.ino;
}

/**
 * The fallback (see the top of this file): a sidecar of the same name that matches, adopted.
 * `replace`: the object's inode already has a sidecar, another version's, which the adopted one replaces.
 */
export async function adopt(path: string, name: string, st: BigIntStats, cache?: FolderCache, replace = false): Promise<Lookup> {
  const dir = dirname(path);
  const folder = await (cache ?? new FolderCache()).folder(dir);
  const files = folder.sidecars.get(nameHash(name)) ?? [];
  const candidates: Candidate[] = [];
  for (const file of files) {
    const ino = sidecarIno(file)!;
    if (ino === st.ino || folder.busy.has(ino)) continue;
    const meta = await readParsed(join(dir, META_DIR, file));
    if (meta && matches(meta, name, st)) candidates.push({ file, meta });
  }
  if (candidates.length === 0) return undefined;
  const chosen = choose(candidates, st.mtimeNs);
  // After the choice, so that a writer who committed meanwhile (whose sidecar may be among the
  // candidates, or make them disagree) sends the reader back to read the new object.
  if (!(await stillAt(path, st))) return 'raced';
  if (!chosen) return undefined;
  const own = sidecarPath(dir, name, st.ino);
  try {
    // Unlinked, not overwritten: it may be a hard link shared with a sidecar another object adopted.
    if (replace) await unlink(own).catch((err: unknown) => { if (errno(err) !== 'ENOENT') throw err; });
    await link(join(dir, META_DIR, chosen.file), own);
  } catch (err) {
    // Another reader adopted first (read what it linked), or a read-only copy: serve without adopting.
    if (errno(err) === 'EEXIST') return (await readParsed(own)) ?? chosen.meta;
  }
  return chosen.meta;
}

interface Candidate {
  file: string;
  meta: Sidecar;
}

/** Whether sidecar `meta` can describe the object `name` whose inode is `st`: same name, same size. */
export function matches(meta: Sidecar, name: string, st: BigIntStats): boolean {
  return keyName(meta.key) === name && BigInt(meta.size) === st.size;
}

/**
 * The candidate to trust: among those whose recorded mtime equals the object's to the nanosecond,
 * else (for an mtime a copy cut to whole seconds) to the second, else all, the one digest they
 * agree on; none when they disagree.
 */
export function choose<C extends { meta: Sidecar }>(candidates: C[], mtimeNs: bigint): C | undefined {
  const sec = mtimeNs / 1_000_000_000n;
  const recorded = (c: C) => (c.meta.mtimeNs === undefined ? undefined : BigInt(c.meta.mtimeNs));
  const exact = candidates.filter((c) => recorded(c) === mtimeNs);
  // Only an mtime cut to the second (tar) is evidence at the second; an mtime the copy set anew
  // (cp -r) has nanoseconds, and shares its second with puts racing right now.
  const cut = mtimeNs % 1_000_000_000n === 0n;
  const second = !cut ? [] : candidates.filter((c) => { const r = recorded(c); return r !== undefined && r / 1_000_000_000n === sec; });
  const tier = exact.length ? exact : second.length ? second : candidates;
  if (tier.length === 0 || new Set(tier.map((c) => c.meta.sha256)).size !== 1) return undefined;
  return tier[0];
}
