import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { GroupCommit, syncDir } from '../../src/storage/sync-dir.js';

/** A run that records when it started and finishes only when released. */
function gatedRuns() {
  const runs: { key: string; release: () => void; fail: (e: Error) => void }[] = [];
  const commit = new GroupCommit((key) => new Promise<void>((resolve, reject) => { runs.push({ key, release: resolve, fail: reject }); }));
  return { runs, commit };
}

const tick = () => new Promise((r) => setImmediate(r));

describe('GroupCommit', () => {
  it('shares one queued run among all callers that arrive while a run is under way', async () => {
    const { runs, commit } = gatedRuns();
    const first = commit.run('d');
    expect(runs).toHaveLength(1);
    const later = Array.from({ length: 31 }, () => commit.run('d'));
    await tick();
    // Still one run: the 31 latecomers wait for a run that starts after theirs were asked for.
    expect(runs).toHaveLength(1);
    let settled = 0;
    for (const p of later) void p.then(() => settled++);
    runs[0]!.release();
    await first;
    await tick();
    expect(settled).toBe(0); // the run under way when they called does not count for them
    expect(runs).toHaveLength(2);
    runs[1]!.release();
    await Promise.all(later);
    expect(runs).toHaveLength(2);
  });

  it('starts a fresh run once everything is done, and keeps keys apart', async () => {
    const { runs, commit } = gatedRuns();
    const a = commit.run('a');
    const b = commit.run('b');
    expect(runs.map((r) => r.key)).toEqual(['a', 'b']);
    runs[0]!.release();
    runs[1]!.release();
    await Promise.all([a, b]);
    const again = commit.run('a');
    expect(runs).toHaveLength(3);
    runs[2]!.release();
    await again;
  });

  it('fails the callers queued behind a failed run with its error, never a fresh fsync; later callers start afresh', async () => {
    const { runs, commit } = gatedRuns();
    const first = commit.run('d');
    const queued = commit.run('d');
    queued.catch(() => {});
    runs[0]!.fail(new Error('EIO'));
    await expect(first).rejects.toThrow('EIO');
    await expect(queued).rejects.toThrow('EIO');
    expect(runs).toHaveLength(1);
    const after = commit.run('d');
    expect(runs).toHaveLength(2);
    runs[1]!.release();
    await expect(after).resolves.toBeUndefined();
  });
});

describe('syncDir', () => {
  it('fsyncs a real folder, many callers at once, and reports a missing one', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'stevedore-sync-'));
    try {
      await Promise.all(Array.from({ length: 16 }, () => syncDir(dir)));
      await expect(syncDir(join(dir, 'missing'))).rejects.toMatchObject({ code: 'ENOENT' });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
