// The lead's conformance decisions (README, common brief) as the filesystem backend meets them,
// with ifMatch (decision 7), corrupt sidecars (decision 12), file: URL parameters, and what a
// symlink out of the root may never cause (nothing created outside, not even a folder).
import { lstat, mkdir, readdir, readFile, rm, symlink, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FsDriver, META_DIR, fsDriverFromUrl } from '../../src/backends/fs.js';
import { sidecarPath } from '../../src/backends/fs/layout.js';
import { ErrorCode } from '../../src/errors.js';
import { Bucket } from '../../src/storage/bucket.js';
import { codeOf, collectKeys, readAll, sha } from '../conformance/suite.js';
import { entriesUnder, filesUnder } from '../harness/fs.js';
import { tempDir } from '../harness/process.js';

describe('filesystem backend: conformance decisions', () => {
  let dir: Awaited<ReturnType<typeof tempDir>>;
  let root: string;
  let driver: FsDriver;
  let bucket: Bucket;
  beforeEach(async () => {
    dir = await tempDir('stevedore-fsdec-');
    root = join(dir.path, 'root');
    driver = new FsDriver({ root });
    bucket = new Bucket(driver);
  });
  afterEach(() => dir.remove());

  it('1: delete of a missing key or of a folder key succeeds and deletes nothing', async () => {
    await bucket.put('a/b', Buffer.from('x'));
    await bucket.delete('missing');
    await bucket.delete('missing/deeper/still');
    await bucket.delete('a'); // a folder, no object "a"
    await bucket.delete('a/b/c'); // below an object: ENOTDIR
    expect(await collectKeys(bucket)).toEqual(['a/b']);
    await bucket.delete('a/b');
    expect(await collectKeys(bucket)).toEqual([]);
  });

  it('2: {start: 0} of an empty object is zero bytes; a start > 0 at or past the end is InvalidInput', async () => {
    await bucket.put('empty', Buffer.alloc(0));
    await bucket.put('three', Buffer.from('abc'));
    expect((await readAll((await bucket.get('empty', { range: { start: 0 } })).stream)).length).toBe(0);
    expect((await readAll((await bucket.get('empty', { range: { start: 0, end: 10 } })).stream)).length).toBe(0);
    expect(await codeOf(bucket.get('empty', { range: { start: 1 } }))).toBe(ErrorCode.InvalidInput);
    expect(await codeOf(bucket.get('three', { range: { start: 3 } }))).toBe(ErrorCode.InvalidInput);
    expect((await readAll((await bucket.get('three', { range: { start: 2 } })).stream)).toString()).toBe('c');
  });

  it('4: without a content type, stat, get and list report application/octet-stream (also for a file another tool put)', async () => {
    await bucket.put('k', Buffer.from('x'));
    await writeFile(join(root, 'foreign'), 'y');
    for (const key of ['k', 'foreign']) {
      expect((await bucket.stat(key)).contentType).toBe('application/octet-stream');
      expect((await bucket.get(key)).info.contentType).toBe('application/octet-stream');
    }
    for await (const o of bucket.list('')) expect(o.contentType).toBe('application/octet-stream');
    expect((await bucket.put('t', Buffer.from('x'), { contentType: 'text/plain' })).contentType).toBe('text/plain');
  });

  it('5: a 255-byte segment works, a longer one is InvalidInput, odd characters round-trip', async () => {
    for (const key of ['x'.repeat(255), `d/${'z'.repeat(255)}`, `${'w'.repeat(255)}/f`]) {
      await bucket.put(key, Buffer.from(key));
      expect((await readAll((await bucket.get(key)).stream)).toString()).toBe(key);
      expect((await bucket.stat(key)).sha256).toBe(sha(Buffer.from(key)));
    }
    for (const key of ['y'.repeat(256), `d/${'y'.repeat(256)}`, `${'y'.repeat(256)}/f`]) {
      expect(await codeOf(bucket.put(key, Buffer.from('x'))), key.slice(0, 10)).toBe(ErrorCode.InvalidInput);
    }
    const odd = ['back\\slash', ' lead', 'trail ', 'ünï/cødé', '100%', 'a+b', 'what?', 'hash#tag', 'sp ace', 'd/e/e/p/e/r/k'];
    for (const key of odd) await bucket.put(key, Buffer.from(key));
    for (const key of odd) expect((await readAll((await bucket.get(key)).stream)).toString()).toBe(key);
    expect((await collectKeys(bucket)).filter((k) => odd.includes(k)).sort()).toEqual([...odd].sort());
  });

  it('6: put returns the etag stat reports; etag and modified time change on overwrite', async () => {
    const one = await bucket.put('k', Buffer.from('one'));
    expect((await bucket.stat('k')).etag).toBe(one.etag);
    await new Promise((r) => setTimeout(r, 5));
    const two = await bucket.put('k', Buffer.from('two'));
    expect(two.etag).not.toBe(one.etag);
    expect((await bucket.stat('k')).etag).toBe(two.etag);
    expect(two.modified.getTime()).toBeGreaterThanOrEqual(one.modified.getTime());
    for await (const o of bucket.list('')) expect(o.etag).toBe(two.etag);
  });

  it('8: a put cancelled or failed mid-stream leaves no object and keeps the previous one whole', async () => {
    await bucket.put('k', Buffer.from('previous'));
    const ac = new AbortController();
    const endless = new Readable({ read() { this.push(Buffer.alloc(256 * 1024, 1)); } });
    setTimeout(() => ac.abort(), 50);
    expect(await codeOf(bucket.put('k', endless, { signal: ac.signal }))).not.toBe('ok');
    const failing = Readable.from((async function* () { yield Buffer.alloc(1 << 20); throw new Error('source broke'); })());
    expect(await codeOf(bucket.put('k', failing))).not.toBe('ok');
    expect(await codeOf(bucket.put('fresh', Readable.from((async function* () { yield Buffer.alloc(10); throw new Error('x'); })())))).not.toBe('ok');
    expect((await readAll((await bucket.get('k')).stream)).toString()).toBe('previous');
    expect(await collectKeys(bucket)).toEqual(['k']);
    expect((await filesUnder(root)).filter((f) => f.includes('tmp-'))).toEqual([]);
  });

  it('9: copy onto an existing key replaces it; copy onto itself keeps bytes and digest', async () => {
    await bucket.put('src', Buffer.from('source'), { contentType: 'text/plain', metadata: { a: '1' } });
    await bucket.put('dst', Buffer.from('old destination'));
    const copied = await bucket.copy('src', 'dst');
    expect(copied.sha256).toBe(sha(Buffer.from('source')));
    const got = await bucket.get('dst');
    expect((await readAll(got.stream)).toString()).toBe('source');
    expect(got.info).toMatchObject({ contentType: 'text/plain', metadata: { a: '1' } });
    await bucket.copy('src', 'src');
    const self = await bucket.get('src');
    expect((await readAll(self.stream)).toString()).toBe('source');
    expect(self.info.sha256).toBe(sha(Buffer.from('source')));
    expect((await filesUnder(root)).filter((f) => f.includes(`${META_DIR}/`))).toHaveLength(2);
  });

  it('10: a listing sees every object present throughout exactly once, in order, while others come and go', async () => {
    const stable = Array.from({ length: 150 }, (_, i) => `s/${String(i).padStart(4, '0')}`);
    for (const k of stable) await bucket.put(k, Buffer.from(k));
    let stop = false;
    const churn = (async () => {
      for (let i = 0; !stop; i++) {
        const k = `s/${String(i % 150).padStart(4, '0')}x`;
        await bucket.put(k, Buffer.from('c'));
        if (i % 2) await bucket.delete(k);
      }
    })();
    try {
      for (let round = 0; round < 3; round++) {
        const keys = await collectKeys(bucket, 's/', 7);
        expect(keys.filter((k) => stable.includes(k))).toEqual(stable);
        expect(new Set(keys).size).toBe(keys.length);
        expect([...keys].sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)))).toEqual(keys);
      }
    } finally {
      stop = true;
      await churn;
    }
  }, 30_000);

  it('12: a corrupt (unparseable) sidecar is no digest: sha256 undefined at once, never Unknown', async () => {
    await bucket.put('k', Buffer.from('bytes'));
    const meta = join(root, META_DIR);
    const [sidecar] = (await readdir(meta)).filter((f) => f.endsWith('.json'));
    for (const junk of ['', '{"key": "k", "sha2', '[]', '{"key":"k","sha256":"nothex","size":5,"metadata":{}}']) {
      await writeFile(join(meta, sidecar!), junk);
      const started = Date.now();
      const info = await bucket.stat('k');
      expect(info.sha256, junk).toBeUndefined();
      const got = await bucket.get('k');
      expect(got.info.sha256).toBeUndefined();
      expect((await readAll(got.stream)).toString()).toBe('bytes');
      const listed = await bucket.list('').next();
      expect(listed.value?.sha256).toBeUndefined();
      expect(Date.now() - started).toBeLessThan(1000);
    }
  });
});

