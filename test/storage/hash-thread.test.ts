import { createHash, randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { sha256Moved } from '../../src/storage/hash-thread.js';

const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

describe('sha256Moved', () => {
  it('hashes a buffer that owns its memory on the thread: the right digest, the same bytes back, the original emptied', async () => {
    const b = Buffer.allocUnsafe(300_000);
    randomBytes(b.length).copy(b);
    const want = sha(b);
    const copy = Buffer.from(b);
    const r = await sha256Moved(b);
    expect(r.sha256).toBe(want);
    expect(r.buf.equals(copy)).toBe(true);
    expect(b.length).toBe(0); // moved to the thread and back: only the returned buffer holds the bytes
  });

  it('hashes views, small and shared buffers here and returns them as they are', async () => {
    const big = randomBytes(1 << 20);
    for (const b of [big.subarray(10, 500_000), randomBytes(1000), Buffer.from(new SharedArrayBuffer(200_000))]) {
      const r = await sha256Moved(b);
      expect(r.sha256).toBe(sha(b));
      expect(r.buf).toBe(b);
    }
  });

  it('keeps each answer with its buffer when many are in flight', async () => {
    const bufs = Array.from({ length: 40 }, (_, i) => { const b = Buffer.allocUnsafe(70_000 + i * 1000); randomBytes(b.length).copy(b); return b; });
    const want = bufs.map((b) => ({ sha256: sha(b), bytes: Buffer.from(b) }));
    const got = await Promise.all(bufs.map((b) => sha256Moved(b)));
    got.forEach((g, i) => {
      expect(g.sha256).toBe(want[i]!.sha256);
      expect(g.buf.equals(want[i]!.bytes)).toBe(true);
    });
  });
});
