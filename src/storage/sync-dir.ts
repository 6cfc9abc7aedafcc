import { mkdir } from 'node:fs/promises';
import { dirname } from 'node:path';
import { closeFd, fsyncFd, openFd } from './fd.js';

/**
 * Group commit: concurrent callers for one key share runs of `fn`. A caller joins the next run to
 * start, never one already under way (it may have begun before the caller's change), so each
 * caller still gets a run that began after its call. Two runs at most per burst, however many
 * callers: one running, one queued. When a run fails, the callers queued behind it fail with the
 * same error instead of getting a fresh run: their changes were made while the failed fsync was
 * under way and may be among what it lost, and a new fsync would not report that error again
 * (an fsync is never retried to turn a failure into a success).
 */
export class GroupCommit {
  private readonly slots = new Map<string, { running: Promise<void>; queued: Promise<void> | undefined }>();

  constructor(private readonly fn: (key: string) => Promise<void>) {}

  run(key: string): Promise<void> {
    const slot = this.slots.get(key);
    if (!slot) return this.start(key);
    slot.queued ??= slot.running.then(() => this.start(key), (err: unknown) => {
      // Callers arriving after the failure start afresh: their changes come after it.
      if (this.slots.get(key) === slot) this.slots.delete(key);
      throw err;
    });
    return slot.queued;
  }

  private start(key: string): Promise<void> {
    const slot = { running: this.fn(key), queued: undefined as Promise<void> | undefined };
    this.slots.set(key, slot);
    const done = () => { if (this.slots.get(key) === slot && slot.queued === undefined) this.slots.delete(key); };
    slot.running.then(done, done);
    return slot.running;
  }
}

const dirSyncs = new GroupCommit(async (dir) => {
  const fd = await openFd(dir, 'r');
  try {
    await fsyncFd(fd);
  } finally {
    await closeFd(fd);
  }
});

/**
 * fsync a directory, so a rename or create in it survives a power cut. Concurrent callers for one
 * directory share fsyncs (GroupCommit): thirty-two writers into one folder cost about two
 * directory fsyncs, not thirty-two.
 */
export function syncDir(dir: string): Promise<void> {
  return dirSyncs.run(dir);
}

/**
 * `mkdir -p` whose new folders survive a power cut: each folder it created is an entry in its
 * parent, so every such parent is fsynced (a file later renamed into the deepest one would
 * otherwise be durable inside a folder that is not). Folders that already existed cost nothing.
 */
export async function mkdirDurable(path: string): Promise<void> {
  const first = await mkdir(path, { recursive: true });
  if (first === undefined) return;
  for (let dir = path; ; dir = dirname(dir)) {
    await syncDir(dirname(dir));
    if (dir === first || dirname(dir) === dir) break;
  }
}
