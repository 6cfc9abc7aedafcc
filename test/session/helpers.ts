import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, readdir, readlink, lstat, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import type { Redis } from 'ioredis';
import { pino } from 'pino';
import { extract as tarExtract } from 'tar-stream';
import type { JobDeps } from '../../src/payload.js';
import { redisConnection } from '../../src/queue/connection.js';
import { RedisLocks } from '../../src/queue/lock.js';
import type { Bucket } from '../../src/storage/bucket.js';
import { catSession } from '../../src/session/read.js';
import { Staging } from '../../src/staging.js';
import { members, run, type Member } from '../archive/corpus.js';
import { tempDir } from '../harness/process.js';
import { startRedis, type TestRedis } from '../harness/redis.js';

/** What an in-process session test file runs on: its own Redis, a temp dir with an objects root and a staging folder. */
export interface SessionEnv {
  redis: TestRedis;
  conn: Redis;
  tmp: Awaited<ReturnType<typeof tempDir>>;
  /** `<tmp>/objects`, for a filesystem backend (not created). */
  root: string;
  /** `<tmp>/staging`, created. */
  staging: string;
  close(): Promise<void>;
}

export async function sessionEnv(tag: string): Promise<SessionEnv> {
  const [redis, tmp] = await Promise.all([startRedis(), tempDir(tag)]);
  const conn = redisConnection(redis.url, 'worker');
  const staging = join(tmp.path, 'staging');
  await mkdir(staging, { recursive: true });
  return {
    redis, conn, tmp, root: join(tmp.path, 'objects'), staging,
    close: async () => {
      await conn.quit();
      await redis.stop();
      await tmp.remove();
    },
  };
}

/** Hand-built job deps on real Redis locks, for calling the handler directly. */
export function jobDeps(bucket: Bucket, redis: Redis, stagingDir: string, opts: { jobId?: string; enqueuedAt?: number; queue?: string; signal?: AbortSignal; ttlMs?: number; waitMs?: number } = {}): JobDeps {
  return {
    bucket: () => bucket,
    staging: new Staging(stagingDir),
    log: pino({ level: 'silent' }),
    signal: opts.signal ?? new AbortController().signal,
    progress: () => {},
    enqueuedAt: opts.enqueuedAt ?? Date.parse('2026-12-02T09:00:00.000Z'),
    jobId: opts.jobId ?? '1',
    limits: { maxInlineBytes: 1 << 20 },
    locks: new RedisLocks(redis, { prefix: 'bull', queue: opts.queue ?? 'repack-test', ...(opts.ttlMs ? { ttlMs: opts.ttlMs } : {}), ...(opts.waitMs ? { waitMs: opts.waitMs } : {}) }),
  };
}

/**
 * Members without the one PAX record a rewrite may add: `mtime` when it only repeats a pre-1970
 * mtime field, which ustar's octal field cannot hold (GNU tar writes base-256 there, tar-stream
 * PAX). The mtime itself is still compared. Names lose a leading `./` so edits can be matched.
 */
export const comparable = (ms: Member[]): Member[] => ms.map((m) => {
  const { mtime: paxMtime, ...rest } = m.pax;
  const pax = paxMtime !== undefined && Number(paxMtime) === m.mtime && m.mtime < 0 ? rest : m.pax;
  return { ...m, pax };
});

