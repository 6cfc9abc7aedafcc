/**
 * One measured operation per process: `node <compiled>/bench/storage.js --case <name> ...`.
 * bench/run.ts spawns this for every timed run, so each run starts with a fresh heap (no garbage
 * or JIT state left by the previous case) and its peak RSS belongs to that case alone. Prints one
 * JSON line on stdout (a CaseResult).
 */
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Transform, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import type { S3DriverOptions } from '../src/backends/s3.js';

export const CASES = ['fs-put', 'fs-get', 'naive-copy', 's3-put', 's3-upload', 'session-edit'] as const;
export type CaseName = (typeof CASES)[number];

export interface CaseArgs {
  /** Source file for puts and copies; session-edit's staging folder. */
  file?: string | undefined;
  /** Filesystem backend root (fs-put, fs-get) or target directory (naive-copy). */
  root?: string | undefined;
  /** Object key. @defaultValue 'obj' */
  key?: string | undefined;
  /** Expected digest handed to Bucket.put; without it an S3 put hashes the file first. */
  sha256?: string | undefined;
  /** S3DriverOptions as JSON (s3rver's fixed development credentials, no secret). */
  s3?: string | undefined;
  /** Chunk size for naive-copy's streams. @defaultValue Node's default (64 KiB) */
  chunk?: number | undefined;
  /** `off` turns the FsDriver's fsync off, to show what durability costs. @defaultValue on */
  fsync?: 'on' | 'off' | undefined;
  /** session-edit: the Redis the session locks live in, and the session whose archive is under `root`. */
  redis?: string | undefined;
  session?: string | undefined;
}

export interface CaseResult {
  case: CaseName;
  ms: number;
  bytes: number;
  /** Peak resident set of the whole process, in KiB (process.resourceUsage().maxRSS). */
  maxRssKiB: number;
  /** RSS once the case's modules are loaded, just before the operation: the process's base. */
  baseRssKiB: number;
  /** CPU time (user + system, all threads) the operation took: unlike wall time, barely moved by other load. */
  cpuMs: number;
}

function need<T>(value: T | undefined, name: string): T {
  if (value === undefined) throw new Error(`--${name} is required for this case`);
  return value;
}

/** A sink that drops every chunk: a read is timed without the cost of any consumer. */
const nowhere = () => new Writable({ write: (_c, _e, cb) => cb() });

/**
 * Each case loads only the modules it uses, then returns the timed operation. Loading matters: with
 * the AWS SDK in the heap, V8's limits made the fs cases' 1 MiB buffers trigger a full GC every
 * ~30 MiB, and fs get ran ~50% slower than in a process without it.
 */
