import { constants } from 'node:fs';
import { link } from 'node:fs/promises';
import { readThrough, type OpenFile } from '../../storage/body.js';
import type { PutBody } from '../../storage/driver.js';
import { closeFd, fdatasyncFd, fstatFd, futimesFd, openFd } from '../../storage/fd.js';
import { unlinkQuiet } from './layout.js';

// A put that takes its source file's inode instead of copying its bytes (DriverPutOptions.consumable).

/**
 * Hard-links a file its producer gave up to the put's temp name and opens it there, so the put
 * goes on exactly as if it had written that temp file itself (sidecar named by its inode, fsync,
 * commit by rename or link). Undefined, with nothing left behind, when the inode cannot be taken
 * and the put must copy as before: another filesystem (EXDEV), a file this process may not link or
 * touch (EPERM, protected_hardlinks, another owner), any other link failure, a name replaced since
 * the Bucket opened it (another inode than the one the body reads), or an inode with another name
 * than the staged one already (a redelivered job whose first run committed it, a producer that kept
 * a link): an object must never share its inode, and so its sidecar, with another object.
 */
export async function adoptFile(src: OpenFile, tmp: string): Promise<number | undefined> {
  try {
    await link(src.path, tmp);
  } catch {
    return undefined;
  }
  let fd: number | undefined;
  try {
    fd = await openFd(tmp, constants.O_RDONLY | constants.O_NOFOLLOW);
    const [st, source] = await Promise.all([fstatFd(fd), src.file.stat({ bigint: true })]);
    if (st.ino !== source.ino || st.dev !== source.dev || st.nlink !== 2n || !st.isFile()) throw new Error('not ours alone');
    // The mtime made now, as a written temp file's is: the sweep judges temp files by their age,
    // and a staged file may have waited in the queue for longer than that.
    const now = new Date();
    await futimesFd(fd, now, now);
    return fd;
  } catch {
    if (fd !== undefined) await closeFd(fd).catch(() => {});
    await unlinkQuiet(tmp);
    return undefined;
  }
}

/**
 * Reads the whole body once (from the page cache, mostly: the file was just written), so the
 * Bucket's hashing and its digest and size checks run as for a copy; a failure there stores
 * nothing. With `flush`, the pages left dirty by the producer start going to disk at once, while
 * the hashing runs, rather than all at the put's final fsync.
 */
export async function hashThrough(fd: number, body: PutBody, signal: AbortSignal | undefined, flush: boolean): Promise<void> {
  const flushing = flush ? fdatasyncFd(fd) : Promise.resolve();
  // A failure surfaces when awaited below; until then it must not count as unhandled.
  flushing.catch(() => {});
  try {
    await readThrough(body, signal);
  } finally {
    // Never leave a flush running on a handle about to be closed.
    await flushing.catch(() => {});
  }
  await flushing;
}
