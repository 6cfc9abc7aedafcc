import { open, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { Staging } from '../../src/staging.js';
import { receiveToStaging } from '../../src/server/upload.js';
import { tempDir } from '../harness/process.js';

/** Bytes between the early flushes of a durable upload (FLUSH_EVERY in src/server/upload.ts). */
const FLUSH_EVERY = 64 << 20;
const body = (size: number) => Readable.from((function* () { for (let left = size; left > 0; left -= 1 << 20) yield Buffer.alloc(Math.min(left, 1 << 20), 9); })());

describe('receiveToStaging: a durable upload goes to disk while it arrives', () => {
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let staging: Staging;
  let proto: { datasync(): Promise<void>; sync(): Promise<void> };
  beforeAll(async () => {
    tmp = await tempDir('stevedore-receive-');
    staging = new Staging(join(tmp.path, 'staging'));
    const fh = await open(join(tmp.path, 'probe'), 'w');
    proto = Object.getPrototypeOf(fh) as typeof proto;
    await fh.close();
  });
  afterEach(() => { vi.restoreAllMocks(); });
  afterAll(async () => { await tmp?.remove(); });

  it('starts an fdatasync every 64 MiB received and ends with one fsync', async () => {
    const datasync = vi.spyOn(proto, 'datasync');
    const sync = vi.spyOn(proto, 'sync');
    const staged = await receiveToStaging(body(2 * FLUSH_EVERY + 1), staging, { limit: 1 << 30, digest: false });
    expect(staged.size).toBe(2 * FLUSH_EVERY + 1);
    expect(staged.sha256).toBeUndefined();
    expect(datasync.mock.calls.length).toBeGreaterThanOrEqual(1);
    expect(sync).toHaveBeenCalledTimes(1);
    await staged.remove();
  });

  it('a failed early flush fails the upload, leaves nothing staged and is not followed by an fsync', async () => {
    vi.spyOn(proto, 'datasync').mockRejectedValue(Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' }));
    const sync = vi.spyOn(proto, 'sync');
    await expect(receiveToStaging(body(FLUSH_EVERY + (4 << 20)), staging, { limit: 1 << 30, digest: false })).rejects.toMatchObject({ code: 'EIO' });
    expect(sync).not.toHaveBeenCalled();
    expect(await readdir(join(staging.root, 'incoming'))).toEqual([]);
  });
});