describe('filesystem backend: ifMatch (decision 7), atomic', () => {
  let dir: Awaited<ReturnType<typeof tempDir>>;
  let bucket: Bucket;
  beforeEach(async () => {
    dir = await tempDir('stevedore-fsifm-');
    bucket = new Bucket(new FsDriver({ root: dir.path }));
  });
  afterEach(() => dir.remove());

  it('says it is atomic', () => {
    expect(bucket.atomicIfMatch).toBe(true);
  });

  it('put with the current etag succeeds; stale or missing is PreconditionFailed and nothing changes', async () => {
    const one = await bucket.put('k', Buffer.from('one'));
    const two = await bucket.put('k', Buffer.from('two'), { ifMatch: one.etag });
    expect((await bucket.stat('k')).etag).toBe(two.etag);
    expect(await codeOf(bucket.put('k', Buffer.from('three'), { ifMatch: one.etag }))).toBe(ErrorCode.PreconditionFailed);
    expect(await codeOf(bucket.put('k', Buffer.from('three'), { ifMatch: 'garbage' }))).toBe(ErrorCode.PreconditionFailed);
    expect(await codeOf(bucket.put('gone', Buffer.from('x'), { ifMatch: two.etag }))).toBe(ErrorCode.PreconditionFailed);
    expect((await readAll((await bucket.get('k')).stream)).toString()).toBe('two');
    expect(await collectKeys(bucket)).toEqual(['k']);
    expect((await filesUnder(dir.path)).filter((f) => !f.endsWith('.json') && f.includes(META_DIR))).toEqual([]);
  });

  it('delete with a stale etag is PreconditionFailed and keeps the object; with the current one deletes; a missing key succeeds', async () => {
    const one = await bucket.put('k', Buffer.from('one'));
    const two = await bucket.put('k', Buffer.from('two'));
    expect(await codeOf(bucket.delete('k', { ifMatch: one.etag }))).toBe(ErrorCode.PreconditionFailed);
    expect((await readAll((await bucket.get('k')).stream)).toString()).toBe('two');
    await bucket.delete('k', { ifMatch: two.etag });
    expect(await collectKeys(bucket)).toEqual([]);
    await bucket.delete('k', { ifMatch: two.etag });
    await bucket.delete('never', { ifMatch: two.etag });
    expect(await filesUnder(dir.path)).toEqual([]);
  });

  // Small bodies of one size, and no fsync in one variant, so the writers reach their commit
  // together: without the claim, several pass the check before the first rename.
  for (const fsync of [true, false]) {
    it(`of conditional writers racing with one etag, exactly one wins, whole (puts and deletes${fsync ? '' : ', no fsync'})`, async () => {
      const b = new Bucket(new FsDriver({ root: join(dir.path, `race-${fsync}`), fsync }));
      for (let round = 0; round < 25; round++) {
        const base = await b.put('k', Buffer.from(`base ${round}`));
        const writers = Array.from({ length: 8 }, (_, i) => Buffer.from(`writer ${round}.${i}`.padEnd(64, '.')));
        // Every body ends at once, when the gate opens: the writers then commit together.
        let open!: () => void;
        const gate = new Promise<void>((r) => { open = r; });
        const gated = (w: Buffer) => Readable.from((async function* () { await gate; yield w; })());
        const racing = Promise.all([
          ...writers.map((w) => b.put('k', gated(w), { ifMatch: base.etag }).then(() => 'ok', (e: unknown) => b.codeOf(e))),
          // A conditional delete joins some rounds (it is quicker than any put, so it would win them all).
          ...(round % 5 === 4 ? [gate.then(() => b.delete('k', { ifMatch: base.etag })).then(() => 'deleted', (e: unknown) => b.codeOf(e))] : []),
        ]);
        await new Promise((r) => setTimeout(r, 20));
        open();
        const outcomes = await racing;
        const wins = outcomes.filter((o) => o === 'ok' || o === 'deleted');
        expect(wins, `round ${round}: ${outcomes.join(',')}`).toHaveLength(1);
        expect(outcomes.filter((o) => o !== 'ok' && o !== 'deleted').every((o) => o === ErrorCode.PreconditionFailed)).toBe(true);
        if (wins[0] === 'deleted') {
          expect(await collectKeys(b)).toEqual([]);
        } else {
          const winner = writers[outcomes.indexOf('ok')]!;
          const got = await b.get('k');
          expect(sha(await readAll(got.stream))).toBe(sha(winner));
          expect(got.info.sha256).toBe(sha(winner));
        }
      }
    }, 60_000);
  }
});

