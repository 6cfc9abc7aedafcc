import { randomBytes, randomUUID } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCode, StorageError } from '../../src/errors.js';
import { Bucket } from '../../src/storage/bucket.js';
import type { Driver } from '../../src/storage/driver.js';
import { tempDir } from '../harness/process.js';
import type { ConformanceTarget } from './target.js';
import { codeOf, collectKeys, readAll, sha } from './util.js';
import { decisionCases } from './decisions.js';

export { codeOf, collectKeys, readAll, sha } from './util.js';

/** A stream that yields `bytes` in uneven chunks, the way sockets and pipes do. */
function chunked(bytes: Buffer, failAfter?: number): Readable {
  return Readable.from((function* () {
    let at = 0;
    let n = 0;
    while (at < bytes.length) {
      const len = Math.min(bytes.length - at, 65_536 + ((n++ * 7919) % 300_000));
      if (failAfter !== undefined && at + len > failAfter) throw Object.assign(new Error('connection reset by test'), { code: 'ECONNRESET' });
      yield bytes.subarray(at, at + len);
      at += len;
    }
  })());
}

/** Counts every driver call, to prove invalid input is refused before any I/O. */
function counting(driver: Driver): { driver: Driver; calls: () => number } {
  let calls = 0;
  const proxy = new Proxy(driver, {
    get(target, prop, receiver) {
      const v = Reflect.get(target, prop, receiver) as unknown;
      if (typeof v !== 'function' || prop === 'classify') return v;
      return (...args: unknown[]) => { calls++; return (v as (...a: unknown[]) => unknown).apply(target, args); };
    },
  });
  return { driver: proxy, calls: () => calls };
}

