import { createHash, randomBytes } from 'node:crypto';
import { request } from 'node:http';
import { CRC32C } from '@google-cloud/storage';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { crc32c, crc32cBase64, startFakeGcs, type FakeGcs } from './gcs-server.js';

/** The wire protocol itself, spoken by hand: what the SDK relies on and what real GCS refuses. */
describe('fake GCS server', () => {
  let gcs: FakeGcs;
  let api: string;
  let up: string;
  const md5 = (b: Uint8Array) => createHash('md5').update(b).digest('base64');
  const o = (name: string) => `${api}/o/${encodeURIComponent(name)}`;
  const json = async (r: Response) => (await r.json()) as Record<string, any>;

  beforeAll(async () => {
    gcs = await startFakeGcs({ buckets: ['bkt'] });
    api = `${gcs.endpoint}/storage/v1/b/bkt`;
    up = `${gcs.endpoint}/upload/storage/v1/b/bkt/o`;
  });
  afterAll(() => gcs.close());

  const media = (name: string, bytes: Uint8Array | string, query = '') =>
    fetch(`${up}?uploadType=media&name=${encodeURIComponent(name)}${query}`, { method: 'POST', body: bytes, headers: { 'content-type': 'text/plain' } });

  /** Sends `chunks` as separate writes, so boundaries and delimiters straddle them. */
  const raw = (url: string, method: string, headers: Record<string, string>, chunks: Buffer[]) =>
    new Promise<{ status: number; headers: Record<string, unknown>; body: string }>((resolve, reject) => {
      const req = request(url, { method, headers }, (res) => {
        let text = '';
        res.on('data', (c: Buffer) => { text += c.toString(); });
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text }));
      });
      req.on('error', reject);
      for (const c of chunks) req.write(c);
      req.end();
    });

  it('computes CRC32C like the SDK and the published check value', () => {
    expect(crc32c(Buffer.from('123456789'))).toBe(0xe3069283);
    expect(crc32cBase64(crc32c(Buffer.alloc(0)))).toBe('AAAAAA==');
    const data = randomBytes(100_003);
    const sdk = new CRC32C();
    sdk.update(data);
    expect(crc32cBase64(crc32c(data.subarray(40_000), crc32c(data.subarray(0, 40_000))))).toBe(sdk.toString());
  });

  it('serves media with the hash, generation and stored-length headers the SDK validates with', async () => {
    const bytes = Buffer.from('hello, range reads');
    const obj = await json(await media('dir/a b%😀', bytes));
    expect(obj).toMatchObject({ name: 'dir/a b%😀', bucket: 'bkt', size: String(bytes.length), md5Hash: md5(bytes), contentType: 'text/plain', metageneration: '1' });
    const r = await fetch(`${o('dir/a b%😀')}?alt=media`);
    expect(r.status).toBe(200);
    expect(r.headers.get('x-goog-hash')).toBe(`crc32c=${obj.crc32c},md5=${md5(bytes)}`);
    expect(r.headers.get('x-goog-generation')).toBe(obj.generation);
    expect(r.headers.get('x-goog-stored-content-encoding')).toBe('identity');
    expect(r.headers.get('x-goog-stored-content-length')).toBe(String(bytes.length));
    expect(Buffer.from(await r.arrayBuffer())).toEqual(bytes);
    const part = await fetch(`${o('dir/a b%😀')}?alt=media`, { headers: { range: 'bytes=7-11' } });
    expect([part.status, part.headers.get('content-range'), await part.text()]).toEqual([206, `bytes 7-11/${bytes.length}`, 'range']);
    expect(await (await fetch(`${o('dir/a b%😀')}?alt=media`, { headers: { range: 'bytes=-5' } })).text()).toBe('reads');
    expect((await fetch(`${o('dir/a b%😀')}?alt=media`, { headers: { range: 'bytes=99-' } })).status).toBe(416);
    expect((await fetch(`${o('dir/a b%😀')}?alt=media&generation=1`)).status).toBe(404);
  });

  it('answers errors with the JSON API error body', async () => {
    const missing = await fetch(o('nope'));
    expect(missing.status).toBe(404);
    expect((await json(missing)).error).toMatchObject({ code: 404, errors: [{ reason: 'notFound' }] });
    await media('exists', 'x');
    const clash = await media('exists', 'y', '&ifGenerationMatch=0');
    expect(clash.status).toBe(412);
    expect((await json(clash)).error).toMatchObject({ code: 412, errors: [{ reason: 'conditionNotMet' }] });
    expect((await fetch(`${gcs.endpoint}/storage/v1/b/nobucket`)).status).toBe(404);
  });

  describe('multipart uploads', () => {
    const boundary = 'b0undary';
    const parts = (meta: object, bytes: Buffer, close = true) => Buffer.concat([
      Buffer.from(`--${boundary}\r\nContent-Type: application/json\r\n\r\n${JSON.stringify(meta)}\r\n--${boundary}\r\nContent-Type: image/png\r\n\r\n`),
      bytes, Buffer.from(close ? `\r\n--${boundary}--` : ''),
    ]);
    const send = (name: string, payload: Buffer, step: number, query = '') => {
      const chunks = [];
      for (let at = 0; at < payload.length; at += step) chunks.push(payload.subarray(at, at + step));
      return raw(`${up}?uploadType=multipart&name=${encodeURIComponent(name)}${query}`, 'POST',
        { 'content-type': `multipart/related; boundary=${boundary}` }, chunks);
    };

    it('streams the media part, even with the delimiter split across writes', async () => {
      // Bytes that look like the start of a delimiter must come through as data.
      const bytes = Buffer.concat([randomBytes(5000), Buffer.from(`\r\n--${boundary.slice(0, 4)}`), randomBytes(5000)]);
      const res = await send('mp', parts({ metadata: { sha256: 'abc' } }, bytes), 7);
      expect(res.status).toBe(200);
      expect(JSON.parse(res.body)).toMatchObject({ size: String(bytes.length), md5Hash: md5(bytes), contentType: 'image/png', metadata: { sha256: 'abc' } });
    });

    it('stores nothing without the closing boundary or with a wrong stated hash', async () => {
      expect((await send('cut', parts({}, randomBytes(1000), false), 100)).status).toBe(400);
      expect((await send('badhash', parts({ md5Hash: md5(Buffer.from('other')) }, randomBytes(1000)), 1000)).status).toBe(400);
      expect((await fetch(o('cut'))).status).toBe(404);
      expect((await fetch(o('badhash'))).status).toBe(404);
    });
  });

  describe('resumable uploads', () => {
    const Q = 256 * 1024;
    const start = async (name: string, headers: Record<string, string> = {}, query = '') => {
      const r = await fetch(`${up}?uploadType=resumable&name=${encodeURIComponent(name)}${query}`, {
        method: 'POST', body: JSON.stringify({ metadata: { k: 'v' } }), headers: { 'content-type': 'application/json', ...headers },
      });
      return { status: r.status, uri: r.headers.get('location') ?? '' };
    };
    const chunk = (uri: string, range: string, bytes: Buffer, extra: Record<string, string> = {}) =>
      raw(uri, 'PUT', { 'content-range': range, 'content-length': String(bytes.length), ...extra }, [bytes]);

    it('persists whole 256 KiB units, answers status queries, and commits only on the final chunk', async () => {
      const bytes = randomBytes(3 * Q + 10);
      const { uri } = await start('res', { 'x-upload-content-type': 'application/x-tar' });
      expect((await chunk(uri, 'bytes 0-1023/*', bytes.subarray(0, 1024))).status).toBe(400);
      const first = await chunk(uri, `bytes 0-${Q + 99}/*`, bytes.subarray(0, Q + 100));
      expect([first.status, first.headers.range]).toEqual([308, `bytes=0-${Q - 1}`]);
      expect((await chunk(uri, `bytes ${2 * Q}-${3 * Q - 1}/*`, bytes.subarray(2 * Q, 3 * Q))).status).toBe(400);
      const query = await raw(uri, 'PUT', { 'content-range': 'bytes */*', 'content-length': '0' }, []);
      expect([query.status, query.headers.range]).toEqual([308, `bytes=0-${Q - 1}`]);
      // A resent chunk overlapping persisted bytes is fine: the overlap is skipped.
      expect((await chunk(uri, `bytes 0-${3 * Q - 1}/*`, bytes.subarray(0, 3 * Q))).headers.range).toBe(`bytes=0-${3 * Q - 1}`);
      expect((await fetch(o('res'))).status).toBe(404);
      const done = await chunk(uri, `bytes ${3 * Q}-${3 * Q + 9}/${bytes.length}`, bytes.subarray(3 * Q));
      expect(done.status).toBe(200);
      expect(JSON.parse(done.body)).toMatchObject({ size: String(bytes.length), md5Hash: md5(bytes), contentType: 'application/x-tar', metadata: { k: 'v' } });
      expect((await raw(uri, 'PUT', { 'content-range': 'bytes */*', 'content-length': '0' }, [])).status).toBe(200);
    });

    it('refuses chunks that do not add up', async () => {
      const bytes = randomBytes(Q + 5);
      const a = await start('sizes', { 'x-upload-content-length': String(Q + 6) });
      expect((await chunk(a.uri, `bytes 0-${Q - 1}/*`, bytes.subarray(0, Q - 1))).status).toBe(400);
      expect((await chunk(a.uri, `bytes 0-${Q + 4}/${Q + 5}`, bytes)).status).toBe(400);
      expect((await fetch(o('sizes'))).status).toBe(404);
      const b = await start('hash');
      expect((await chunk(b.uri, 'bytes 0-4', bytes.subarray(0, 5))).status).toBe(400);
      expect((await chunk(b.uri, `bytes 0-${Q + 4}/${Q + 5}`, bytes, { 'x-goog-hash': `md5=${md5(Buffer.from('x'))}` })).status).toBe(400);
      expect((await fetch(o('hash'))).status).toBe(404);
    });

    it('checks preconditions when the session starts and when it commits', async () => {
      await media('pre', 'x');
      expect((await start('pre', {}, '&ifGenerationMatch=0')).status).toBe(412);
      const { uri } = await start('pre2', {}, '&ifGenerationMatch=0');
      await media('pre2', 'someone else');
      expect((await chunk(uri, 'bytes 0-2/3', Buffer.from('abc'))).status).toBe(412);
      expect(await (await fetch(`${o('pre2')}?alt=media`)).text()).toBe('someone else');
    });

    it('finalises an empty object, and cancels a session', async () => {
      const a = await start('empty');
      expect((await raw(a.uri, 'PUT', { 'content-range': 'bytes */0', 'content-length': '0' }, [])).status).toBe(200);
      expect(await json(await fetch(o('empty')))).toMatchObject({ size: '0', crc32c: 'AAAAAA==' });
      const b = await start('cancelled');
      expect((await fetch(b.uri, { method: 'DELETE' })).status).toBe(499);
      expect((await chunk(b.uri, 'bytes 0-2/3', Buffer.from('abc'))).status).toBe(404);
    });
  });

  describe('metadata, listing and copies', () => {
    it('patches metadata with a new metageneration, under preconditions', async () => {
      const obj = await json(await media('p', 'x'));
      const patch = (query: string, body: object) => fetch(`${o('p')}${query}`, { method: 'PATCH', body: JSON.stringify(body), headers: { 'content-type': 'application/json' } });
      expect((await patch('?ifMetagenerationMatch=1', { metadata: { a: '1', b: '2' } })).status).toBe(200);
      const second = await json(await patch('', { metadata: { a: null }, contentType: 'application/json' }));
      expect(second).toMatchObject({ generation: obj.generation, metageneration: '3', metadata: { b: '2' }, contentType: 'application/json' });
      expect((await patch('?ifMetagenerationMatch=1', {})).status).toBe(412);
      expect((await fetch(`${o('p')}?ifGenerationNotMatch=${obj.generation}`)).status).toBe(412);
      expect((await fetch(`${o('p')}?ifGenerationMatch=1`, { method: 'DELETE' })).status).toBe(412);
      expect((await fetch(`${o('p')}?ifGenerationMatch=${obj.generation}`, { method: 'DELETE' })).status).toBe(204);
      expect((await fetch(o('p'), { method: 'DELETE' })).status).toBe(404);
    });

    it('lists in UTF-8 byte order with prefixes, offsets and page tokens', async () => {
      const names = ['l/b', 'l/a-c', 'l/a/x', 'l/a/y', 'l/é', 'l/z', 'l/a0'];
      for (const n of names) await media(n, n);
      const list = async (query: string) => json(await fetch(`${api}/o?prefix=l/${query}`));
      const all: string[] = [];
      let token = '';
      do {
        const page = await list(`&maxResults=2${token ? `&pageToken=${token}` : ''}`);
        all.push(...(page.items ?? []).map((i: { name: string }) => i.name));
        token = page.nextPageToken ?? '';
      } while (token);
      expect(all).toEqual([...names].sort((x, y) => Buffer.compare(Buffer.from(x), Buffer.from(y))));
      const pages: unknown[] = [];
      token = '';
      do {
        const page = await list(`&delimiter=/&maxResults=2${token ? `&pageToken=${token}` : ''}`);
        pages.push([(page.items ?? []).map((i: { name: string }) => i.name), page.prefixes ?? []]);
        token = page.nextPageToken ?? '';
      } while (token);
      expect(pages).toEqual([[['l/a-c'], ['l/a/']], [['l/a0', 'l/b'], []], [['l/z', 'l/é'], []]]);
      expect(((await list('&startOffset=l/a0&endOffset=l/z')).items as { name: string }[]).map((i) => i.name)).toEqual(['l/a0', 'l/b']);
    });

    it('rewrites and composes with destination preconditions, keeping hashes', async () => {
      const src = await json(await media('c/src', 'abc'));
      await fetch(`${o('c/src')}`, { method: 'PATCH', body: JSON.stringify({ metadata: { sha256: 's' } }), headers: { 'content-type': 'application/json' } });
      const rw = (dst: string, query = '') => fetch(`${o('c/src')}/rewriteTo/b/bkt/o/${encodeURIComponent(dst)}${query}`, { method: 'POST', body: '{}', headers: { 'content-type': 'application/json' } });
      const copied = await json(await rw('c/dst'));
      expect(copied).toMatchObject({ done: true, resource: { name: 'c/dst', md5Hash: src.md5Hash, crc32c: src.crc32c, metadata: { sha256: 's' } } });
      expect((await rw('c/dst', '?ifGenerationMatch=0')).status).toBe(412);
      expect((await rw('c/dst', `?ifSourceGenerationMatch=1`)).status).toBe(412);
      const composed = await json(await fetch(`${o('c/both')}/compose`, {
        method: 'POST', headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ sourceObjects: [{ name: 'c/src' }, { name: 'c/dst' }], destination: { contentType: 'text/plain' } }),
      }));
      expect(composed).toMatchObject({ size: '6', componentCount: 2, crc32c: crc32cBase64(crc32c(Buffer.from('abcabc'))) });
      expect(composed.md5Hash).toBeUndefined();
    });
  });
});