async function prepare(name: CaseName, a: CaseArgs, key: string): Promise<() => Promise<number>> {
  const { Bucket } = await import('../src/storage/bucket.js');
  switch (name) {
    case 'fs-put': {
      const { FsDriver } = await import('../src/backends/fs.js');
      const bucket = new Bucket(new FsDriver({ root: need(a.root, 'root'), fsync: a.fsync !== 'off' }));
      return async () => (await bucket.put(key, { path: need(a.file, 'file') }, { sha256: a.sha256 })).size;
    }
    case 'fs-get': {
      const { FsDriver } = await import('../src/backends/fs.js');
      const bucket = new Bucket(new FsDriver({ root: need(a.root, 'root') }));
      return async () => {
        const { stream, info } = await bucket.get(key);
        if (info.sha256 === undefined) throw new Error('fs-get: the object has no recorded digest, so nothing would be verified');
        await pipeline(stream, nowhere());
        return info.size;
      };
    }
    case 'naive-copy':
      // What a hand-written copy would do: read stream -> hashing transform -> write stream, fsync on close.
      return async () => {
        const hwm = a.chunk === undefined ? {} : { highWaterMark: a.chunk };
        const hash = createHash('sha256');
        let bytes = 0;
        const hashing = new Transform({ ...hwm, transform(c: Buffer, _e, cb) { hash.update(c); bytes += c.length; cb(null, c); } });
        await pipeline(createReadStream(need(a.file, 'file'), hwm), hashing, createWriteStream(join(need(a.root, 'root'), key), { ...hwm, flush: true }));
        hash.digest('hex');
        return bytes;
      };
    case 'session-edit': {
      // A one-file repack-session edit, as a worker runs it: the peak RSS is the job's, not the bench's.
      const { FsDriver } = await import('../src/backends/fs.js');
      const { RepackPayload, repackSession } = await import('../jobs/repack-session.js');
      const { parsePayload } = await import('../src/payload.js');
      const { Redis } = await import('ioredis');
      const { jobDeps } = await import('../test/session/helpers.js');
      const bucket = new Bucket(new FsDriver({ root: need(a.root, 'root') }));
      const redis = new Redis(need(a.redis, 'redis'), { maxRetriesPerRequest: null });
      const payload = parsePayload(RepackPayload, { session: need(a.session, 'session'), ops: [{ op: 'put', path: key, text: `// edited in a child at ${Date.now()}\n` }] });
      return async () => {
        try {
          return (await repackSession(payload, jobDeps(bucket, redis, need(a.file, 'file'), { jobId: `child-${process.pid}`, enqueuedAt: Date.now() }))).size;
        } finally {
          await redis.quit();
        }
      };
    }
    case 's3-put': {
      const { S3Driver } = await import('../src/backends/s3.js');
      const bucket = new Bucket(new S3Driver(JSON.parse(need(a.s3, 's3')) as S3DriverOptions));
      return async () => {
        try {
          return (await bucket.put(key, { path: need(a.file, 'file') }, { sha256: a.sha256 })).size;
        } finally {
          await bucket.close();
        }
      };
    }
    case 's3-upload': {
      // The reference: lib-storage alone, on the very client, part size and queue size the driver uses.
      const { S3Driver } = await import('../src/backends/s3.js');
      const { Upload } = await import('@aws-sdk/lib-storage');
      const opts = JSON.parse(need(a.s3, 's3')) as S3DriverOptions;
      const driver = new S3Driver(opts);
      const file = need(a.file, 'file');
      return async () => {
        try {
          await new Upload({
            client: driver.client, partSize: driver.partSize, queueSize: opts.queueSize ?? 4,
            params: { Bucket: driver.bucket, Key: key, Body: createReadStream(file) },
          }).done();
          return (await stat(file)).size;
        } finally {
          await driver.close();
        }
      };
    }
  }
}

/** Runs one case in this process; the clock covers the operation only, not module loading. */
export async function runCase(name: CaseName, args: CaseArgs): Promise<CaseResult> {
  const op = await prepare(name, args, args.key ?? 'obj');
  const baseRssKiB = Math.round(process.memoryUsage.rss() / 1024);
  const cpu = process.cpuUsage();
  const started = performance.now();
  const bytes = await op();
  const ms = performance.now() - started;
  const { user, system } = process.cpuUsage(cpu);
  return { case: name, ms, bytes, maxRssKiB: process.resourceUsage().maxRSS, baseRssKiB, cpuMs: (user + system) / 1000 };
}

/** Command-line arguments for a child running `name` with `args`, the inverse of main()'s parsing. */
export function caseArgv(name: CaseName, args: CaseArgs): string[] {
  const out = ['--case', name];
  for (const [k, v] of Object.entries(args)) if (v !== undefined) out.push(`--${k}`, String(v));
  return out;
}

async function main(): Promise<void> {
  const { values: v } = parseArgs({
    options: Object.fromEntries(['case', 'file', 'root', 'key', 'sha256', 's3', 'chunk', 'fsync', 'redis', 'session'].map((k) => [k, { type: 'string' }])),
  }) as { values: Record<string, string | undefined> };
  const name = v.case as CaseName;
  if (!CASES.includes(name)) throw new Error(`--case must be one of ${CASES.join(', ')}`);
  if (v.fsync !== undefined && v.fsync !== 'on' && v.fsync !== 'off') throw new Error('--fsync must be on or off');
  const result = await runCase(name, { ...v, fsync: v.fsync, chunk: v.chunk === undefined ? undefined : Number(v.chunk) });
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

// run.ts imports this module for caseArgv and the types; only a process started on it runs a case.
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  });
}
