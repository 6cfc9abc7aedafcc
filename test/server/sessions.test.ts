import { createHash } from 'node:crypto';
import { gzipSync, gunzipSync } from 'node:zlib';
import { pack as tarPack, extract as tarExtract } from 'tar-stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sessionLockName } from '../../src/session/ids.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { fetchDigest, send } from './http.js';
import { testServer, type TestServer } from './harness.js';

const API = '/api/storage-worker/sessions';
const sha = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

async function tarGz(files: Record<string, string>): Promise<Buffer> {
  const p = tarPack();
  for (const [name, text] of Object.entries(files)) p.entry({ name, mode: 0o644 }, text);
  p.finalize();
  const chunks: Buffer[] = [];
  for await (const c of p) chunks.push(c as Buffer);
  return gzipSync(Buffer.concat(chunks));
}

async function untar(gz: Buffer): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  const ex = tarExtract();
  const done = new Promise<void>((resolve, reject) => { ex.on('finish', resolve); ex.on('error', reject); });
  ex.on('entry', (h, stream, next) => {
    const parts: Buffer[] = [];
    stream.on('data', (c: unknown) => { parts.push(c as Buffer); });
    stream.on('end', () => { if (h.type === 'file') out[h.name] = Buffer.concat(parts).toString(); next(); });
  });
  ex.end(gunzipSync(gz));
  await done;
  return out;
}

