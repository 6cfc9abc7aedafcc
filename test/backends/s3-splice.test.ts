import { createHash, randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { s3OptionsFromUrl } from '../../src/backends/s3.js';
import { COPY_PART, planSplice, spliceOverhead, type SplicePart } from '../../src/backends/s3-splice.js';
import { MAX_PARTS, MIN_PART_SIZE } from '../../src/backends/s3-upload.js';
import type { SplicePiece } from '../../src/storage/driver.js';

const MiB = 1024 * 1024;
const PART = 8 * MiB;

/** A seeded generator (mulberry32), so a failing mix can be run again. */
function seeded(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Pieces with neighbouring copies merged and neighbouring bytes joined (by digest): what an object is made of. */
function normal(pieces: readonly SplicePiece[]): string[] {
  const out: SplicePiece[] = [];
  for (const p of pieces) {
    const last = out.at(-1);
    if ('copy' in p) {
      if (p.copy.length === 0) continue;
      if (last && 'copy' in last && last.copy.offset + last.copy.length === p.copy.offset) out[out.length - 1] = { copy: { offset: last.copy.offset, length: last.copy.length + p.copy.length } };
      else out.push({ copy: { ...p.copy } });
    } else if (p.bytes.length > 0) {
      if (last && 'bytes' in last) out[out.length - 1] = { bytes: Buffer.concat([last.bytes, p.bytes]) };
      else out.push({ bytes: p.bytes });
    }
  }
  return out.map((p) => ('copy' in p ? `copy ${p.copy.offset}+${p.copy.length}` : `bytes ${createHash('sha256').update(p.bytes).digest('hex')}`));
}

const flat = (parts: SplicePart[]): SplicePiece[] => parts.flatMap((p) => ('copy' in p ? [p] : p.upload));
const uploaded = (parts: SplicePart[]): number => parts.reduce((n, p) => n + ('upload' in p ? p.length : 0), 0);

function checkRules(pieces: SplicePiece[]): SplicePart[] {
  const parts = planSplice(pieces, PART)!;
  expect(normal(flat(parts))).toEqual(normal(pieces));
  expect(parts.length).toBeLessThanOrEqual(MAX_PARTS);
  parts.forEach((p, i) => {
    const length = 'copy' in p ? p.copy.length : p.length;
    if ('upload' in p) expect(p.upload.reduce((n, x) => n + ('copy' in x ? x.copy.length : x.bytes.length), 0)).toBe(length);
    if (i < parts.length - 1) expect(length).toBeGreaterThanOrEqual(MIN_PART_SIZE);
    if ('copy' in p) expect(length).toBeGreaterThanOrEqual(MIN_PART_SIZE);
    if ('copy' in p) expect(length).toBeLessThanOrEqual(COPY_PART);
  });
  return parts;
}

describe('planSplice (S3 part rules for a spliced object)', () => {
  it('a one-file edit in a large archive sends the new bytes and at most 5 MiB beside them, wherever the edit is', () => {
    const archive = 200 * MiB;
    const fresh = randomBytes(300_000);
    const tail = randomBytes(70_000);
    for (const at of [10, 1 * MiB, 4 * MiB, 5 * MiB, 50 * MiB, archive - 9 * MiB, archive - 5 * MiB - 1, archive - 300_000]) {
      const rest = at + 250_000;
      const pieces: SplicePiece[] = [{ copy: { offset: 0, length: at } }, { bytes: fresh }, { copy: { offset: rest, length: archive - rest } }, { bytes: tail }];
      const parts = checkRules(pieces);
      // The head under a part or the padding after the edit, and the run's short tail: 2 x 5 MiB at most (README).
      expect(uploaded(parts)).toBeLessThanOrEqual(2 * MIN_PART_SIZE + fresh.length + tail.length);
      expect(parts.filter((p) => 'copy' in p).reduce((n, p) => n + ('copy' in p ? p.copy.length : 0), 0)).toBeGreaterThan(archive - 3 * MIN_PART_SIZE - fresh.length);
    }
  });

  it('random mixes of copies and new bytes keep every rule and the bytes in order', () => {
    const random = seeded(9);
    for (let round = 0; round < 100; round++) {
      const pieces: SplicePiece[] = [];
      let offset = 0;
      let fresh = 0;
      for (let i = 0, n = 1 + (round % 7); i < n; i++) {
        if ((round + i) % 2 === 0) {
          const length = Math.floor(random() * 20 * MiB) + 1;
          pieces.push({ copy: { offset, length } });
          offset += length + Math.floor(random() * MiB);
        } else {
          const b = Buffer.alloc(Math.floor(random() * (i % 3 === 0 ? 12 * MiB : 100_000)), i);
          fresh += b.length;
          pieces.push({ bytes: b });
        }
      }
      const parts = checkRules(pieces);
      // Stretches of new bytes that old bytes follow: the others cost nothing beside themselves.
      const stretches = pieces.filter((p, i) => 'bytes' in p && p.bytes.length > 0 && pieces.slice(i + 1).some((q) => 'copy' in q)).length;
      expect(uploaded(parts)).toBeLessThanOrEqual(fresh + spliceOverhead(stretches));
    }
  });

  it('more parts than S3 allows plan nothing (the object is then written whole)', () => {
    const pieces: SplicePiece[] = Array.from({ length: MAX_PARTS + 1 }, (_, i) => ({ copy: { offset: i * 6 * MiB, length: 5 * MiB } }));
    expect(planSplice(pieces, PART)).toBeUndefined();
    expect(planSplice(pieces.slice(1), PART)).toHaveLength(MAX_PARTS);
  });

  it('a small object is one sent part', () => {
    const parts = checkRules([{ copy: { offset: 0, length: 1000 } }, { bytes: Buffer.from('x') }, { copy: { offset: 2000, length: 10 } }]);
    expect(parts).toHaveLength(1);
  });

  it('splice=0 in the URL turns it off', () => {
    expect(s3OptionsFromUrl(new URL('s3://b/p?splice=0')).splice).toBe(false);
    expect(s3OptionsFromUrl(new URL('s3://b/p')).splice).toBeUndefined();
    expect(() => s3OptionsFromUrl(new URL('s3://b/p?splice=maybe'))).toThrow(/splice must be true or false/);
  });
});
