import type { BigIntStats } from 'node:fs';
import { link, lstat, mkdir, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { CLAIM_PREFIX, errno, etagOf, META_DIR, nameHash, preconditionFailed } from './layout.js';

/**
 * ifMatch on the filesystem, with link() as the test-and-set (Node has no flock, and a lock file
 * would need stale-lock guessing on every conditional write).
 *
 * The etag names an inode I. A conditional writer (put or delete) claims that version by
 * hard-linking whatever the key holds now to `.stevedore/if-<hash(name)>.<I>`: link() fails with
 * EEXIST when that name exists, also on NFS, so of the writers that target version I at most one
 * holds the claim at a time. The claim links the key's inode at the moment of the link, so its own
 * lstat says what was claimed: unless it is version I, whole etag (inode, mtime, size) equal, the
 * claim is dropped and the write is PreconditionFailed. The holder then commits (rename for a put,
 * unlink for a delete) and drops the claim. A writer that comes later finds either the claim (EEXIST)
 * or, once the holder committed, another inode at the key: PreconditionFailed either way. So of
 * any number of conditional writers holding one etag, exactly one succeeds.
 *
 * Limits, stated: (1) an unconditional put or delete takes no claim (that would cost every put a
 * file), so one that lands between a holder's check and its commit is replaced or recreated by the
 * holder; conditional writers are atomic among themselves and against ifAbsent creators, not
 * against writers that asked for no condition. (2) A writer killed between its claim and its commit
 * (two system calls) leaves the claim; that one version then refuses conditional writes until an
 * unconditional write moves the key on or the sweep removes the claim (judged by the claim's
 * ctime, which link() sets, against the sweep's age). No writer ever breaks another's claim, which
 * is what keeps the protocol exclusive.
 */
export interface Claim {
  /** The claimed version's stat (the object being replaced or deleted). */
  readonly st: BigIntStats;
  release(): Promise<void>;
}

/** The inode an etag names, or undefined for one this backend never issued. */
export function etagIno(etag: string): bigint | undefined {
  const m = /^(\d+)-\d+-\d+$/.exec(etag);
  return m ? BigInt(m[1]!) : undefined;
}

export function claimPath(dir: string, name: string, ino: bigint): string {
  return join(dir, META_DIR, `${CLAIM_PREFIX}${nameHash(name)}.${ino}`);
}

/**
 * Claims version `etag` of the object `name` in `dir`. Undefined when the key holds no object
 * (the caller decides: PreconditionFailed for a put, success for a delete); PreconditionFailed
 * when it holds another version or another conditional writer holds the claim.
 */
export async function claim(op: string, key: string, dir: string, name: string, etag: string): Promise<Claim | undefined> {
  const path = join(dir, name);
  const ino = etagIno(etag);
  if (ino === undefined) {
    const st = await lstat(path, { bigint: true }).catch(() => undefined);
    if (!st || !st.isFile()) return undefined;
    throw preconditionFailed(op, key, `object changed (etag ${etagOf(st)}, expected ${etag})`);
  }
  const at = claimPath(dir, name, ino);
  for (let attempt = 0; ; attempt++) {
    try {
      await link(path, at);
      break;
    } catch (err) {
      const code = errno(err);
      if (code === 'EEXIST') throw preconditionFailed(op, key, 'another conditional write or delete of this version is under way');
      if (code !== 'ENOENT' && code !== 'EPERM' && code !== 'EISDIR' && code !== 'ENOTDIR') throw err;
      // Nothing at the key, or a folder (decision 1 treats it as no object).
      const st = await lstat(path, { bigint: true }).catch(() => undefined);
      if (!st || !st.isFile()) return undefined;
      // A file another tool put in a folder that has no META_DIR yet.
      if (code === 'ENOENT' && attempt === 0) {
        await mkdir(join(dir, META_DIR), { recursive: true });
        continue;
      }
      throw preconditionFailed(op, key, `object changed (etag ${etagOf(st)}, expected ${etag})`);
    }
  }
  const release = () => unlink(at).catch(() => {});
  try {
    const st = await lstat(at, { bigint: true });
    if (!st.isFile() || etagOf(st) !== etag) throw preconditionFailed(op, key, `object changed (etag ${etagOf(st)}, expected ${etag})`);
    return { st, release };
  } catch (err) {
    await release();
    throw err;
  }
}