describe('session routes (the session service, /api/storage-worker/sessions)', () => {
  let redis: TestRedis;
  let t: TestServer;
  beforeAll(async () => {
    redis = await startRedis();
    t = await testServer(redis.url);
    await t.listen();
  });
  afterAll(async () => {
    await t?.close();
    await redis?.stop();
  });
  const req = (method: 'GET' | 'HEAD' | 'PUT' | 'DELETE' | 'POST', url: string, payload?: string | Buffer | object, headers: Record<string, string> = {}) =>
    t.server.inject({ method, url: `${API}${url}`, headers: { ...t.auth, ...headers }, ...(payload !== undefined ? { payload } : {}) });

  it('writes a file into a new session, lists, reads, HEADs and deletes it', async () => {
    const put = await send(`${t.url}${API}/acme__site__main/files/src/index.html`, 'PUT', Buffer.from('<h1>hi</h1>'), { ...t.auth, 'content-type': 'text/html' });
    expect(put.status, put.body).toBe(200);
    expect(JSON.parse(put.body)).toMatchObject({ success: true, sessionPath: 'acme__site__main', filePath: 'src/index.html', size: 11 });

    const list = await req('GET', '');
    expect(list.json()).toMatchObject({ count: 1, sessions: [{ sessionPath: 'acme__site__main' }] });
    const one = await req('GET', '/acme__site__main');
    expect(one.json()).toMatchObject({ sessionPath: 'acme__site__main', entries: expect.any(Number) as number, sha256: expect.stringMatching(/^[0-9a-f]{64}$/) as string });
    expect((await req('HEAD', '/acme__site__main')).statusCode).toBe(200);
    const files = await req('GET', '/acme__site__main/files');
    expect(files.json()).toEqual({ sessionPath: 'acme__site__main', count: 1, files: [expect.objectContaining({ path: 'src/index.html', size: 11, sha256: sha('<h1>hi</h1>') })] });

    const got = await fetchDigest(`${t.url}${API}/acme__site__main/files/src/index.html`, t.auth);
    expect(got).toMatchObject({ status: 200, size: 11, sha256: sha('<h1>hi</h1>') });
    expect(got.headers.etag).toBe(`"${sha('<h1>hi</h1>')}"`);
    expect(got.headers['content-type']).toMatch(/^text\/html/);
    const head = await req('HEAD', '/acme__site__main/files/src/index.html');
    expect(head.statusCode).toBe(200);
    expect(head.headers).toMatchObject({ 'content-length': '11', etag: `"${sha('<h1>hi</h1>')}"` });
    const range = await req('GET', '/acme__site__main/files/src/index.html', undefined, { range: 'bytes=4-5' });
    expect(range.statusCode).toBe(206);
    expect(range.body).toBe('hi');

    const del = await req('DELETE', '/acme__site__main/files/src/index.html');
    expect(del.json()).toEqual({ success: true, sessionPath: 'acme__site__main', filePath: 'src/index.html' });
    const gone = await req('GET', '/acme__site__main/files/src/index.html');
    expect(gone.statusCode).toBe(404);
    expect(gone.json()).toMatchObject({ error: 'file_not_found' });
    expect((await req('DELETE', '/acme__site__main/files/src/index.html')).json()).toMatchObject({ error: 'file_not_found' });
  });

  it('If-Match with a stale ETag is 412 precondition_failed and nothing is applied (RELIABILITY #29)', async () => {
    await req('PUT', '/acme__cond__main/files/a.txt', 'one');
    const etag = (await req('HEAD', '/acme__cond__main/files/a.txt')).headers.etag as string;
    expect(etag).toBe(`"${sha('one')}"`);
    expect((await req('PUT', '/acme__cond__main/files/a.txt', 'two', { 'if-match': etag })).statusCode).toBe(200);
    // The ETag read before "two" is stale now.
    const stale = await req('PUT', '/acme__cond__main/files/a.txt', 'three', { 'if-match': etag });
    expect(stale.statusCode).toBe(412);
    expect(stale.json()).toMatchObject({ error: 'precondition_failed' });
    const staleDelete = await req('DELETE', '/acme__cond__main/files/a.txt', undefined, { 'if-match': etag });
    expect(staleDelete.statusCode).toBe(412);
    expect((await req('GET', '/acme__cond__main/files/a.txt')).body).toBe('two');
    expect((await req('DELETE', '/acme__cond__main/files/a.txt', undefined, { 'if-match': `"${sha('two')}"` })).statusCode).toBe(200);
  });

  it('uploads and downloads a whole session as a tarball; a corrupt upload leaves the session as it was', async () => {
    const gz = await tarGz({ 'README.md': '# hello', 'src/app.js': 'console.log(1)' });
    const up = await send(`${t.url}${API}/acme__up__main/upload`, 'POST', gz, { ...t.auth, 'content-type': 'application/gzip' });
    expect(up.status, up.body).toBe(200);
    expect(JSON.parse(up.body)).toMatchObject({ success: true, sessionPath: 'acme__up__main', size: gz.length, sha256: sha(gz) });
    expect((await req('GET', '/acme__up__main/files/src/app.js')).body).toBe('console.log(1)');

    const down = await req('GET', '/acme__up__main/download');
    expect(down.statusCode).toBe(200);
    expect(down.headers['content-type']).toBe('application/gzip');
    expect(down.headers.etag).toBe(`"${sha(gz)}"`);
    expect(await untar(down.rawPayload)).toEqual({ 'README.md': '# hello', 'src/app.js': 'console.log(1)' });

    const bad = await req('POST', '/acme__up__main/upload', Buffer.concat([gz.subarray(0, gz.length - 20), Buffer.alloc(20)]), { 'content-type': 'application/gzip' });
    expect(bad.statusCode).toBe(400);
    expect(bad.json()).toMatchObject({ error: 'invalid_archive' });
    expect((await req('GET', '/acme__up__main')).json()).toMatchObject({ sha256: sha(gz) });
    expect((await req('GET', '/acme__nope__main/download')).json()).toMatchObject({ error: 'session_not_found' });
  });

  it('a whole-session upload waits for the session lock the repacks take', async () => {
    const lease = await t.app.locks().acquire(sessionLockName('acme__locked__main'), new AbortController().signal);
    let answered = false;
    const upload = req('POST', '/acme__locked__main/upload', await tarGz({ f: 'x' }), { 'content-type': 'application/gzip' }).then((r) => { answered = true; return r; });
    // Held by "a repack": the upload must not land meanwhile.
    await new Promise((r) => setTimeout(r, 500));
    expect(answered).toBe(false);
    expect((await req('HEAD', '/acme__locked__main')).statusCode).toBe(404);
    await lease.release();
    expect((await upload).statusCode).toBe(200);
    expect((await req('HEAD', '/acme__locked__main')).statusCode).toBe(200);
  });

  it('deletes sessions one at a time and in bulk', async () => {
    for (const s of ['acme__d1__main', 'acme__d2__main', 'acme__d3__main']) expect((await req('PUT', `/${s}/files/f`, 'x')).statusCode).toBe(200);
    expect((await req('DELETE', '/acme__d1__main')).json()).toEqual({ success: true, sessionPath: 'acme__d1__main' });
    expect((await req('DELETE', '/acme__d1__main')).json()).toMatchObject({ error: 'session_not_found' });
    const bulk = await req('POST', '/bulk-delete', { sessionPaths: ['acme__d2__main', 'acme__d3__main', 'acme__d9__main'] });
    expect(bulk.json()).toEqual({ success: true, count: 2, deleted: ['acme__d2__main', 'acme__d3__main'], notFound: ['acme__d9__main'] });
    expect((await req('HEAD', '/acme__d2__main')).statusCode).toBe(404);
    const badBulk = await req('POST', '/bulk-delete', { sessionPaths: ['acme__ok__main', 'not-a-session'] });
    expect(badBulk.statusCode).toBe(400);
    expect(badBulk.json()).toMatchObject({ error: 'invalid_session_path' });
    // A file delete never creates the session it names.
    expect((await req('DELETE', '/acme__d9__main/files/f')).json()).toMatchObject({ error: 'session_not_found' });
    expect((await req('HEAD', '/acme__d9__main')).statusCode).toBe(404);
  });

  it('keeps every one of concurrent writes into one session', async () => {
    const n = 8;
    const answers = await Promise.all(Array.from({ length: n }, (_, i) => send(`${t.url}${API}/acme__busy__main/files/f${i}.txt`, 'PUT', Buffer.from(`file ${i}`), t.auth)));
    for (const a of answers) expect(a.status, a.body).toBe(200);
    const files = (await req('GET', '/acme__busy__main/files')).json() as { count: number; files: Array<{ path: string }> };
    expect(files.count).toBe(n);
    expect(files.files.map((f) => f.path).sort()).toEqual(Array.from({ length: n }, (_, i) => `f${i}.txt`).sort());
  });

  it('refuses bad session and file paths with 400 in the session service\'s codes, and speaks them for 401 too', async () => {
    for (const s of ['nounderscores', 'a__b', '__repo__main', 'a__b__c%2Fd', 'a__b__..x', 'a__b__%00']) {
      const res = await send(`${t.url}${API}/${s}/files/f`, 'GET', undefined, t.auth);
      expect(res.status, s).toBe(400);
      expect(JSON.parse(res.body)).toMatchObject({ error: 'invalid_session_path' });
    }
    for (const f of ['a//b', 'a/../b', '.', 'x/%00', 'a%5Cb']) {
      const res = await send(`${t.url}${API}/acme__site__main/files/${f}`, 'PUT', Buffer.from('x'), t.auth);
      expect(res.status, f).toBe(400);
      expect(JSON.parse(res.body)).toMatchObject({ error: 'invalid_file_path' });
    }
    const anon = await t.server.inject({ method: 'GET', url: `${API}/acme__site__main` });
    expect(anon.statusCode).toBe(401);
    expect(anon.json()).toMatchObject({ error: 'unauthorized' });
  });
});