export const plain = (name: string): string => (name === '.' ? '' : name.replace(/^\.\//, '').replace(/\/$/, ''));

/** Entries (name, type, size, sha256 of files) as Node's zlib + tar-stream read them. */
export async function nodeMembers(archive: string): Promise<Array<{ name: string; type: string; size: number; sha256?: string }>> {
  const out: Array<{ name: string; type: string; size: number; sha256?: string }> = [];
  const ex = tarExtract();
  ex.on('entry', (h, stream, next) => {
    const hash = createHash('sha256');
    stream.on('data', (c: unknown) => { hash.update(c as Buffer); });
    stream.on('end', () => {
      out.push({ name: h.name, type: h.type ?? 'file', size: h.size ?? 0, ...(h.type === 'file' ? { sha256: hash.digest('hex') } : {}) });
      next();
    });
  });
  await pipeline(createReadStream(archive), createGunzip(), ex as unknown as NodeJS.WritableStream);
  return out;
}

/** Every path under `dir` with its type, and a file's bytes or a link's target: what an extraction produced. */
export async function tree(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const name of (await readdir(dir, { recursive: true })).sort()) {
    const p = join(dir, name);
    const st = await lstat(p);
    if (st.isSymbolicLink()) out[name] = `symlink -> ${await readlink(p)}`;
    else if (st.isDirectory()) out[name] = 'dir';
    else out[name] = `file ${(st.mode & 0o7777).toString(8)} ${createHash('sha256').update(await readFile(p)).digest('hex').slice(0, 16)}`;
  }
  return out;
}

/**
 * Reads an archive with every reader the contract names and checks they agree: GNU tar and
 * bsdtar list it without a word on stderr, `gzip -t` passes, Python's r:gz and r|gz see the same
 * members, Node zlib + tar-stream the same names, and GNU tar and bsdtar extract the same tree.
 * Returns the members (Python, r:gz) and the extracted tree.
 */
export async function readEveryWay(archive: string, scratch: string): Promise<{ members: Member[]; tree: Record<string, string> }> {
  await run('gzip', ['-t', archive]);
  const gnu = await run('tar', ['-tzf', archive]);
  const bsd = await run('bsdtar', ['-tzf', archive]);
  if (gnu.stderr !== '' || bsd.stderr !== '') throw new Error(`tar warned: ${gnu.stderr}${bsd.stderr}`);
  const random = await members(archive, 'r:gz');
  const streaming = await members(archive, 'r|gz');
  if (JSON.stringify(random) !== JSON.stringify(streaming)) throw new Error('python r:gz and r|gz disagree');
  const names = random.map((m) => plain(m.name)).filter(Boolean);
  const node = (await nodeMembers(archive)).map((m) => plain(m.name)).filter(Boolean);
  const listed = gnu.stdout.split('\n').filter(Boolean).map(plain).filter(Boolean);
  const bsdListed = bsd.stdout.split('\n').filter(Boolean).map(plain).filter(Boolean);
  for (const [who, list] of [['node', node], ['GNU tar', listed], ['bsdtar', bsdListed]] as const) {
    if (JSON.stringify(list) !== JSON.stringify(names)) throw new Error(`${who} lists ${JSON.stringify(list)}, python ${JSON.stringify(names)}`);
  }
  const gx = join(scratch, 'gnu');
  const bx = join(scratch, 'bsd');
  await mkdir(gx, { recursive: true });
  await mkdir(bx, { recursive: true });
  const g = await run('tar', ['-xzf', archive, '-C', gx]);
  const b = await run('bsdtar', ['-xzf', archive, '-C', bx]);
  // GNU tar remarks on the corpus's 1960 mtime whatever wrote the archive; anything else is a warning.
  const remarks = (g.stderr + b.stderr).split('\n').filter((l) => l !== '' && !/implausibly old time stamp 1960-01-01/.test(l));
  if (remarks.length > 0) throw new Error(`extraction warned: ${remarks.join('\n')}`);
  const gt = await tree(gx);
  const bt = await tree(bx);
  if (JSON.stringify(gt) !== JSON.stringify(bt)) throw new Error(`GNU tar and bsdtar extract different trees:\n${JSON.stringify(gt)}\n${JSON.stringify(bt)}`);
  return { members: random, tree: gt };
}

/** A session file's text, as `stevedore session cat` writes it. */
export async function catText(bucket: Bucket, session: string, path: string): Promise<string> {
  const parts: Buffer[] = [];
  await catSession(bucket, session, path, new Writable({ write: (c: Buffer, _e, cb) => { parts.push(c); cb(); } }));
  return Buffer.concat(parts).toString('utf8');
}
