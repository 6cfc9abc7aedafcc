import { createHash, randomBytes } from 'node:crypto';
import { link, lstat, mkdir, readFile, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { PassThrough, type Readable } from 'node:stream';
import { constants as zc, crc32, gunzipSync, gzipSync, inflateRawSync } from 'node:zlib';
import type { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RepackPayload, repackSession } from '../../jobs/repack-session.js';
import { FsDriver } from '../../src/backends/fs.js';
import { parsePayload } from '../../src/payload.js';
import { Bucket } from '../../src/storage/bucket.js';
import { rewriteArchive } from '../../src/session/archive.js';
import { crc32Combine } from '../../src/session/crc32.js';
import { sessionKey } from '../../src/session/ids.js';
import { EditPlan, type PlanOp } from '../../src/session/plan.js';
import { dirtySegments, rewriteSegments } from '../../src/session/seek-edit.js';
import { readEntryData } from '../../src/session/seek-entry.js';
import { catSession, listSession } from '../../src/session/read.js';
import { FOOTER_BYTES, tail, type SeekIndex } from '../../src/session/seek-format.js';
import { openSeekable } from '../../src/session/seek-read.js';
import { members, run } from '../archive/corpus.js';
import { overrideDriver } from '../fixtures/override-driver.js';
import { tempDir } from '../harness/process.js';
import type { TestRedis } from '../harness/redis.js';
import { jobDeps, plain, readEveryWay, sessionEnv, type SessionEnv } from './helpers.js';

const sha = (b: string | Buffer): string => createHash('sha256').update(b).digest('hex');
const code = (p: Promise<unknown>) => p.then(() => 'ok', (err: { code?: string }) => { if (process.env.DBG) console.log(err); return err.code ?? String(err); });

/** Collects what a writable receives. */
function sink(): PassThrough & { bytes(): Buffer } {
  const parts: Buffer[] = [];
  const s = new PassThrough() as PassThrough & { bytes(): Buffer };
  s.on('data', (c: Buffer) => parts.push(c));
  s.bytes = () => Buffer.concat(parts);
  return s;
}

describe('seekable session archives', () => {
  let env: SessionEnv;
  let redis: TestRedis;
  let conn: Redis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let root: string;
  let staging: string;
  let bucket: Bucket;
  /** Bytes the driver's ranged and whole reads returned, since the last reset. */
  let readBytes = 0;
  let gnuArchive: string;
  const big = randomBytes(3 << 20);
  const files: Record<string, string> = {};

  beforeAll(async () => {
    env = await sessionEnv('stevedore-seek-');
    ({ redis, conn, tmp, root, staging } = env);
    const fs = new FsDriver({ root });
    const counted = overrideDriver(fs, {
      get: async (key, range, signal) => {
        const got = await fs.get(key, range, signal);
        const stream = got.stream as Readable;
        stream.on('data', (c: Buffer) => { readBytes += c.length; });
        return got;
      },
    });
    bucket = new Bucket(counted, { name: 'default' });
    // A GNU tar session: 600 small text files in 30 directories, a 3 MiB file, links, an empty dir, unicode.
    const src = join(tmp.path, 'src');
    for (let d = 0; d < 30; d++) {
      await mkdir(join(src, `pkg-${d}`, 'lib'), { recursive: true });
      for (let f = 0; f < 20; f++) {
        const p = `pkg-${d}/lib/mod-${f}.js`;
        files[p] = `// ${p}\n${Array.from({ length: 60 }, (_, i) => `export const v${i} = ${d * 1000 + f * 7 + i}; // ${randomBytes(6).toString('hex')}`).join('\n')}\n`;
        await writeFile(join(src, p), files[p]!);
      }
    }
    await writeFile(join(src, 'blob.bin'), big);
    await mkdir(join(src, 'empty-dir'));
    await writeFile(join(src, 'ünïcødé.txt'), 'ünïcødé\n');
    await symlink('pkg-3/lib/mod-4.js', join(src, 'sym'));
    await link(join(src, 'pkg-5/lib/mod-6.js'), join(src, 'hard'));
    gnuArchive = join(tmp.path, 'gnu.tgz');
    await run('tar', ['--format=gnu', '-czf', gnuArchive, '-C', src, '.']);
  });
  afterAll(async () => {
    await env?.close();
  });

  let n = 0;
  /** A session converted from the GNU tar archive by its first repack (one small put). */
  const converted = async (): Promise<string> => {
    const s = `seek__repo__b${++n}`;
    await bucket.put(sessionKey(s), { path: gnuArchive });
    await repackSession(parsePayload(RepackPayload, { session: s, ops: [{ op: 'put', path: 'NEW.md', text: 'new\n' }] }), jobDeps(bucket, conn, staging, { jobId: `j${n}` }));
    return s;
  };
  const stored = (s: string) => join(root, sessionKey(s));

  it('crc32Combine agrees with zlib on random splits', () => {
    for (const [a, b] of [[0, 1], [1, 0], [17, 5000], [1 << 16, 3], [3, (1 << 20) + 7]] as const) {
      const x = randomBytes(a);
      const y = randomBytes(b);
      expect(crc32Combine(crc32(x), crc32(y), b)).toBe(crc32(Buffer.concat([x, y])));
    }
  });

  it('writes one gzip member of independently inflatable segments, its CRC combined, the index trailing; every reader reads it', async () => {
    const s = await converted();
    const bytes = await readFile(stored(s));
    const view = (await openSeekable(bucket, sessionKey(s), undefined))!;
    expect(view).toBeDefined();
    const { segments } = view.index;
    expect(segments.length).toBeGreaterThan(4);
    const tar = gunzipSync(bytes);
    // Each segment inflates alone from its first byte; together they are the tar stream.
    const pieces = segments.map((g) => inflateRawSync(bytes.subarray(g.cOff, g.cOff + g.cLen), { finishFlush: zc.Z_SYNC_FLUSH }));
    expect(Buffer.concat(pieces).equals(tar)).toBe(true);
    pieces.forEach((p, i) => expect(crc32(p)).toBe(segments[i]!.crc));
    const trailer = view.index.dataEnd + 2;
    expect(bytes.readUInt32LE(trailer)).toBe(crc32(tar));
    expect(bytes.readUInt32LE(trailer + 4)).toBe(tar.length);
    // The 3 MiB file has segments of its own: none of them holds another entry's data.
    const blob = view.index.entries.find((e) => e.path === 'blob.bin')!;
    expect(segments.some((g) => g.uOff === blob.start)).toBe(true);
    // GNU tar, bsdtar, Python r:gz and r|gz, Node zlib + tar-stream, gzip -t; extraction yields the session's files only.
    const { tree } = await readEveryWay(stored(s), join(tmp.path, `x-${s}`));
    const dirs = Array.from({ length: 30 }, (_, d) => [`pkg-${d}`, `pkg-${d}/lib`]).flat();
    expect(Object.keys(tree).sort()).toEqual([...Object.keys(files), ...dirs, 'blob.bin', 'empty-dir', 'ünïcødé.txt', 'sym', 'hard', 'NEW.md'].sort());
  });

  it('session ls reads the index only; its entries match what Python reads', async () => {
    const s = await converted();
    const size = (await bucket.stat(sessionKey(s))).size;
    readBytes = 0;
    const listing = await listSession(bucket, s);
    expect(readBytes).toBeLessThan(128 * 1024 + 1);
    expect(readBytes).toBeLessThan(size / 10);
    const py = (await members(stored(s), 'r:gz')).filter((m) => plain(m.name) !== '');
    expect(listing.entries.map((e) => e.path)).toEqual(py.map((m) => plain(m.name)));
    for (const [i, m] of py.entries()) {
      expect(listing.entries[i]).toMatchObject({ mode: m.mode, mtime: new Date(m.mtime * 1000).toISOString(), size: m.type === 'file' ? m.size : 0 });
    }
    expect(listing.entries.find((e) => e.path === 'sym')).toMatchObject({ type: 'symlink', linkname: 'pkg-3/lib/mod-4.js' });
  });

  it('session cat reads the tail and the file\'s segment: bytes follow the file, not the archive; links and large files too', async () => {
    const s = await converted();
    const size = (await bucket.stat(sessionKey(s))).size;
    const view = (await openSeekable(bucket, sessionKey(s), undefined))!;
    const largestSegment = Math.max(...view.index.segments.map((g) => g.cLen));
    for (const p of ['pkg-17/lib/mod-3.js', 'ünïcødé.txt', 'NEW.md']) {
      readBytes = 0;
      const out = sink();
      const got = await catSession(bucket, s, p, out);
      expect(out.bytes().toString()).toBe(files[p] ?? (p === 'NEW.md' ? 'new\n' : 'ünïcødé\n'));
      expect(got.sha256).toBe(sha(out.bytes()));
      expect(readBytes).toBeLessThanOrEqual(128 * 1024 + largestSegment);
      expect(readBytes).toBeLessThan(size / 10);
    }
    const sym = sink();
    await catSession(bucket, s, 'sym', sym);
    expect(sym.bytes().toString()).toBe(files['pkg-3/lib/mod-4.js']);
    const hard = sink();
    await catSession(bucket, s, 'hard', hard);
    expect(hard.bytes().toString()).toBe(files['pkg-5/lib/mod-6.js']);
    const blob = sink();
    await catSession(bucket, s, 'blob.bin', blob);
    expect(blob.bytes().equals(big)).toBe(true);
    expect(await code(catSession(bucket, s, 'nope', sink()))).toBe('NotFound');
    expect(await code(catSession(bucket, s, 'empty-dir', sink()))).toBe('InvalidInput');
  });

  it('an archive written by another tool is read by streaming it', async () => {
    const s = `seek__repo__foreign${++n}`;
    await bucket.put(sessionKey(s), { path: gnuArchive });
    expect(await openSeekable(bucket, sessionKey(s), undefined)).toBeUndefined();
    const listing = await listSession(bucket, s);
    expect(listing.entries.some((e) => e.path === 'pkg-2/lib/mod-2.js')).toBe(true);
    const out = sink();
    await catSession(bucket, s, 'pkg-2/lib/mod-2.js', out);
    expect(out.bytes().toString()).toBe(files['pkg-2/lib/mod-2.js']);
  });

  describe('an index that lies fails ChecksumMismatch, never wrong bytes', () => {
    /** The stored archive with its index replaced by `lie(index)`, or its bytes changed by `damage`. */
    const tampered = async (lie: (ix: SeekIndex) => SeekIndex, damage: (b: Buffer, ix: SeekIndex) => void = () => {}): Promise<string> => {
      const s = await converted();
      const bytes = await readFile(stored(s));
      const view = (await openSeekable(bucket, sessionKey(s), undefined))!;
      const body = Buffer.from(bytes.subarray(0, view.index.dataEnd));
      damage(body, view.index);
      const forged = Buffer.concat([body, tail(lie(structuredClone(view.index)))]);
      await bucket.put(sessionKey(s), forged);
      return s;
    };
    const target = 'pkg-9/lib/mod-9.js';
    const segOf = (ix: SeekIndex, path: string) => {
      const e = ix.entries.find((x) => x.path === path)!;
      return ix.segments.findIndex((g) => g.uOff <= e.start && e.start < g.uOff + g.uLen);
    };

    it('a segment digest that does not match its bytes', async () => {
      const s = await tampered((ix) => { ix.segments[segOf(ix, target)]!.sha256 = sha('other'); return ix; });
      const out = sink();
      expect(await code(catSession(bucket, s, target, out))).toBe('ChecksumMismatch');
      expect(out.bytes().length).toBe(0);
    });
    it('segment bytes changed under an unchanged index', async () => {
      const s = await tampered((ix) => ix, (b, ix) => { const g = ix.segments[segOf(ix, target)]!; b[g.cOff + 100] = b[g.cOff + 100]! ^ 0x55; });
      expect(await code(catSession(bucket, s, target, sink()))).toBe('ChecksumMismatch');
    });
    it('an entry pointing at another entry\'s header', async () => {
      const s = await tampered((ix) => {
        // At the next entry's header: the starts stay in order, so only the header read can tell.
        const i = ix.entries.findIndex((e) => e.path === target);
        ix.entries[i]!.start = ix.entries[i + 1]!.start;
        return ix;
      });
      expect(await code(catSession(bucket, s, target, sink()))).toBe('ChecksumMismatch');
    });
    it('a length or CRC the bytes do not have', async () => {
      const s = await tampered((ix) => { const g = ix.segments[segOf(ix, target)]!; g.crc = (g.crc ^ 1) >>> 0; return ix; });
      expect(await code(catSession(bucket, s, target, sink()))).toBe('ChecksumMismatch');
    });
    it('a footer whose offsets do not fit the object is InvalidInput', async () => {
      const s = await converted();
      const bytes = Buffer.from(await readFile(stored(s)));
      // The footer's index offset (payload byte 8 onwards, after the member's 16-byte head) pointed one byte off.
      const at = bytes.length - FOOTER_BYTES + 16 + 12;
      bytes.writeUInt32LE(bytes.readUInt32LE(at) + 1, at);
      await bucket.put(sessionKey(s), bytes);
      expect(await code(listSession(bucket, s))).toBe('InvalidInput');
    });
  });
});

describe('segment edits', () => {
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  beforeAll(async () => { tmp = await tempDir('stevedore-seg-'); });
  afterAll(async () => { await tmp?.remove(); });

  /** Rewrites `input` (a seekable archive's bytes, or a foreign one) through `ops`; the new bytes and the segment counts. */
  const rewrite = async (input: Buffer, ops: PlanOp[]): Promise<{ bytes: Buffer; reused: number; compressed: number }> => {
    const bucket = new Bucket(new FsDriver({ root: join(tmp.path, 'o') }), { name: 'x' });
    await bucket.put('a.tgz', input);
    const view = await openSeekable(bucket, 'a.tgz', undefined);
    const run = new EditPlan(ops, new Date(Date.parse('2026-12-01T00:00:00Z'))).start(new Set());
    const out = sink();
    try {
      const r = await rewriteArchive((await bucket.get('a.tgz')).stream, out, run, { seekable: view && { index: view.index, key: 'a.tgz' } });
      return { bytes: out.bytes(), reused: r.reused, compressed: r.compressed };
    } finally {
      await run.close();
    }
  };

  it('a one-file edit compresses only the segment holding it (and the end), copies the rest, and every reader reads the result', async () => {
    const src = join(tmp.path, 'src');
    for (let d = 0; d < 40; d++) {
      await mkdir(join(src, `d${d}`), { recursive: true });
      for (let f = 0; f < 25; f++) await writeFile(join(src, `d${d}`, `f${f}.txt`), `${d}/${f} ${randomBytes(2000).toString('base64')}\n`);
    }
    await run('tar', ['-czf', join(tmp.path, 'g.tgz'), '-C', src, '.']);
    // The first repack converts: every segment compressed, none to copy from.
    const first = await rewrite(await readFile(join(tmp.path, 'g.tgz')), []);
    expect(first.reused).toBe(0);
    expect(first.compressed).toBeGreaterThan(8);
    const edited = await rewrite(first.bytes, [{ op: 'put', path: 'd20/f3.txt', body: { bytes: Buffer.from('edited\n') } }]);
    expect(edited.compressed).toBeLessThanOrEqual(2);
    expect(edited.reused).toBe(first.compressed + first.reused - edited.compressed);
    const appended = await rewrite(edited.bytes, [{ op: 'put', path: 'new/file.txt', body: { bytes: Buffer.from('new\n') } }, { op: 'delete', path: 'd7' }]);
    expect(appended.compressed).toBeLessThanOrEqual(4);
    await writeFile(join(tmp.path, 'e.tgz'), appended.bytes);
    const { tree } = await readEveryWay(join(tmp.path, 'e.tgz'), join(tmp.path, 'x'));
    expect(tree['d20/f3.txt']).toBe(`file 644 ${sha('edited\n').slice(0, 16)}`);
    expect(tree['new/file.txt']).toBeDefined();
    expect(Object.keys(tree).some((p) => p.startsWith('d7'))).toBe(false);
    expect(tree['d21/f4.txt']).toBe(`file ${((await lstat(join(src, 'd21/f4.txt'))).mode & 0o777).toString(8)} ${sha(await readFile(join(src, 'd21/f4.txt'))).slice(0, 16)}`);
  });

  it('edits the index can place rewrite only their segments, and write what the full rewrite writes', async () => {
    const seekable = (await rewrite(await readFile(join(tmp.path, 'g.tgz')), [])).bytes;
    const bucket = new Bucket(new FsDriver({ root: join(tmp.path, 'p') }), { name: 'p' });
    await bucket.put('a.tgz', seekable);
    const view = (await openSeekable(bucket, 'a.tgz', undefined))!;
    const ops: PlanOp[] = [
      { op: 'put', path: 'd3/f1.txt', body: { bytes: Buffer.from('one\n') }, mode: 0o600 },
      { op: 'put', path: 'd30/f20.txt', body: { bytes: randomBytes(300_000) } },
    ];
    const groups = dirtySegments(ops, view.index)!;
    expect(groups.size).toBe(2);
    const mtime = new Date(Date.parse('2026-12-01T00:00:00Z'));
    const out = sink();
    const fast = await rewriteSegments((await bucket.get('a.tgz')).stream, view.index, 'a.tgz', ops, mtime, groups, out, 6);
    // The groups (the 300 kB file in a segment of its own) and the archive's end; the rest copied.
    expect(fast.compressed).toBeLessThanOrEqual(6);
    expect(fast.reused).toBeGreaterThanOrEqual(view.index.segments.length - 3);
    const full = await rewrite(seekable, ops);
    await writeFile(join(tmp.path, 'fast.tgz'), out.bytes());
    await writeFile(join(tmp.path, 'full.tgz'), full.bytes);
    // Cut in other places, the same archive for every reader: every member's header fields and bytes.
    const a = await readEveryWay(join(tmp.path, 'fast.tgz'), join(tmp.path, 'xa'));
    const b = await readEveryWay(join(tmp.path, 'full.tgz'), join(tmp.path, 'xb'));
    expect(a.members).toEqual(b.members);
    expect(gunzipSync(out.bytes()).equals(gunzipSync(full.bytes))).toBe(true);
    const index = (await openSeekable(bucket, 'a.tgz', undefined))!.index;
    await bucket.put('b.tgz', out.bytes());
    const after = (await openSeekable(bucket, 'b.tgz', undefined))!.index;
    // The copied segments' entries were moved to their new offsets: each reads back through the index.
    const bview = (await openSeekable(bucket, 'b.tgz', undefined))!;
    for (const p of ['d2/f2.txt', 'd3/f1.txt', 'd29/f0.txt', 'd30/f20.txt', 'd39/f24.txt']) {
      const parts: Buffer[] = [];
      await readEntryData(bucket, bview, bview.index.entries.find((x) => x.path === p)!, undefined, (d) => { parts.push(Buffer.from(d)); });
      expect(sha(Buffer.concat(parts))).toBe(a.members.find((m) => plain(m.name) === p)!.sha256);
    }
    expect(after.entries.map((x) => [x.path, x.size])).toEqual(index.entries.map((x) => [x.path, x.path === 'd3/f1.txt' ? 4 : x.path === 'd30/f20.txt' ? 300_000 : x.size]));
    // Not placeable by the index: a delete, a new path, a condition on the content.
    expect(dirtySegments([{ op: 'delete', path: 'd3/f1.txt' }], view.index)).toBeUndefined();
    expect(dirtySegments([{ op: 'put', path: 'new.txt', body: { bytes: Buffer.from('x') } }], view.index)).toBeUndefined();
    expect(dirtySegments([{ op: 'put', path: 'd3/f1.txt', body: { bytes: Buffer.from('x') }, ifSha256: sha('x') }], view.index)).toBeUndefined();
  });

  it('a stored segment that does not match its index fails InvalidInput', async () => {
    const base = await rewrite(Buffer.concat([gzipSync(Buffer.alloc(1024))]), [{ op: 'put', path: 'a', body: { bytes: randomBytes(100_000) } }]);
    const b = Buffer.from(base.bytes);
    b[40] = b[40]! ^ 0xff;
    expect(await code(rewrite(b, []))).toBe('InvalidInput');
  });
});
