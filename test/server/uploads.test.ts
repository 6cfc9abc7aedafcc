import { connect } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { randomBody, send } from './http.js';
import { eventually, stagedFiles, testServer, type TestServer } from './harness.js';

const LIMIT = 2 << 20;

describe('uploads: limits and broken clients (RELIABILITY #26, #27)', () => {
  let redis: TestRedis;
  let t: TestServer;
  let port: number;
  beforeAll(async () => {
    redis = await startRedis();
    t = await testServer(redis.url, { env: { STEVEDORE_MAX_UPLOAD_BYTES: String(LIMIT) } });
    port = Number(new URL(await t.listen()).port);
  });
  afterAll(async () => {
    await t?.close();
    await redis?.stop();
  });

  const nothingLeft = async () => {
    expect(await t.app.client().queue.count()).toBe(0);
    expect(await stagedFiles(t.stagingDir)).toEqual([]);
    expect((await t.server.inject({ method: 'HEAD', url: '/sites/s/artifacts/b', headers: t.auth })).statusCode).toBe(404);
  };

  it('a Content-Length over the limit is 413 before a byte is read', async () => {
    const res = await t.server.inject({ method: 'PUT', url: '/sites/s/artifacts/b', headers: { ...t.auth, 'content-length': String(LIMIT + 1) }, payload: Buffer.alloc(LIMIT + 1) });
    expect(res.statusCode).toBe(413);
    expect(res.json()).toMatchObject({ error: 'InvalidInput' });
    await nothingLeft();
  });

  it('a chunked body that grows past the limit is 413 once the count passes it; staging is cleaned', async () => {
    // A raw socket, so the answer is read for certain: the body stops one byte past the limit (and
    // before its closing CRLF), so the server has read everything sent when it answers and closes.
    // A client still sending would make the close a reset, which can discard the answer unread.
    const sock = connect(port, '127.0.0.1');
    await new Promise((r) => sock.once('connect', r));
    let answer = '';
    sock.on('data', (c: Buffer) => { answer += c.toString('latin1'); });
    const closed = new Promise<void>((r) => sock.once('close', () => r()));
    const write = (b: string | Buffer) => new Promise<void>((ok, fail) => sock.write(b, (err) => (err ? fail(err) : ok())));
    await write(`PUT /sites/s/artifacts/b HTTP/1.1\r\nHost: x\r\nAuthorization: ${t.auth.authorization}\r\nTransfer-Encoding: chunked\r\n\r\n`);
    const chunk = 64 << 10;
    for (let sent = 0; sent < LIMIT && answer === ''; sent += chunk) await write(Buffer.concat([Buffer.from(`${chunk.toString(16)}\r\n`), Buffer.alloc(chunk, 5), Buffer.from('\r\n')]));
    // Nothing may be refused while the body is within the limit.
    expect(answer).toBe('');
    await write('1\r\nX');
    await closed;
    const [head, body] = answer.split('\r\n\r\n');
    expect(head).toMatch(/^HTTP\/1\.1 413 /);
    expect(head!.toLowerCase()).toContain('connection: close');
    expect(JSON.parse(body!)).toMatchObject({ error: 'InvalidInput', message: expect.stringContaining(String(LIMIT)) });
    await eventually(async () => (await stagedFiles(t.stagingDir)).length === 0, 'staging empty');
    await nothingLeft();
    // Exactly at the limit is accepted.
    const ok = await send(`${t.url}/sites/s/artifacts/at-limit?wait=30`, 'PUT', randomBody(LIMIT).stream, { ...t.auth, 'transfer-encoding': 'chunked' });
    expect(ok.status, ok.body).toBe(200);
  });

  it('a Content-Length that is not digits is 400 before a byte is read, on every upload route', async () => {
    for (const bad of ['abc', '1e3', '-1', '12 ', '0x10']) {
      const art = await t.server.inject({ method: 'PUT', url: '/sites/s/artifacts/b', headers: { ...t.auth, 'content-length': bad }, payload: Buffer.alloc(4) });
      expect(art.statusCode, bad).toBe(400);
      expect(art.json()).toMatchObject({ error: 'InvalidInput', message: expect.stringContaining('Content-Length') });
      for (const url of ['/api/storage-worker/sessions/o__r__b/files/f', '/api/storage-worker/sessions/o__r__b/upload']) {
        const res = await t.server.inject({ method: url.endsWith('upload') ? 'POST' : 'PUT', url, headers: { ...t.auth, 'content-length': bad }, payload: Buffer.alloc(4) });
        expect(res.statusCode, `${url} ${bad}`).toBe(400);
        expect(res.json()).toMatchObject({ error: 'invalid_request' });
      }
    }
    await nothingLeft();
  });

  it('under the session routes the limit is upload_too_large', async () => {
    const res = await t.server.inject({ method: 'PUT', url: '/api/storage-worker/sessions/o__r__b/files/big', headers: { ...t.auth, 'content-length': String(LIMIT + 1) }, payload: Buffer.alloc(LIMIT + 1) });
    expect(res.statusCode).toBe(413);
    expect(res.json()).toMatchObject({ error: 'upload_too_large' });
  });

  it('a client that disconnects mid-upload leaves nothing enqueued and no staged file; the server serves on', async () => {
    const before = await t.app.client().queue.count();
    const sock = connect(port, '127.0.0.1');
    await new Promise((r) => sock.once('connect', r));
    sock.write(`PUT /sites/s/artifacts/cut HTTP/1.1\r\nHost: x\r\nAuthorization: ${t.auth.authorization}\r\nContent-Length: ${LIMIT}\r\n\r\n`);
    sock.write(Buffer.alloc(LIMIT / 2, 7));
    // The partial upload is being staged...
    await eventually(async () => (await stagedFiles(t.stagingDir)).length === 1, 'a temp file being written');
    sock.destroy();
    // ...and is gone once the server saw the disconnect.
    await eventually(async () => (await stagedFiles(t.stagingDir)).length === 0, 'staging empty after the disconnect');
    expect(await t.app.client().queue.count()).toBe(before);
    expect((await t.server.inject({ method: 'HEAD', url: '/sites/s/artifacts/cut', headers: t.auth })).statusCode).toBe(404);
    expect((await send(`${t.url}/health`, 'GET', undefined)).status).toBe(200);
  });
});
