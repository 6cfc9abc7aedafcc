import { buffer as drain } from 'node:stream/consumers';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RepackPayload, repackSession, type RepackResult } from '../../jobs/repack-session.js';
import { FsDriver } from '../../src/backends/fs.js';
import { parsePayload } from '../../src/payload.js';
import { Bucket, type PutOptions, type PutSource } from '../../src/storage/bucket.js';
import type { ObjectInfo } from '../../src/storage/driver.js';
import { sessionKey } from '../../src/session/ids.js';
import { listSession } from '../../src/session/read.js';
import { openSeekable, segmentAt } from '../../src/session/seek-read.js';
import { LONG_FILE, makeTree, members, run } from '../archive/corpus.js';
import { tempDir } from '../harness/process.js';
import type { TestRedis } from '../harness/redis.js';
import { comparable, jobDeps, plain, readEveryWay, sessionEnv, type SessionEnv } from '../session/helpers.js';

const sha = (b: string | Buffer): string => createHash('sha256').update(b).digest('hex');
const ENQUEUED = Date.parse('2026-11-30T09:00:00.000Z');

describe('repack-session', () => {
  let env: SessionEnv;
  let redis: TestRedis;
  let conn: Redis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let root: string;
  let staging: string;
  let bucket: Bucket;
  const corpus: Record<string, string> = {};
  let n = 0;

  beforeAll(async () => {
    env = await sessionEnv('stevedore-repack-');
    ({ redis, conn, tmp, root, staging } = env);
    bucket = new Bucket(new FsDriver({ root }), { name: 'default' });
    const src = join(tmp.path, 'src');
    await mkdir(src);
    await makeTree(src);
    for (const format of ['gnu', 'posix']) {
      corpus[format] = join(tmp.path, `${format}.tgz`);
      await run('tar', [`--format=${format}`, '-czf', corpus[format]!, '-C', src, '.']);
    }
  });
  afterAll(async () => {
    await env?.close();
  });

  /** A fresh session holding `archive` (a GNU tar corpus) as its stored archive. */
  const session = async (archive?: string): Promise<string> => {
    const s = `owner__repo__branch-${++n}`;
    if (archive) await bucket.put(sessionKey(s), { path: archive });
    return s;
  };
  const stored = (s: string) => join(root, sessionKey(s));
  const repack = (s: string, ops: unknown[], opts: Parameters<typeof jobDeps>[3] = {}): Promise<RepackResult> =>
    repackSession(parsePayload(RepackPayload, { session: s, ops }), jobDeps(bucket, conn, staging, { enqueuedAt: ENQUEUED, jobId: `j${++n}`, ...opts }));
  const codeOf = (p: Promise<unknown>) => p.then(() => 'ok', (err: { code?: string }) => err.code ?? String(err));

  it.each(['gnu', 'posix'])('applies puts and deletes to a GNU tar --format=%s session, every untouched entry intact, read by every reader', async (format) => {
    const s = await session(corpus[format]);
    const before = comparable(await members(stored(s), 'r:gz'));
    await writeFile(join(staging, 'big.bin'), Buffer.alloc(3 << 20, 0x61));
    const result = await repack(s, [
      { op: 'put', path: 'README.md', text: 'edited readme\n' },
      { op: 'put', path: 'bin/run', text: '#!/bin/sh\necho edited\n' },
      { op: 'put', path: 'empty', text: 'now 0600', mode: 0o600 },
      { op: 'put', path: 'new/deeper/file.txt', base64: Buffer.from('brand new\n').toString('base64') },
      { op: 'put', path: 'new/big.bin', source: { path: 'big.bin' } },
      { op: 'delete', path: 'secret' },
      { op: 'delete', path: 'sub/deeper' },
      { op: 'delete', path: 'not/there' },
    ]);
    expect(result.missing).toEqual(['not/there']);
    expect(result.key).toBe(sessionKey(s));
    const bytes = await readFile(stored(s));
    expect(result).toMatchObject({ size: bytes.length, sha256: sha(bytes) });
    expect((await bucket.stat(sessionKey(s))).sha256).toBe(sha(bytes));

    const { members: after, tree } = await readEveryWay(stored(s), join(tmp.path, `x-${s}`));
    expect(result.entries).toBe(after.length);
    const touched = new Set(['README.md', 'bin/run', 'empty', 'secret', 'sub/deeper', 'sub/deeper/data.bin', 'new', 'new/deeper', 'new/deeper/file.txt', 'new/big.bin']);
    const untouched = comparable(after).filter((m) => !touched.has(plain(m.name)));
    // Header fields (type, mode, owner, mtime, link targets, PAX records) and bytes, entry for entry.
    expect(untouched).toEqual(before.filter((m) => !touched.has(plain(m.name))));
    expect(untouched.map((m) => m.type)).toEqual(expect.arrayContaining(['symlink', 'link', 'directory', 'file']));
    expect(untouched.some((m) => plain(m.name) === LONG_FILE)).toBe(true);

    const at = (name: string) => after.find((m) => plain(m.name) === name)!;
    const secs = ENQUEUED / 1000;
    expect(at('README.md')).toMatchObject({ type: 'file', mode: 0o644, mtime: secs, sha256: sha('edited readme\n'), uid: before.find((m) => plain(m.name) === 'README.md')!.uid });
    expect(at('bin/run')).toMatchObject({ mode: 0o755, mtime: secs, sha256: sha('#!/bin/sh\necho edited\n') });
    expect(at('empty')).toMatchObject({ mode: 0o600, size: 8 });
    expect(at('new')).toMatchObject({ type: 'directory', mode: 0o755, mtime: secs });
    expect(at('new/deeper')).toMatchObject({ type: 'directory', mode: 0o755 });
    expect(at('new/deeper/file.txt')).toMatchObject({ type: 'file', mode: 0o644, mtime: secs, sha256: sha('brand new\n'), uid: 0 });
    expect(at('new/big.bin')).toMatchObject({ size: 3 << 20, sha256: sha(Buffer.alloc(3 << 20, 0x61)) });
    expect(after.find((m) => plain(m.name) === 'secret' || plain(m.name).startsWith('sub/deeper'))).toBeUndefined();

    // Extraction yields exactly the session's files: the original tree, edited.
    const names = Object.keys(tree).sort();
    const expected = before.map((m) => plain(m.name)).filter((p) => p !== '' && p !== 'secret' && !p.startsWith('sub/deeper'))
      .concat(['new', 'new/deeper', 'new/deeper/file.txt', 'new/big.bin']).sort();
    expect(names).toEqual(expected);
    // The hard link follows the file it names, as an in-place edit of a linked file does.
    expect(tree.hard).toBe(tree['README.md']);
  });

  it('edits a session whose names differ only by case (a Linux repository), keeping both', async () => {
    const src = join(tmp.path, 'case-src');
    await mkdir(src, { recursive: true });
    await writeFile(join(src, 'Makefile'), 'upper\n');
    await writeFile(join(src, 'makefile'), 'lower\n');
    const archive = join(tmp.path, 'case.tgz');
    await run('tar', ['-czf', archive, '-C', src, 'Makefile', 'makefile']);
    const s = await session(archive);
    await repack(s, [{ op: 'put', path: 'makefile', text: 'edited\n' }]);
    const ms = await members(stored(s), 'r:gz');
    expect(ms.map((m) => [plain(m.name), m.sha256])).toEqual([['Makefile', sha('upper\n')], ['makefile', sha('edited\n')]]);
  });

  it('creates a missing session, with the parents of a new path', async () => {
    const s = await session();
    const result = await repack(s, [{ op: 'put', path: 'a/b/c.txt', text: 'c' }, { op: 'delete', path: 'gone' }]);
    expect(result).toMatchObject({ entries: 3, missing: ['gone'] });
    const ms = await members(stored(s), 'r|gz');
    expect(ms.map((m) => [m.name, m.type, m.mode])).toEqual([['a', 'directory', 0o755], ['a/b', 'directory', 0o755], ['a/b/c.txt', 'file', 0o644]]);
  });

  it('with create: false, fails NotFound on a missing session and creates nothing; edits an existing one', async () => {
    const s = await session();
    const deps = () => jobDeps(bucket, conn, staging, { enqueuedAt: ENQUEUED, jobId: `j${++n}` });
    const gone = repackSession(parsePayload(RepackPayload, { session: s, ops: [{ op: 'delete', path: 'a.txt' }], create: false }), deps());
    await expect(gone).rejects.toMatchObject({ code: 'NotFound' });
    await expect(bucket.stat(sessionKey(s))).rejects.toMatchObject({ code: 'NotFound' });
    await repack(s, [{ op: 'put', path: 'a.txt', text: 'a' }]);
    const done = await repackSession(parsePayload(RepackPayload, { session: s, ops: [{ op: 'delete', path: 'a.txt' }], create: false }), deps());
    expect(done).toMatchObject({ entries: 0, missing: [] });
  });

  it('writes identical bytes when the same edit runs twice on the same archive', async () => {
    const [a, b] = [await session(corpus.gnu), await session(corpus.gnu)];
    const ops = [{ op: 'put', path: 'README.md', text: 'x' }, { op: 'put', path: 'z/new', text: 'y' }, { op: 'delete', path: 'bin' }];
    const ra = await repack(a, ops, { jobId: 'first' });
    const rb = await repack(b, ops, { jobId: 'second' });
    expect(rb.sha256).toBe(ra.sha256);
    expect(Buffer.compare(await readFile(stored(a)), await readFile(stored(b)))).toBe(0);
  });

  it('a redelivered job whose edit already landed succeeds without writing again, even with ifSha256', async () => {
    const s = await session(corpus.gnu);
    const ops = [{ op: 'put', path: 'README.md', text: 'v2', ifSha256: sha('# session\n') }];
    const first = await repack(s, ops, { jobId: 'again' });
    const etag = (await bucket.stat(sessionKey(s))).etag;
    const second = await repack(s, ops, { jobId: 'again' });
    expect(second).toEqual({ ...first, missing: [] });
    expect((await bucket.stat(sessionKey(s))).etag).toBe(etag);
    // Another job with the same stale condition is refused.
    expect(await codeOf(repack(s, ops, { jobId: 'other' }))).toBe('PreconditionFailed');
  });

  it('fails PreconditionFailed and changes nothing when an ifSha256 does not match', async () => {
    const s = await session(corpus.posix);
    const was = await readFile(stored(s));
    const etag = (await bucket.stat(sessionKey(s))).etag;
    const wrong = sha('not the content');
    for (const ops of [
      [{ op: 'put', path: 'new.txt', text: 'ok' }, { op: 'put', path: 'README.md', text: 'x', ifSha256: wrong }],
      [{ op: 'delete', path: 'bin/run', ifSha256: wrong }],
      [{ op: 'put', path: 'absent.txt', text: 'x', ifSha256: sha('') }],
      [{ op: 'delete', path: 'sub', ifSha256: sha('') }],
      // The condition sees the tree as the job's earlier ops left it.
      [{ op: 'delete', path: 'README.md' }, { op: 'put', path: 'README.md', text: 'x', ifSha256: sha('# session\n') }],
    ]) {
      await expect(repack(s, ops)).rejects.toMatchObject({ code: 'PreconditionFailed' });
    }
    expect(Buffer.compare(await readFile(stored(s)), was)).toBe(0);
    expect((await bucket.stat(sessionKey(s))).etag).toBe(etag);
    // Matching conditions apply, including one on the job's own earlier put.
    const ok = await repack(s, [
      { op: 'put', path: 'README.md', text: 'v2', ifSha256: sha('# session\n') },
      { op: 'put', path: 'README.md', text: 'v3', ifSha256: sha('v2') },
      { op: 'delete', path: 'bin/run', ifSha256: sha('#!/bin/sh\necho run\n') },
    ]);
    expect(ok.missing).toEqual([]);
    const ms = await members(stored(s), 'r:gz');
    expect(ms.find((m) => plain(m.name) === 'README.md')?.sha256).toBe(sha('v3'));
    expect(ms.find((m) => plain(m.name) === 'bin/run')).toBeUndefined();
  });

  it('applies ops in order: a later op sees what an earlier one did', async () => {
    const s = await session(corpus.gnu);
    const result = await repack(s, [
      { op: 'put', path: 'tmp/a', text: 'a' },
      { op: 'delete', path: 'tmp' },
      { op: 'delete', path: 'tmp' },
      { op: 'delete', path: 'bin' },
      { op: 'put', path: 'bin/run', text: 'new run' },
      { op: 'put', path: 'secret', text: 'one' },
      { op: 'put', path: 'secret', text: 'two' },
    ]);
    expect(result.missing).toEqual(['tmp']);
    const ms = await members(stored(s), 'r:gz');
    const at = (p: string) => ms.find((m) => plain(m.name) === p);
    expect(at('tmp')).toBeUndefined();
    expect(at('tmp/a')).toBeUndefined();
    expect(at('bin/suid')).toBeUndefined();
    // Recreated after its delete: a new file (0644), not the old 0755.
    expect(at('bin/run')).toMatchObject({ mode: 0o644, sha256: sha('new run') });
    // The second put keeps the first one's mode, which kept the archive's 0600.
    expect(at('secret')).toMatchObject({ mode: 0o600, sha256: sha('two'), uid: 1234 });
  });

  it('turns a hard link to a deleted file into that file (the removed bytes are spooled on a second pass)', async () => {
    const s = await session(corpus.gnu);
    const result = await repack(s, [{ op: 'delete', path: 'README.md' }]);
    expect(result.missing).toEqual([]);
    const { members: ms, tree } = await readEveryWay(stored(s), join(tmp.path, `x-${s}`));
    const hard = ms.find((m) => plain(m.name) === 'hard')!;
    expect(hard).toMatchObject({ type: 'file', sha256: sha('# session\n'), size: 10 });
    expect(tree['README.md']).toBeUndefined();
    expect(tree.hard).toMatch(/^file 644 /);
  });

  it('refuses to put a file where the archive has a directory, and a path through a file', async () => {
    const s = await session(corpus.gnu);
    expect(await codeOf(repack(s, [{ op: 'put', path: 'sub', text: 'x' }]))).toBe('InvalidInput');
    expect(await codeOf(repack(s, [{ op: 'put', path: 'README.md/x', text: 'x' }]))).toBe('InvalidInput');
    expect(await codeOf(repack(s, [{ op: 'put', path: 'link/through', text: 'x' }]))).toBe('InvalidInput');
  });

  it('fails InvalidInput on a corrupt or truncated stored archive and leaves it untouched', async () => {
    const good = await readFile(corpus.gnu!);
    for (const bytes of [good.subarray(0, good.length >> 1), Buffer.from('not an archive at all, not even gzip')]) {
      const s = await session();
      await bucket.put(sessionKey(s), bytes);
      expect(await codeOf(repack(s, [{ op: 'put', path: 'a', text: 'a' }]))).toBe('InvalidInput');
      expect(Buffer.compare(await readFile(stored(s)), bytes)).toBe(0);
    }
  });

  it('refuses malicious op paths and session ids at validation, naming the field', () => {
    const bad = (session: string, path: string) => {
      try {
        parsePayload(RepackPayload, { session, ops: [{ op: 'delete', path }] });
        return 'ok';
      } catch (err) {
        return (err as Error).message;
      }
    };
    for (const path of ['/etc/passwd', '../x', 'a/../../x', 'a\\..\\x', 'C:../x', 'a//b', 'a/', './a', 'a/./b', 'a\u0000b', 'a\nb', '', 'x'.repeat(256)]) {
      expect(bad('o__r__b', path)).toMatch(/^InvalidInput: ops\.0\.path: /);
    }
    for (const session of ['o__r', 'o____b', '__r__b', 'o__r__', 'o/x__r__b', 'o__r__feature/x', 'o__r__a..b', '..__r__b', 'o__r__b\u0000', 'o__r__b\u007f', `o__r__${'b'.repeat(300)}`]) {
      expect(bad(session, 'ok')).toMatch(/^InvalidInput: session: /);
    }
    expect(bad('octo__repo__feature__x', 'ok')).toBe('ok');
    expect(bad('o__r__b', 'dir/file name ünïcode.txt')).toBe('ok');
    expect(() => parsePayload(RepackPayload, { session: 'o__r__b', ops: [{ op: 'put', path: 'a', text: 'x', base64: 'eA==' }] })).toThrow(/exactly one of/);
    expect(() => parsePayload(RepackPayload, { session: 'o__r__b', ops: [{ op: 'put', path: 'a', text: 'x', mode: 0o10000 }] })).toThrow(/ops\.0\.mode/);
  });

  it('re-reads and re-applies when a writer without the lock replaced the archive before the commit, and gives up Transient after a few', async () => {
    /** The filesystem bucket, with another writer (no lock) replacing the archive just before each conditional commit. */
    class Interfering extends Bucket {
      interferences = 0;
      constructor(private readonly times: number) { super(new FsDriver({ root })); }
      override async put(key: string, source: PutSource, opts: PutOptions = {}): Promise<ObjectInfo> {
        if (opts.ifMatch !== undefined && this.interferences < this.times) {
          this.interferences++;
          const mine = `${this.interferences}`;
          // Whole-session replacement by someone else: the same archive plus a file of its own.
          const other = jobDeps(bucket, conn, staging, { queue: `other-${mine}-${++n}`, jobId: `other-${n}` });
          await repackSession(parsePayload(RepackPayload, { session: key.split('/')[1]!, ops: [{ op: 'put', path: `other-${mine}.txt`, text: mine }] }), other);
        }
        return super.put(key, source, opts);
      }
    }
    const s = await session(corpus.gnu);
    const twice = new Interfering(2);
    const result = await repackSession(parsePayload(RepackPayload, { session: s, ops: [{ op: 'put', path: 'mine.txt', text: 'mine' }] }), jobDeps(twice, conn, staging, { jobId: 'racer' }));
    expect(twice.interferences).toBe(2);
    const names = (await members(stored(s), 'r:gz')).map((m) => plain(m.name));
    // Neither the other writer's edits nor ours is lost.
    expect(names).toEqual(expect.arrayContaining(['other-1.txt', 'other-2.txt', 'mine.txt', 'README.md']));
    expect(result.sha256).toBe(sha(await readFile(stored(s))));
    const always = new Interfering(100);
    await expect(repackSession(parsePayload(RepackPayload, { session: s, ops: [{ op: 'put', path: 'late.txt', text: 'x' }] }), jobDeps(always, conn, staging, { jobId: 'loser' })))
      .rejects.toMatchObject({ code: 'Transient', message: expect.stringMatching(/replaced by other writers 4 times/) });
    expect((await members(stored(s), 'r:gz')).map((m) => plain(m.name))).not.toContain('late.txt');
  });

  it('points every later hard link to a deleted file at the first, which becomes the file', async () => {
    const src = join(tmp.path, 'links');
    await mkdir(join(src, 'd'), { recursive: true });
    await writeFile(join(src, 'd/a.txt'), 'shared bytes\n');
    await run('ln', [join(src, 'd/a.txt'), join(src, 'b.txt')]);
    await run('ln', [join(src, 'd/a.txt'), join(src, 'c.txt')]);
    const archive = join(tmp.path, 'links.tgz');
    // Listed in this order, so d/a.txt is the file and both others link to it.
    await run('tar', ['-czf', archive, '-C', src, 'd/a.txt', 'b.txt', 'c.txt']);
    const s = await session(archive);
    await repack(s, [{ op: 'delete', path: 'd' }]);
    const ms = await members(stored(s), 'r|gz');
    expect(ms.map((m) => [m.name, m.type, m.linkname, m.sha256])).toEqual([
      ['b.txt', 'file', '', sha('shared bytes\n')],
      ['c.txt', 'link', 'b.txt', undefined],
    ]);
    const { tree } = await readEveryWay(stored(s), join(tmp.path, `x-${s}`));
    expect(Object.keys(tree)).toEqual(['b.txt', 'c.txt']);
    expect(tree['c.txt']).toBe(tree['b.txt']);
  });

  it('reads an archive written by another tool (no recorded digest) as unverified, and the repack records one', async () => {
    const s = await session(corpus.gnu);
    // Another tool's copy: the bytes without our sidecar.
    await rm(join(root, 'sessions', s, '.stevedore'), { recursive: true, force: true });
    const before = await listSession(bucket, s);
    expect([before.verified, before.sha256]).toEqual([false, undefined]);
    const result = await repack(s, [{ op: 'put', path: 'x', text: 'x' }]);
    const after = await listSession(bucket, s);
    expect([after.verified, after.sha256]).toEqual([true, result.sha256]);
    expect(after.entries.length).toBe(before.entries.length + 1);
  });

  describe('a seekable archive is read as its segments, each checked against the index (not hashed whole again)', () => {
    /** A seekable session: a small file, and a 400 kB one in segments of its own. */
    const seekableSession = async (): Promise<{ s: string; big: { cOff: number; cLen: number } }> => {
      const s = await session();
      await repack(s, [{ op: 'put', path: 'a.txt', text: 'a\n' }, { op: 'put', path: 'big.bin', base64: randomBytes(400_000).toString('base64') }], { jobId: `make-${s}` });
      const ix = (await openSeekable(bucket, sessionKey(s), undefined))!.index;
      const start = ix.entries.find((e) => e.path === 'big.bin')!.start;
      return { s, big: ix.segments[segmentAt(ix, start + 1024)]! };
    };
    /** Bit rot: one byte flipped in place, the recorded digest kept. */
    const flip = async (s: string, at: number): Promise<Buffer> => {
      const bytes = await readFile(stored(s));
      bytes[at]! ^= 0x01;
      await writeFile(stored(s), bytes, { flag: 'r+' });
      return bytes;
    };

    it('a rotten segment the edit would copy fails InvalidInput and leaves the archive untouched', async () => {
      const { s, big } = await seekableSession();
      const rotten = await flip(s, big.cOff + (big.cLen >> 1));
      expect(await codeOf(repack(s, [{ op: 'put', path: 'a.txt', text: 'edited\n' }]))).toBe('InvalidInput');
      expect(Buffer.compare(await readFile(stored(s)), rotten)).toBe(0);
    });

    it('a byte no rewrite uses (the gzip header\'s OS byte) fails only a whole read: a plain get ChecksumMismatch, an edit writes it anew', async () => {
      const { s } = await seekableSession();
      const rotten = await flip(s, 9);
      // A redelivered job answers from its recorded outcome (group commit); a whole read still checks the digest.
      const whole = await bucket.get(sessionKey(s));
      await expect(drain(whole.stream)).rejects.toMatchObject({ code: 'ChecksumMismatch' });
      expect(Buffer.compare(await readFile(stored(s)), rotten)).toBe(0);
      const edited = await repack(s, [{ op: 'put', path: 'a.txt', text: 'edited\n' }]);
      const bytes = await readFile(stored(s));
      expect(bytes[9]).toBe(3);
      expect(sha(bytes)).toBe(edited.sha256);
      const { tree } = await readEveryWay(stored(s), join(tmp.path, `x-${s}`));
      expect(tree['a.txt']).toMatch(/^file 644 /);
    });
  });
});
