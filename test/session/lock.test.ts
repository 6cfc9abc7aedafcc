import { randomBytes } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RepackPayload, repackSession } from '../../jobs/repack-session.js';
import { FsDriver } from '../../src/backends/fs.js';
import { parsePayload } from '../../src/payload.js';
import { redisConnection } from '../../src/queue/connection.js';
import { RedisLocks } from '../../src/queue/lock.js';
import { Bucket } from '../../src/storage/bucket.js';
import { sessionKey } from '../../src/session/ids.js';
import { tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { jobDeps } from './helpers.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const never = new AbortController().signal;

describe('RedisLocks (session locks)', () => {
  let redis: TestRedis;
  let conn: Redis;
  let tmp: Awaited<ReturnType<typeof tempDir>>;

  beforeAll(async () => {
    [redis, tmp] = await Promise.all([startRedis(), tempDir('stevedore-lock-')]);
    conn = redisConnection(redis.url, 'worker');
  });
  afterAll(async () => {
    await conn?.quit();
    await redis?.stop();
    await tmp?.remove();
  });

  it('holds a key under the queue prefix (hash tag included) while leased, and removes it on release', async () => {
    const locks = new RedisLocks(conn, { prefix: '{stevedore}', queue: 'q1' });
    const lease = await locks.acquire('session:a__b__c', never);
    expect(locks.key('session:a__b__c')).toBe('{stevedore}:q1:lock:session:a__b__c');
    expect(await conn.get('{stevedore}:q1:lock:session:a__b__c')).toMatch(/^[0-9a-f]{32}$/);
    expect(await conn.pttl('{stevedore}:q1:lock:session:a__b__c')).toBeGreaterThan(25_000);
    await lease.release();
    expect(await conn.exists('{stevedore}:q1:lock:session:a__b__c')).toBe(0);
  });

  it('makes a second holder wait until the first releases, and renews while held', async () => {
    const locks = new RedisLocks(conn, { prefix: 'bull', queue: 'q2', ttlMs: 600 });
    const first = await locks.acquire('x', never);
    let got = false;
    const second = locks.acquire('x', never).then((l) => { got = true; return l; });
    // Held past several TTLs: renewed, so the second waiter never gets in.
    await sleep(1500);
    expect(got).toBe(false);
    expect(first.signal.aborted).toBe(false);
    await first.release();
    const lease = await second;
    expect(got).toBe(true);
    await lease.release();
  });

  it('gives up waiting after waitMs with Transient, and at once when the wait is aborted', async () => {
    const locks = new RedisLocks(conn, { prefix: 'bull', queue: 'q3', waitMs: 300 });
    const held = await locks.acquire('busy', never);
    const started = Date.now();
    await expect(locks.acquire('busy', never)).rejects.toMatchObject({ code: 'Transient', message: expect.stringMatching(/still busy/) });
    expect(Date.now() - started).toBeLessThan(2000);
    const stop = new AbortController();
    setTimeout(() => stop.abort(), 50);
    await expect(new RedisLocks(conn, { prefix: 'bull', queue: 'q3' }).acquire('busy', stop.signal)).rejects.toMatchObject({ code: 'Transient' });
    await held.release();
  });

  it("aborts a lease whose key another holder took, and its release leaves the other holder's lock alone", async () => {
    const locks = new RedisLocks(conn, { prefix: 'bull', queue: 'q4', ttlMs: 600 });
    const lease = await locks.acquire('y', never);
    await conn.set(locks.key('y'), 'someone-else', 'PX', 10_000);
    await sleep(450);
    expect(lease.signal.aborted).toBe(true);
    expect(String((lease.signal.reason as Error).message)).toMatch(/^Transient: lock "y" lost: another holder/);
    await lease.release();
    expect(await conn.get(locks.key('y'))).toBe('someone-else');
  });

  it('aborts a lease it cannot renew (Redis away) before its TTL runs out', async () => {
    const own = redisConnection(redis.url, 'worker');
    const locks = new RedisLocks(own, { prefix: 'bull', queue: 'q5', ttlMs: 900 });
    const lease = await locks.acquire('z', never);
    const acquired = Date.now();
    own.disconnect();
    await new Promise<void>((resolve) => lease.signal.addEventListener('abort', () => resolve(), { once: true }));
    // Given up while the key could still be ours: no one else could have taken it yet.
    expect(Date.now() - acquired).toBeLessThan(900);
    await lease.release();
  });

  it('a repack whose lock is lost mid-rewrite fails Transient and leaves the archive as it was', async () => {
    const root = join(tmp.path, 'objects');
    const staging = join(tmp.path, 'staging');
    await mkdir(staging, { recursive: true });
    const bucket = new Bucket(new FsDriver({ root }));
    const s = 'o__r__lost';
    const d0 = jobDeps(bucket, conn, staging, { queue: 'q6', jobId: 'seed' });
    await repackSession(parsePayload(RepackPayload, { session: s, ops: [{ op: 'put', path: 'a', text: 'a' }] }), d0);
    const before = await readFile(join(root, sessionKey(s)));
    await writeFile(join(staging, 'big.bin'), randomBytes(48 << 20));
    const d = jobDeps(bucket, conn, staging, { queue: 'q6', jobId: 'slow', ttlMs: 600 });
    const locks = new RedisLocks(conn, { prefix: 'bull', queue: 'q6' });
    const job = repackSession(parsePayload(RepackPayload, { session: s, ops: [{ op: 'put', path: 'big', source: { path: 'big.bin' } }] }), d);
    // Another holder takes the session once the job holds it (as after a pause longer than the lock).
    for (let i = 0; i < 200 && !(await conn.exists(locks.key(`session:${s}`))); i++) await sleep(5);
    await conn.set(locks.key(`session:${s}`), 'intruder', 'PX', 10_000);
    await expect(job).rejects.toMatchObject({ code: 'Transient', message: expect.stringMatching(/^Transient: lock "session:o__r__lost" lost/) });
    expect(Buffer.compare(await readFile(join(root, sessionKey(s))), before)).toBe(0);
    expect(await conn.get(locks.key(`session:${s}`))).toBe('intruder');
  });
});