describe('filesystem backend: containment and URLs', () => {
  let dir: Awaited<ReturnType<typeof tempDir>>;
  afterEach(() => dir.remove());

  it('creates nothing outside the root through a symlinked ancestor, for put and copy destinations', async () => {
    dir = await tempDir('stevedore-fsout-');
    const root = join(dir.path, 'root');
    const outside = join(dir.path, 'outside');
    await mkdir(outside);
    await writeFile(join(outside, 'was-here'), 'x');
    const bucket = new Bucket(new FsDriver({ root }));
    await bucket.put('src', Buffer.from('s'));
    await symlink(outside, join(root, 'link'));
    const before = await entriesUnder(outside);
    for (const key of ['link/new/x', 'link/new/deeper/x', 'link/x']) {
      expect(await codeOf(bucket.put(key, Buffer.from('x'))), key).toBe(ErrorCode.PermissionDenied);
      expect(await codeOf(bucket.copy('src', key)), key).toBe(ErrorCode.PermissionDenied);
      expect(await codeOf(bucket.put(key, Buffer.from('x'), { ifAbsent: true })), key).toBe(ErrorCode.PermissionDenied);
    }
    expect(await entriesUnder(outside)).toEqual(before);
    expect(await readFile(join(outside, 'was-here'), 'utf8')).toBe('x');
  });

  it(`refuses a folder whose ${META_DIR} is a planted symlink: nothing is written, read or removed outside`, async () => {
    dir = await tempDir('stevedore-fsmeta-');
    const root = join(dir.path, 'root');
    const outside = join(dir.path, 'outside');
    await mkdir(outside);
    const info = await new Bucket(new FsDriver({ root })).put('a/x', Buffer.from('x'));
    // What the worker would read as a's metadata or sweep as a's leftovers, were it to follow the link.
    const ino = (await lstat(join(root, 'a/x'), { bigint: true })).ino;
    const own = (await readdir(join(root, 'a', META_DIR)))[0]!;
    await writeFile(join(outside, own), JSON.stringify({ key: 'a/x', sha256: sha(Buffer.from('forged')), size: 1, metadata: {} }));
    await writeFile(join(outside, own.replace(`.${ino}.`, '.1.')), JSON.stringify({ key: 'a/x', sha256: sha(Buffer.from('forged')), size: 1, metadata: {} }));
    await writeFile(join(outside, 'tmp-old'), 'x');
    await utimes(join(outside, 'tmp-old'), 0, 0);
    await rm(join(root, 'a', META_DIR), { recursive: true });
    await symlink(outside, join(root, 'a', META_DIR));
    // A folder another tool made, with a file and the link but never a META_DIR of ours.
    await mkdir(join(root, 'b'));
    await writeFile(join(root, 'b/y'), 'y');
    await symlink(outside, join(root, 'b', META_DIR));
    const before = await entriesUnder(outside);
    // A worker that has not seen these folders within the second it trusts a check.
    const driver = new FsDriver({ root });
    const bucket = new Bucket(driver);
    for (const key of ['a/x', 'a/new', 'b/y', 'b/new']) {
      expect(await codeOf(bucket.put(key, Buffer.from('z'))), key).toBe(ErrorCode.PermissionDenied);
      expect(await codeOf(bucket.put(key, Buffer.from('z'), { ifAbsent: true })), key).toBe(ErrorCode.PermissionDenied);
      expect(await codeOf(bucket.copy('a/x', key)), key).toBe(ErrorCode.PermissionDenied);
    }
    expect(await codeOf(bucket.put('a/x', Buffer.from('z'), { ifMatch: info.etag }))).toBe(ErrorCode.PermissionDenied);
    for (const key of ['a/x', 'b/y']) {
      expect(await codeOf(bucket.stat(key)), key).toBe(ErrorCode.PermissionDenied);
      expect(await codeOf(bucket.get(key)), key).toBe(ErrorCode.PermissionDenied);
      expect(await codeOf(bucket.delete(key)), key).toBe(ErrorCode.PermissionDenied);
    }
    expect(await codeOf(collectKeys(bucket, ''))).toBe(ErrorCode.PermissionDenied);
    await driver.sweep(0);
    expect(await entriesUnder(outside)).toEqual(before);
    expect(await readFile(join(root, 'a/x'), 'utf8')).toBe('x');
    expect(await readFile(join(root, 'b/y'), 'utf8')).toBe('y');
    // A real META_DIR again: the folder works (the refusal was not cached).
    await rm(join(root, 'a', META_DIR));
    await bucket.put('a/x', Buffer.from('z'));
    expect((await bucket.stat('a/x')).sha256).toBe(sha(Buffer.from('z')));
  });

  it(`refuses a write, read or delete in another tool's folder whose ${META_DIR} link was planted after a read trusted the folder`, async () => {
    dir = await tempDir('stevedore-fsmeta-');
    const root = join(dir.path, 'root');
    const outside = join(dir.path, 'outside');
    await mkdir(outside);
    await mkdir(join(root, 'b'), { recursive: true });
    await writeFile(join(root, 'b/y'), 'y');
    // What a read would take as b/y's metadata, or a delete remove, were it to follow the link.
    const ino = (await lstat(join(root, 'b/y'), { bigint: true })).ino;
    const forged = sidecarPath(join(root, 'b'), 'y', ino).slice(join(root, 'b', META_DIR).length + 1);
    await writeFile(join(outside, forged), JSON.stringify({ key: 'b/y', sha256: sha(Buffer.from('y')), size: 1, metadata: {} }));
    const before = await entriesUnder(outside);
    const ops: Array<[string, (b: Bucket) => Promise<unknown>]> = [
      ['put', (b) => b.put('b/new', Buffer.from('z'))], ['get', (b) => b.get('b/y')], ['stat', (b) => b.stat('b/y')],
      ['delete', (b) => b.delete('b/y')], ['list', (b) => collectKeys(b, '')],
    ];
    for (const [name, op] of ops) {
      await rm(join(root, 'b', META_DIR), { force: true });
      const bucket = new Bucket(new FsDriver({ root }));
      // The read caches the folder as inside the root, without META_DIR, for a second.
      expect((await bucket.stat('b/y')).sha256).toBeUndefined();
      await symlink(outside, join(root, 'b', META_DIR));
      expect(await codeOf(op(bucket)), name).toBe(ErrorCode.PermissionDenied);
    }
    expect(await entriesUnder(outside)).toEqual(before);
    expect(await readFile(join(root, 'b/y'), 'utf8')).toBe('y');
  });

  it('refuses a write, read or delete in another tool\'s folder swapped for a symlink out of the root after a read trusted it', async () => {
    dir = await tempDir('stevedore-fsswap-');
    const root = join(dir.path, 'root');
    const outside = join(dir.path, 'outside');
    await mkdir(outside);
    await writeFile(join(outside, 'x'), 'SECRET');
    const before = await entriesUnder(outside);
    const ops: Array<[string, (b: Bucket, etag: string) => Promise<unknown>]> = [
      ['put', (b) => b.put('a/y', Buffer.from('written'))], ['put in a new subfolder', (b) => b.put('a/new/deeper/y', Buffer.from('written'))],
      ['get', (b) => b.get('a/x')], ['stat', (b) => b.stat('a/x')], ['delete', (b) => b.delete('a/x')],
      ['delete ifMatch', (b, etag) => b.delete('a/x', { ifMatch: etag })], ['put ifMatch', (b, etag) => b.put('a/x', Buffer.from('w'), { ifMatch: etag })],
    ];
    for (const [name, op] of ops) {
      await rm(root, { recursive: true, force: true });
      await mkdir(join(root, 'a'), { recursive: true });
      await writeFile(join(root, 'a/x'), 'legacy');
      const bucket = new Bucket(new FsDriver({ root }));
      // The read caches the folder as inside the root, without META_DIR, for a second.
      const { sha256, etag } = await bucket.stat('a/x');
      expect(sha256).toBeUndefined();
      // The deploy swap: the folder moved away, a link out of the root in its place.
      await rm(join(root, 'a'), { recursive: true });
      await symlink(outside, join(root, 'a'));
      expect(await codeOf(op(bucket, etag!)), name).toBe(ErrorCode.PermissionDenied);
      expect(await entriesUnder(outside), name).toEqual(before);
    }
    expect(await readFile(join(outside, 'x'), 'utf8')).toBe('SECRET');
  });

  it('refuses unknown query parameters in file: URLs', () => {
    expect(() => fsDriverFromUrl(new URL('file:///tmp/objects?fsync=false'))).toThrow(/InvalidInput.*unknown parameter "fsync"/);
    expect(() => fsDriverFromUrl(new URL('file:///tmp/objects?a=1&b=2'))).toThrow(/InvalidInput.*unknown parameter "a"/);
    expect(fsDriverFromUrl(new URL('file:///tmp/objects')).root).toBe('/tmp/objects');
  });
});
