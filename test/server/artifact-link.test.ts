// Issue 11, "an artifact is written once": on the filesystem backend the store job of an HTTP
// artifact PUT links the staged file into place (the object IS the staged inode) instead of copying it.
import { createHash } from 'node:crypto';
import { lstat, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { fetchDigest, randomBody, send } from './http.js';
import { eventually, stagedFiles, testServer, type TestServer } from './harness.js';

const SIZE = 5 << 20;

describe('artifact PUT on the filesystem backend: the staged file is linked, not copied', () => {
  let redis: TestRedis;
  let t: TestServer;
  let root: string;
  beforeAll(async () => {
    redis = await startRedis();
    // No worker at first: the staged file of a 202 upload can be looked at before its job runs.
    t = await testServer(redis.url, { worker: false });
    root = join(t.dir, 'objects');
    await t.listen();
  });
  afterAll(async () => {
    await t?.close();
    await redis?.stop();
  });

  it('stores the staged inode itself, removes the staged name after the job, and GET verifies the bytes', async () => {
    const body = randomBody(SIZE);
    const put = await send(`${t.url}/sites/linked/artifacts/b1`, 'PUT', body.stream, t.auth);
    expect(put.status, put.body).toBe(202);
    const { id } = JSON.parse(put.body) as { id: string };
    const [staged, ...more] = await stagedFiles(t.stagingDir);
    expect(more).toEqual([]);
    const stagedIno = (await lstat(staged!)).ino;
    // Without X-Content-SHA256 the server did not hash the body: the job hashes it as it stores it.
    const data = (await t.app.client().getJob(id))!.data as { source: unknown; sha256?: string };
    expect(data.source).toEqual({ path: expect.stringMatching(/^incoming\/http-/), consume: true });
    expect(data.sha256).toBeUndefined();

    await t.startWorker();
    await eventually(async () => {
      const job = await send(`${t.url}/jobs/${id}`, 'GET', undefined, t.auth);
      return (JSON.parse(job.body) as { state: string }).state === 'completed';
    }, 'the store job completed', 30_000);
    await eventually(async () => (await stagedFiles(t.stagingDir)).length === 0, 'the staged name removed');

    const object = join(root, 'sites/linked/artifacts/b1.tar.gz');
    const st = await lstat(object);
    expect(st.ino).toBe(stagedIno);
    // Only the object's name is left on the inode: the staged name is gone, no temp name remains.
    expect(st.nlink).toBe(1);
    expect(st.size).toBe(SIZE);
    expect((await readdir(join(root, 'sites/linked/artifacts/.stevedore'))).filter((f) => f.startsWith('tmp-'))).toEqual([]);

    const got = await fetchDigest(`${t.url}/sites/linked/artifacts/b1`, t.auth);
    expect(got).toMatchObject({ status: 200, size: SIZE, sha256: body.sha256() });
    expect(got.broken).toBeUndefined();
    expect(got.headers.etag).toBe(`"${body.sha256()}"`);
  });

  it('a ?wait PUT is stored whole and verified, and leaves nothing staged', async () => {
    const body = randomBody(SIZE);
    const put = await send(`${t.url}/sites/linked/artifacts/b2?wait=60`, 'PUT', body.stream, t.auth);
    expect(put.status, put.body).toBe(200);
    expect(JSON.parse(put.body)).toMatchObject({ size: SIZE, sha256: body.sha256() });
    expect(await stagedFiles(t.stagingDir)).toEqual([]);
    expect((await lstat(join(root, 'sites/linked/artifacts/b2.tar.gz'))).nlink).toBe(1);
    const got = await fetchDigest(`${t.url}/sites/linked/artifacts/b2`, t.auth);
    expect(got).toMatchObject({ status: 200, size: SIZE, sha256: body.sha256() });
  });

  it('with X-Content-SHA256 the server checks the body and the job gets the received digest', async () => {
    const body = Buffer.from('checked as it arrives');
    const sha = createHash('sha256').update(body).digest('hex');
    const put = await send(`${t.url}/sites/linked/artifacts/b4`, 'PUT', body, { ...t.auth, 'x-content-sha256': sha });
    expect(put.status, put.body).toBe(202);
    const job = (await t.app.client().getJob((JSON.parse(put.body) as { id: string }).id))!;
    expect(job.data).toMatchObject({ sha256: sha, source: { consume: true } });
    await expect(t.app.client().result(job.id!)).resolves.toMatchObject({ sha256: sha, size: body.length });
  });

  it('a wrong X-Content-SHA256 stores nothing', async () => {
    const body = randomBody(SIZE);
    const put = await send(`${t.url}/sites/linked/artifacts/b3?wait=60`, 'PUT', body.stream, { ...t.auth, 'x-content-sha256': 'a'.repeat(64) });
    expect(put.status, put.body).toBe(422);
    expect(await stagedFiles(t.stagingDir)).toEqual([]);
    await expect(lstat(join(root, 'sites/linked/artifacts/b3.tar.gz'))).rejects.toMatchObject({ code: 'ENOENT' });
    expect((await send(`${t.url}/sites/linked/artifacts/b3`, 'GET', undefined, t.auth)).status).toBe(404);
  });
});
