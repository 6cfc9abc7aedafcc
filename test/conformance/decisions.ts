import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { ErrorCode, StorageError } from '../../src/errors.js';
import { DEFAULT_CONTENT_TYPE, type Bucket } from '../../src/storage/bucket.js';
import type { Driver, ObjectInfo } from '../../src/storage/driver.js';
import type { ConformanceTarget } from './target.js';
import { codeOf, collectKeys, readAll, sha } from './util.js';

export interface SuiteContext {
  target: ConformanceTarget;
  driver(): Driver;
  /** A Bucket on a key prefix of its own. */
  fresh(pageSize?: number): Bucket;
}

async function bytesOf(b: Bucket, key: string): Promise<Buffer> {
  return readAll((await b.get(key)).stream);
}

async function listed(b: Bucket, prefix = '', digests = false): Promise<ObjectInfo[]> {
  const out: ObjectInfo[] = [];
  for await (const o of b.list(prefix, { digests })) out.push(o);
  return out;
}

/**
 * The lead's conformance decisions (README, "Decisions"), one describe each, for every backend.
 * A backend that disagrees fails here: no driver file settles a contract question.
 */
export function decisionCases(ctx: SuiteContext): void {
  const { fresh } = ctx;

  describe('decision 1: delete', () => {
    it('of a key that names a folder succeeds and deletes nothing', async () => {
      const b = fresh();
      await b.put('a/b', Buffer.from('inside'));
      await expect(b.delete('a')).resolves.toBeUndefined();
      expect((await bytesOf(b, 'a/b')).toString()).toBe('inside');
      expect(await collectKeys(b)).toEqual(['a/b']);
    });
  });

  describe('decision 2: ranges', () => {
    it('reads zero bytes from {start: 0} of an empty object, and refuses a start past its end', async () => {
      const b = fresh();
      await b.put('empty', Buffer.alloc(0));
      for (const range of [{ start: 0 }, { start: 0, end: 0 }, { start: 0, end: 99 }]) {
        const got = await b.get('empty', { range });
        expect(got.info.size).toBe(0);
        expect((await readAll(got.stream)).length, JSON.stringify(range)).toBe(0);
      }
      expect(await codeOf(b.get('empty', { range: { start: 1 } }))).toBe(ErrorCode.InvalidInput);
      await b.put('ten', Buffer.from('0123456789'));
      expect(await codeOf(b.get('ten', { range: { start: 10 } }))).toBe(ErrorCode.InvalidInput);
      expect(await codeOf(b.get('ten', { range: { start: 11, end: 20 } }))).toBe(ErrorCode.InvalidInput);
    });
  });

  describe('decision 3: copy keeps everything, and never launders rot', () => {
    it('keeps bytes, content type, user metadata and the recorded digest', async () => {
      const b = fresh();
      const bytes = randomBytes(30_000);
      await b.put('s', bytes, { contentType: 'application/gzip', metadata: { build: '9', site: 'w' } });
      await b.copy('s', 'd');
      const got = await b.get('d');
      expect(sha(await readAll(got.stream))).toBe(sha(bytes));
      expect(got.info).toMatchObject({ size: bytes.length, sha256: sha(bytes), contentType: 'application/gzip', metadata: { build: '9', site: 'w' } });
    });

    it('of a rotten source fails ChecksumMismatch, or yields a destination whose full read does', async () => {
      const b = fresh();
      const bytes = randomBytes(8192);
      await b.put('rot', bytes);
      const flipped = Buffer.from(bytes);
      flipped[17] = (flipped[17] ?? 0) ^ 0x40;
      await ctx.target.corrupt(`${b.prefix}rot`, flipped);
      const copied = await b.copy('rot', 'copy').then(() => 'copied', (err: unknown) => (err as StorageError).code);
      if (copied === 'copied') {
        expect((await b.stat('copy')).sha256).toBe(sha(bytes));
        expect(await codeOf(b.get('copy').then((g) => readAll(g.stream)))).toBe(ErrorCode.ChecksumMismatch);
      } else {
        expect(copied).toBe(ErrorCode.ChecksumMismatch);
        expect(await codeOf(b.stat('copy'))).toBe(ErrorCode.NotFound);
      }
    });
  });

  describe('decision 4: default content type', () => {
    it(`reports ${DEFAULT_CONTENT_TYPE} without a contentType on put`, async () => {
      const b = fresh();
      await b.put('plain.txt', Buffer.from('x'));
      await b.put('stream.json', Readable.from([Buffer.from('{}')]));
      for (const key of ['plain.txt', 'stream.json']) {
        expect((await b.stat(key)).contentType).toBe(DEFAULT_CONTENT_TYPE);
        expect((await b.get(key)).info.contentType).toBe(DEFAULT_CONTENT_TYPE);
      }
      for (const o of await listed(b, '', true)) expect(o.contentType).toBe(DEFAULT_CONTENT_TYPE);
      // A listing without metadata (S3) says nothing rather than something else.
      for (const o of await listed(b)) if (o.contentType !== undefined) expect(o.contentType).toBe(DEFAULT_CONTENT_TYPE);
    });
  });

  describe('decision 5: weird keys', () => {
    // An emulator's own limit (s3rver appends a suffix to each object's file name), never a driver's.
    const limit = ctx.target.emulatorSegmentLimit ?? Infinity;
    const fits = (k: string) => k.split('/').every((seg) => Buffer.byteLength(seg) <= limit);
    const keys = [
      'back\\slash', 'dir\\with\\bs/file', ' leading', 'trailing ', ' both /  in / folders ', `${'s'.repeat(255)}`,
      `deep/${'t'.repeat(255)}/x`, `${'ü'.repeat(127)}/ü`, 'pct%41%2F', 'a+b', 'q?x=1', 'h#frag', 'sp ace/x y',
      Array.from({ length: 40 }, (_, i) => `d${i}`).join('/'),
    ].filter(fits);

    it('round-trips backslashes, spaces at both ends, 255-byte segments and deep paths', async () => {
      const b = fresh();
      for (const key of keys) {
        await b.put(key, Buffer.from(key));
        expect((await bytesOf(b, key)).toString(), JSON.stringify(key)).toBe(key);
        expect((await b.stat(key)).size).toBe(Buffer.byteLength(key));
      }
      expect(await collectKeys(b)).toEqual([...keys].sort((x, y) => Buffer.compare(Buffer.from(x), Buffer.from(y))));
      for (const key of keys) await b.delete(key);
      expect(await collectKeys(b)).toEqual([]);
    });

    // Where the emulator cannot hold 300 bytes (s3rver: 233), the longest segment it can hold stands in;
    // real S3 takes 1024-byte keys with any segment length.
    const longSegment = Math.min(300, limit);
    it(`stores a segment longer than 255 bytes (${longSegment} here), or refuses it as InvalidInput`, async () => {
      const b = fresh();
      const key = `long/${'l'.repeat(longSegment)}`;
      const put = await b.put(key, Buffer.from('x')).then(() => 'stored', (err: unknown) => (err as StorageError).code);
      if (put === 'stored') expect((await bytesOf(b, key)).toString()).toBe('x');
      else {
        expect(put).toBe(ErrorCode.InvalidInput);
        expect(await codeOf(b.stat(key))).toBe(ErrorCode.InvalidInput);
      }
    });
  });

  describe('decision 6: etags and times', () => {
    it('put returns the etag stat reports; an overwrite changes it and does not go back in time', async () => {
      const b = fresh();
      const first = await b.put('k', Buffer.from('one'));
      const stat1 = await b.stat('k');
      expect(first.etag).toBeDefined();
      expect(stat1.etag).toBe(first.etag);
      // Other bytes: S3's ETag is the MD5 of the content, so a rewrite of the same bytes keeps it there.
      const second = await b.put('k', Buffer.from('two'));
      const stat2 = await b.stat('k');
      expect(stat2.etag).toBe(second.etag);
      expect(second.etag).not.toBe(first.etag);
      // Stores keep times to the second (S3, Azure) or better; allow that resolution.
      expect(stat2.modified.getTime()).toBeGreaterThanOrEqual(Math.floor(stat1.modified.getTime() / 1000) * 1000);
    });
  });

  describe('decision 7: ifMatch', () => {
    it('says whether ifMatch is atomic, so callers can tell', () => {
      expect(fresh().atomicIfMatch).toBe(ctx.driver().atomicIfMatch);
    });

    it('puts with the current etag, and refuses a stale one leaving the object untouched', async () => {
      const b = fresh();
      const v1 = await b.put('k', Buffer.from('v1'), { metadata: { v: '1' } });
      const v2 = await b.put('k', Buffer.from('v2'), { ifMatch: v1.etag!, metadata: { v: '2' } });
      expect(v2.etag).not.toBe(v1.etag);
      expect(await codeOf(b.put('k', Buffer.from('stale'), { ifMatch: v1.etag! }))).toBe(ErrorCode.PreconditionFailed);
      const got = await b.get('k');
      expect((await readAll(got.stream)).toString()).toBe('v2');
      expect(got.info).toMatchObject({ etag: v2.etag, sha256: sha(Buffer.from('v2')), metadata: { v: '2' } });
      // A multi-part-sized stale write is refused too, and nothing of it shows.
      const big = randomBytes(ctx.target.multipartThreshold + 300_000);
      expect(await codeOf(b.put('k', Readable.from([big]), { ifMatch: v1.etag! }))).toBe(ErrorCode.PreconditionFailed);
      expect((await bytesOf(b, 'k')).toString()).toBe('v2');
    });

    it('refuses ifMatch on a missing key, creating nothing', async () => {
      const b = fresh();
      const other = await fresh().put('elsewhere', Buffer.from('x'));
      expect(await codeOf(b.put('missing', Buffer.from('x'), { ifMatch: other.etag! }))).toBe(ErrorCode.PreconditionFailed);
      expect(await codeOf(b.stat('missing'))).toBe(ErrorCode.NotFound);
    });

    it('deletes only the matching version; a missing key still deletes fine', async () => {
      const b = fresh();
      const v1 = await b.put('k', Buffer.from('v1'));
      const v2 = await b.put('k', Buffer.from('v2'));
      expect(await codeOf(b.delete('k', { ifMatch: v1.etag! }))).toBe(ErrorCode.PreconditionFailed);
      expect((await bytesOf(b, 'k')).toString()).toBe('v2');
      await b.delete('k', { ifMatch: v2.etag! });
      expect(await codeOf(b.stat('k'))).toBe(ErrorCode.NotFound);
      await expect(b.delete('k', { ifMatch: v2.etag! })).resolves.toBeUndefined();
    });

    it('copies onto the destination only while it holds the given version', async () => {
      const b = fresh();
      await b.put('src', Buffer.from('new'));
      const d1 = await b.put('dst', Buffer.from('d1'));
      const d2 = await b.put('dst', Buffer.from('d2'));
      expect(await codeOf(b.copy('src', 'dst', { ifMatch: d1.etag! }))).toBe(ErrorCode.PreconditionFailed);
      expect((await bytesOf(b, 'dst')).toString()).toBe('d2');
      await b.copy('src', 'dst', { ifMatch: d2.etag! });
      expect((await bytesOf(b, 'dst')).toString()).toBe('new');
    });
  });

  describe('decision 8: a cancelled or failed put', () => {
    it.each([['cancelled', true], ['failed', false]])('%s mid-stream leaves nothing and keeps the previous object whole', async (_n, cancel) => {
      const b = fresh();
      const previous = randomBytes(ctx.target.multipartThreshold + 100_000);
      await b.put('k', previous);
      const chunk = randomBytes(256 * 1024);
      const size = ctx.target.multipartThreshold * 2 + 500_000;
      // Cut once more than a part has gone out, so the store has started an upload.
      const cutAt = ctx.target.multipartThreshold + 300_000;
      const put = async (key: string) => {
        const ac = new AbortController();
        const stream = Readable.from((async function* () {
          for (let sent = 0; sent < size; sent += chunk.length) {
            if (sent >= cutAt) {
              if (!cancel) throw Object.assign(new Error('source broke'), { code: 'EPIPE' });
              ac.abort();
              await new Promise((r) => setTimeout(r, 50));
            }
            yield chunk;
          }
        })());
        // sha256 given, so digest-first stores stream instead of spooling: the cut is mid-upload.
        return codeOf(b.put(key, stream, { signal: ac.signal, sha256: sha(Buffer.from('whatever')) }));
      };
      expect(await put('k')).not.toBe('resolved');
      expect(sha(await bytesOf(b, 'k'))).toBe(sha(previous));
      expect((await b.stat('k')).sha256).toBe(sha(previous));
      expect(await put('new')).not.toBe('resolved');
      expect(await codeOf(b.stat('new'))).toBe(ErrorCode.NotFound);
      expect(await collectKeys(b)).toEqual(['k']);
    });
  });

  describe('decision 9: copy onto an existing key and onto itself', () => {
    it('replaces an existing destination', async () => {
      const b = fresh();
      await b.put('src', Buffer.from('source'), { metadata: { from: 'src' } });
      await b.put('dst', Buffer.from('old destination'), { metadata: { from: 'dst' } });
      const info = await b.copy('src', 'dst');
      expect(info).toMatchObject({ key: 'dst', size: 6, sha256: sha(Buffer.from('source')) });
      const got = await b.get('dst');
      expect((await readAll(got.stream)).toString()).toBe('source');
      expect(got.info.metadata).toEqual({ from: 'src' });
    });

    it('copies a key onto itself leaving bytes and digest unchanged', async () => {
      const b = fresh();
      const bytes = randomBytes(20_000);
      await b.put('self', bytes, { contentType: 'text/plain', metadata: { m: '1' } });
      const info = await b.copy('self', 'self');
      expect(info).toMatchObject({ key: 'self', size: bytes.length, sha256: sha(bytes) });
      const got = await b.get('self');
      expect(sha(await readAll(got.stream))).toBe(sha(bytes));
      expect(got.info).toMatchObject({ sha256: sha(bytes), contentType: 'text/plain', metadata: { m: '1' } });
      expect(await codeOf(b.copy('self', 'self', { ifAbsent: true }))).toBe(ErrorCode.PreconditionFailed);
    });
  });

  describe('decision 10: listing under concurrent writes', () => {
    it('lists every object present throughout exactly once, in order', async () => {
      const b = fresh(3);
      const stable = Array.from({ length: 24 }, (_, i) => `k${String(i).padStart(2, '0')}`);
      for (const k of stable) await b.put(k, Buffer.from(k));
      // Churn keys sort between the stable ones; some exist before the listing and go away during it.
      const doomed = stable.filter((_, i) => i % 3 === 0).map((k) => `${k}-doomed`);
      for (const k of doomed) await b.put(k, Buffer.from(k));
      const seen: string[] = [];
      let i = 0;
      for await (const o of b.list('')) {
        seen.push(o.key);
        const at = i++;
        await Promise.all([
          b.put(`k${String(at % 24).padStart(2, '0')}-new${at}`, Buffer.from('n')),
          doomed[at] ? b.delete(doomed[at]) : Promise.resolve(),
        ]);
      }
      expect(seen.filter((k) => stable.includes(k))).toEqual(stable);
      expect(new Set(seen).size).toBe(seen.length);
      expect(seen).toEqual([...seen].sort((x, y) => Buffer.compare(Buffer.from(x), Buffer.from(y))));
    });
  });

  describe('decision 11: what a listing carries', () => {
    it('gives every object its etag, size and modified time; digests where listed, or when asked', async () => {
      const b = fresh(2);
      const bodies = new Map([['a', randomBytes(10)], ['b/c', randomBytes(0)], ['d', randomBytes(3000)]]);
      for (const [k, v] of bodies) await b.put(k, v);
      const plain = await listed(b);
      expect(plain.map((o) => o.key)).toEqual(['a', 'b/c', 'd']);
      for (const o of plain) {
        const st = await b.stat(o.key);
        expect(o.etag, o.key).toBeDefined();
        expect(o.etag).toBe(st.etag);
        expect(o.size).toBe(bodies.get(o.key)!.length);
        expect(o.modified).toBeInstanceOf(Date);
        expect(Math.abs(o.modified.getTime() - st.modified.getTime())).toBeLessThan(1000);
        expect(o.modified.getTime()).toBeGreaterThan(Date.UTC(2020, 0));
        if (ctx.driver().listHasDigest) expect(o.sha256).toBe(sha(bodies.get(o.key)!));
        else expect(o.sha256).toBeUndefined();
      }
      for (const o of await listed(b, '', true)) expect(o.sha256).toBe(sha(bodies.get(o.key)!));
    });
  });
}