/** The one suite every backend runs: contract decisions live here, not in per-driver tests. */
export function runConformance(target: ConformanceTarget): void {
  describe(`${target.name} backend conformance`, () => {
    let driver: Driver;
    let tmp: Awaited<ReturnType<typeof tempDir>>;
    const fresh = (pageSize?: number) => new Bucket(driver, { prefix: `t-${randomUUID().slice(0, 8)}`, spoolDir: tmp.path, ...(pageSize ? { pageSize } : {}) });

    beforeAll(async () => {
      driver = await target.driver();
      tmp = await tempDir();
    });
    afterAll(async () => {
      await driver?.close();
      await tmp?.remove();
      await target.teardown();
    });

    decisionCases({ target, driver: () => driver, fresh });

    it('reports healthy', async () => {
      await expect(fresh().health()).resolves.toBeUndefined();
    });

    describe('put and get', () => {
      const big = randomBytes(target.multipartThreshold + 1_048_576 + 123);

      it.each([
        ['empty', Buffer.alloc(0)],
        ['small', Buffer.from('hello, stevedore\n')],
        ['multi-part-sized', big],
      ])('round-trips a %s object from a stream, bytes and a file', async (_name, bytes) => {
        const b = fresh();
        const file = join(tmp.path, randomUUID());
        await writeFile(file, bytes);
        for (const [key, source] of [['s', chunked(bytes)], ['b', bytes], ['f', { path: file }]] as const) {
          const info = await b.put(key, source);
          expect(info).toMatchObject({ key, size: bytes.length, sha256: sha(bytes) });
          const got = await b.get(key);
          expect(got.info).toMatchObject({ key, size: bytes.length, sha256: sha(bytes) });
          const back = await readAll(got.stream);
          expect(back.length).toBe(bytes.length);
          expect(sha(back)).toBe(sha(bytes));
          expect((await b.stat(key)).sha256).toBe(sha(bytes));
        }
      });

      it('stores an object whose expected sha256 matches', async () => {
        const b = fresh();
        const bytes = randomBytes(10_000);
        await expect(b.put('x', chunked(bytes), { sha256: sha(bytes).toUpperCase() })).resolves.toMatchObject({ sha256: sha(bytes) });
      });

      it('keeps content type and user metadata', async () => {
        const b = fresh();
        await b.put('m/obj.tar.gz', Buffer.from('x'), { contentType: 'application/gzip', metadata: { build: '42', site_id: 'web-1' } });
        for (const info of [await b.stat('m/obj.tar.gz'), (await b.get('m/obj.tar.gz')).info]) {
          expect(info.contentType).toBe('application/gzip');
          expect(info.metadata).toEqual({ build: '42', site_id: 'web-1' });
        }
      });

      it('refuses metadata that would not survive every backend', async () => {
        const b = fresh();
        expect(await codeOf(b.put('k', Buffer.from('x'), { metadata: { 'Bad-Name': 'v' } }))).toBe(ErrorCode.InvalidInput);
        expect(await codeOf(b.put('k', Buffer.from('x'), { metadata: { sha256: 'v' } }))).toBe(ErrorCode.InvalidInput);
        expect(await codeOf(b.put('k', Buffer.from('x'), { metadata: { ok: 'line\nbreak' } }))).toBe(ErrorCode.InvalidInput);
        expect(await codeOf(b.stat('k'))).toBe(ErrorCode.NotFound);
      });

      it('overwrites an object whole', async () => {
        const b = fresh();
        await b.put('k', randomBytes(5000), { metadata: { v: '1' } });
        const second = randomBytes(3000);
        await b.put('k', second, { metadata: { v: '2' } });
        const got = await b.get('k');
        expect(sha(await readAll(got.stream))).toBe(sha(second));
        expect(got.info).toMatchObject({ size: 3000, sha256: sha(second), metadata: { v: '2' } });
      });

      it('stores nothing when the source stream fails midway', async () => {
        const b = fresh();
        const bytes = randomBytes(target.multipartThreshold + 2_000_000);
        expect(await codeOf(b.put('broken', chunked(bytes, bytes.length - 1000)))).toBe(ErrorCode.Transient);
        expect(await codeOf(b.stat('broken'))).toBe(ErrorCode.NotFound);
        expect(await collectKeys(b)).toEqual([]);
      });
    });

    describe('ranges', () => {
      const bytes = Buffer.from(Array.from({ length: 1000 }, (_, i) => i % 251));

      it('reads byte ranges and reports the whole size', async () => {
        const b = fresh();
        await b.put('r', bytes);
        const cases: [number, number | undefined][] = [[10, 19], [990, undefined], [0, 0], [999, 999], [500, 5000]];
        for (const [start, end] of cases) {
          const got = await b.get('r', { range: { start, end } });
          expect(got.info.size).toBe(1000);
          expect(await readAll(got.stream)).toEqual(bytes.subarray(start, end === undefined ? undefined : end + 1));
        }
      });

      it('refuses a range that starts past the end, or is malformed', async () => {
        const b = fresh();
        await b.put('r', bytes);
        expect(await codeOf(b.get('r', { range: { start: 1000 } }))).toBe(ErrorCode.InvalidInput);
        expect(await codeOf(b.get('r', { range: { start: 5, end: 2 } }))).toBe(ErrorCode.InvalidInput);
        expect(await codeOf(b.get('r', { range: { start: -1 } }))).toBe(ErrorCode.InvalidInput);
      });
    });

    describe('listing', () => {
      // '-' < '/' < '0' in byte order: a walker that sorts folders by bare name gets this wrong.
      const keys = ['z', 'a0', 'a/b', 'a-c', 'a/b c/d', 'a/c%20', 'b+c#?', 'é/x', 'ü', 'a/😀'];
      const sorted = [...keys].sort((x, y) => Buffer.compare(Buffer.from(x), Buffer.from(y)));

      it('lists every object once, in UTF-8 byte order, across page boundaries', async () => {
        const b = fresh();
        for (const k of keys) await b.put(k, Buffer.from(k));
        expect(await collectKeys(b)).toEqual(sorted);
        for (const pageSize of [1, 2, 3, 1000]) {
          expect(await collectKeys(b, '', pageSize)).toEqual(sorted);
        }
        const items = [];
        for await (const o of b.list('')) items.push(o);
        expect(items.find((o) => o.key === 'ü')?.size).toBe(Buffer.byteLength('ü'));
      });

      it('filters by a plain string prefix', async () => {
        const b = fresh();
        for (const k of keys) await b.put(k, Buffer.from(k));
        expect(await collectKeys(b, 'a/')).toEqual(sorted.filter((k) => k.startsWith('a/')));
        expect(await collectKeys(b, 'a', 2)).toEqual(sorted.filter((k) => k.startsWith('a')));
        expect(await collectKeys(b, 'a/b')).toEqual(['a/b', 'a/b c/d']);
        expect(await collectKeys(b, 'nothing/')).toEqual([]);
      });

      it('round-trips keys with spaces, unicode and percent signs', async () => {
        const b = fresh();
        for (const k of ['with space/file name.txt', 'ünï/cödé 😀', '100%/a%2Fb', 'plus+and&amp=1']) {
          await b.put(k, Buffer.from(k));
          expect((await readAll((await b.get(k)).stream)).toString()).toBe(k);
          expect(await collectKeys(b, k)).toEqual([k]);
        }
      });
    });

    describe('errors', () => {
      it('reports NotFound for a missing key', async () => {
        const b = fresh();
        expect(await codeOf(b.get('missing'))).toBe(ErrorCode.NotFound);
        expect(await codeOf(b.stat('missing'))).toBe(ErrorCode.NotFound);
        expect(await codeOf(b.copy('missing', 'other'))).toBe(ErrorCode.NotFound);
      });

      it('names the operation and key in the message', async () => {
        const err = await fresh().stat('no/such key').catch((e: unknown) => e as StorageError);
        expect(err).toBeInstanceOf(StorageError);
        expect((err as StorageError).message).toMatch(/^NotFound: stat "no\/such key"/);
      });

      it('refuses invalid keys before any I/O', async () => {
        const { driver: d, calls } = counting(driver);
        const b = new Bucket(d, { prefix: 'invalid' });
        const bad = ['', '/abs', 'a//b', 'a/', 'a/./b', 'a/../b', '..', 'nul\0byte', 'ctl\u0007', 'del\u007f', 'x'.repeat(1025), 'ü'.repeat(513), 'lone\ud800'];
        for (const key of bad) {
          expect(await codeOf(b.put(key, Buffer.from('x'))), JSON.stringify(key)).toBe(ErrorCode.InvalidInput);
          expect(await codeOf(b.get(key))).toBe(ErrorCode.InvalidInput);
          expect(await codeOf(b.stat(key))).toBe(ErrorCode.InvalidInput);
          expect(await codeOf(b.delete(key))).toBe(ErrorCode.InvalidInput);
          expect(await codeOf(b.copy('ok', key))).toBe(ErrorCode.InvalidInput);
        }
        expect(await codeOf(collectKeys(b, '../'))).toBe(ErrorCode.InvalidInput);
        expect(calls()).toBe(0);
      });
    });

    describe('checksums', () => {
      it('stores nothing when the expected sha256 differs, and leaves an existing object intact', async () => {
        const b = fresh();
        const bytes = randomBytes(20_000);
        expect(await codeOf(b.put('k', chunked(bytes), { sha256: sha(Buffer.from('other')) }))).toBe(ErrorCode.ChecksumMismatch);
        expect(await codeOf(b.stat('k'))).toBe(ErrorCode.NotFound);
        const original = randomBytes(1000);
        await b.put('k', original);
        expect(await codeOf(b.put('k', bytes, { sha256: sha(original) }))).toBe(ErrorCode.ChecksumMismatch);
        expect(sha(await readAll((await b.get('k')).stream))).toBe(sha(original));
        expect(await collectKeys(b)).toEqual(['k']);
      });

      it('stores nothing when a multi-part-sized stream does not match its expected sha256', async () => {
        const b = fresh();
        const bytes = randomBytes(target.multipartThreshold + 1_500_000);
        expect(await codeOf(b.put('big', chunked(bytes), { sha256: sha(Buffer.from('other')) }))).toBe(ErrorCode.ChecksumMismatch);
        expect(await codeOf(b.stat('big'))).toBe(ErrorCode.NotFound);
      });

      it('checks an expected sha256 on read in the same pass, and reports the digest', async () => {
        const b = fresh();
        const bytes = randomBytes(50_000);
        await b.put('r', bytes);
        const got = await b.get('r', { sha256: sha(bytes) });
        expect(sha(await readAll(got.stream))).toBe(sha(bytes));
        expect(got.digest()).toEqual({ sha256: sha(bytes), size: bytes.length });
        expect(await codeOf(b.get('r', { sha256: sha(Buffer.from('other')) }))).toBe(ErrorCode.ChecksumMismatch);
        expect(await codeOf(b.get('r', { sha256: sha(bytes), range: { start: 1 } }))).toBe(ErrorCode.InvalidInput);
      });

      it('catches stored bytes that rotted, on a full read', async () => {
        const b = fresh();
        const bytes = randomBytes(4096);
        await b.put('rot', bytes);
        const flipped = Buffer.from(bytes);
        flipped[100] = (flipped[100] ?? 0) ^ 0x01;
        await target.corrupt(`${b.prefix}rot`, flipped);
        const err = await b.get('rot').then((got) => readAll(got.stream)).then(() => undefined, (e: unknown) => e);
        expect(err).toBeInstanceOf(StorageError);
        expect((err as StorageError).code).toBe(ErrorCode.ChecksumMismatch);
      });
    });

    describe('concurrency and preconditions', () => {
      it('refuses ifAbsent when the key exists, keeping the original', async () => {
        const b = fresh();
        const first = Buffer.from('first');
        await b.put('k', first, { ifAbsent: true });
        expect(await codeOf(b.put('k', Buffer.from('second'), { ifAbsent: true }))).toBe(ErrorCode.PreconditionFailed);
        expect((await readAll((await b.get('k')).stream)).toString()).toBe('first');
      });

      it('lets exactly one of several racing ifAbsent writers win, whole', async () => {
        const b = fresh();
        const bodies = Array.from({ length: 4 }, () => randomBytes(200_000));
        const results = await Promise.allSettled(bodies.map((body) => b.put('race', chunked(body), { ifAbsent: true })));
        const won = results.filter((r) => r.status === 'fulfilled');
        for (const r of results) {
          if (r.status === 'rejected') expect((r.reason as StorageError).code).toBe(ErrorCode.PreconditionFailed);
        }
        if (driver.atomicIfAbsent) expect(won).toHaveLength(1);
        else expect(won.length).toBeGreaterThanOrEqual(1);
        const got = await b.get('race');
        const digest = sha(await readAll(got.stream));
        expect(bodies.map(sha)).toContain(digest);
        expect(got.info.sha256).toBe(digest);
      });

      it('ends with one whole object when different writers race on a key', async () => {
        const b = fresh();
        const bodies = Array.from({ length: 4 }, () => randomBytes(300_000));
        await Promise.all(bodies.map((body) => b.put('k', chunked(body))));
        const got = await b.get('k');
        const digest = sha(await readAll(got.stream));
        expect(bodies.map(sha)).toContain(digest);
        expect((await b.stat('k')).sha256).toBe(digest);
      });

      it('gives the same object when the same write runs twice at once', async () => {
        const b = fresh();
        const body = randomBytes(300_000);
        const [x, y] = await Promise.all([b.put('k', chunked(body)), b.put('k', body)]);
        expect(x.sha256).toBe(sha(body));
        expect(y.sha256).toBe(sha(body));
        expect(sha(await readAll((await b.get('k')).stream))).toBe(sha(body));
      });
    });

    describe('splice', () => {
      // An object the splices below edit: two copied ranges around new bytes, and the ranges a
      // caller would have hashed (all of it, in 64 KiB pieces) for a driver that sends old bytes.
      const old = randomBytes(600_000);
      const fresh5 = Buffer.from('fresh');
      const pieces = [{ copy: { offset: 0, length: 200_000 } }, { bytes: fresh5 }, { copy: { offset: 250_000, length: 350_000 } }];
      const want = Buffer.concat([old.subarray(0, 200_000), fresh5, old.subarray(250_000)]);
      const checked = Array.from({ length: Math.ceil(old.length / 65_536) }, (_, i) => {
        const offset = i * 65_536;
        return { offset, length: Math.min(65_536, old.length - offset), sha256: sha(old.subarray(offset, offset + 65_536)) };
      });
      const opts = (ifMatch: string) => ({ ifMatch, sha256: sha(want), size: want.length, checked, contentType: 'application/x-edit', metadata: { build: '9' } });

      it('assembles an object from ranges of its current version and new bytes, or resolves undefined with nothing written where the store cannot', async () => {
        const b = fresh();
        const was = await b.put('s/k', old);
        expect(b.canSplice).toBe(target.splices ?? false);
        const info = await b.splice('s/k', pieces, opts(was.etag!));
        if (!target.splices) {
          expect(info).toBeUndefined();
          expect(b.canSplice).toBe(false);
          expect((await b.stat('s/k')).etag).toBe(was.etag);
          expect(sha(await readAll((await b.get('s/k')).stream))).toBe(sha(old));
          return;
        }
        expect(info).toMatchObject({ key: 's/k', size: want.length, sha256: sha(want) });
        const got = await b.get('s/k');
        expect(sha(await readAll(got.stream))).toBe(sha(want));
        expect(got.info).toMatchObject({ size: want.length, sha256: sha(want), contentType: 'application/x-edit', metadata: { build: '9' } });
      });

      it('fails PreconditionFailed when the version it names was replaced, and leaves the new version whole', async () => {
        const b = fresh();
        const was = await b.put('s/k', old);
        const other = randomBytes(600_000);
        await b.put('s/k', other);
        const outcome = await b.splice('s/k', pieces, opts(was.etag!)).then((info) => info, (err: unknown) => err);
        if (target.splices) expect(outcome).toMatchObject({ code: ErrorCode.PreconditionFailed });
        else expect(outcome).toBeUndefined();
        expect(sha(await readAll((await b.get('s/k')).stream))).toBe(sha(other));
      });
    });

    describe('delete and copy', () => {
      it('deletes an object, and deleting a missing key succeeds', async () => {
        const b = fresh();
        await b.put('d/k', Buffer.from('x'));
        await b.delete('d/k');
        expect(await codeOf(b.stat('d/k'))).toBe(ErrorCode.NotFound);
        expect(await collectKeys(b)).toEqual([]);
        await expect(b.delete('d/k')).resolves.toBeUndefined();
        await expect(b.delete('never/was')).resolves.toBeUndefined();
      });

      it('copies within the backend with bytes, digest and metadata', async () => {
        const b = fresh();
        const bytes = randomBytes(70_000);
        await b.put('src/a', bytes, { contentType: 'application/octet-stream', metadata: { build: '7' } });
        const info = await b.copy('src/a', 'dst/b');
        expect(info).toMatchObject({ key: 'dst/b', size: bytes.length, sha256: sha(bytes) });
        const got = await b.get('dst/b');
        expect(sha(await readAll(got.stream))).toBe(sha(bytes));
        expect(got.info).toMatchObject({ sha256: sha(bytes), contentType: 'application/octet-stream', metadata: { build: '7' } });
        expect(await codeOf(b.copy('src/a', 'dst/b', { ifAbsent: true }))).toBe(ErrorCode.PreconditionFailed);
        expect(await collectKeys(b)).toEqual(['dst/b', 'src/a']);
      });
    });
  });
}
