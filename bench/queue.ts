/**
 * Queue throughput, measured against references in the same run: bare BullMQ workers doing the
 * same durable file writes as a `log` job (entry and digest sidecar; the entry alone for
 * information), and the storage layer's own `put` (for one large `store`). Prints tables; asserts
 * nothing.
 */
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { mkdir, open, rename, rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { Queue, QueueEvents, Worker, type Job } from 'bullmq';
import { pino } from 'pino';
import { FsDriver } from '../src/backends/fs.js';
import { redisConnection } from '../src/queue/connection.js';
import { startWorker } from '../src/queue/worker.js';
import { Bucket } from '../src/storage/bucket.js';
import { Staging } from '../src/staging.js';
import { freePort, startServerProcess, tempDir } from '../test/harness/process.js';
import { mbps, ratio, secs, table, verdict } from './table.js';

const LOG_JOBS = Number(process.env.BENCH_LOG_JOBS ?? 20_000);
const STORE_JOBS = Number(process.env.BENCH_STORE_JOBS ?? 2_000);
/** Concurrency levels; `BENCH_LEVELS=32` measures one while iterating. */
const LEVELS = (process.env.BENCH_LEVELS ?? '1,8,32').split(',').map(Number);

const progress = (s: string) => process.stderr.write(`[bench:queue] ${s}\n`);

/** Plain fsync of a folder, one per call: the reference shares nothing between writers. */
async function syncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** The same atomic write the filesystem backend does for an object, minus our bookkeeping. */
async function atomicWrite(path: string, body: Buffer): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  const tmp = `${path}.tmp-${randomUUID()}`;
  const fh = await open(tmp, 'wx');
  try {
    await fh.writeFile(body);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, path);
  await syncDir(dirname(path));
}

export interface Ctx { redisUrl: string; root: string }

/** Enqueues `n` jobs in bulk, then starts the worker and times until the last one completed. */
async function drain(ctx: Ctx, n: number, name: string, data: (i: number) => object, makeWorker: (queue: string) => Worker): Promise<{ ms: number; latencies: number[]; cpu: { user: number; system: number } }> {
  const queue = `bench-${randomUUID().slice(0, 8)}`;
  const conn = redisConnection(ctx.redisUrl, 'producer');
  const q = new Queue(queue, { connection: conn });
  for (let i = 0; i < n; i += 1000) {
    await q.addBulk(Array.from({ length: Math.min(1000, n - i) }, (_, k) => ({ name, data: data(i + k), opts: { removeOnComplete: true } })));
  }
  const latencies: number[] = [];
  const cpu0 = process.cpuUsage();
  const started = Date.now();
  const worker = makeWorker(queue);
  await new Promise<void>((resolve) => {
    let done = 0;
    worker.on('completed', (job: Job) => {
      latencies.push(Date.now() - job.timestamp);
      if (++done === n) resolve();
    });
    worker.on('failed', (job) => progress(`job ${job?.id} failed: ${job?.failedReason}`));
  });
  const ms = Date.now() - started;
  const cpu = process.cpuUsage(cpu0);
  await worker.close();
  // The worker was handed its connection, so closing the worker leaves it open.
  await (worker.opts.connection as unknown as { quit(): Promise<unknown> }).quit().catch(() => {});
  await q.obliterate({ force: true });
  await q.close();
  await conn.quit();
  return { ms, latencies, cpu };
}

export async function ours(ctx: Ctx, concurrency: number, stagingDir: string): Promise<(queue: string) => Worker> {
  const buckets = new Map([['default', new Bucket(new FsDriver({ root: join(ctx.root, `ours-${randomUUID().slice(0, 6)}`) }))]]);
  return (queue) => startWorker(redisConnection(ctx.redisUrl, 'worker'), { queue, prefix: 'bull', concurrency }, {
    buckets, staging: new Staging(stagingDir), log: pino({ level: 'silent' }), limits: { maxInlineBytes: 1 << 20 },
  });
}

/**
 * A bare BullMQ worker writing what a `log` job writes. `two-file` does the same durable work as
 * our layout: the entry, and beside it in a metadata folder a small JSON sidecar (sha256, size,
 * content type), each an independent atomic write (temp, write, fsync, rename, fsync of its own
 * folder, no sharing between writers); the two writes run at once, as a careful hand-written
 * worker would, so the reference is not slowed by an order ours does not pay for either. It keeps
 * rename where our put may link (ifAbsent) and unlink the temp: the plain atomic write, the faster.
 * `one-file` writes the entry alone: what a log without a durable digest per entry costs.
 */
export function bare(ctx: Ctx, concurrency: number, files: 'one-file' | 'two-file'): (queue: string) => Worker {
  const root = join(ctx.root, `bare-${randomUUID().slice(0, 6)}`);
  return (queue) => new Worker(queue, async (job: Job) => {
    const d = job.data as { site: string; build: string; action: string; status: string; timestamp: string };
    const entry = { timestamp: d.timestamp, build_id: d.build, site_id: d.site, action: d.action, status: d.status, metadata: {} };
    const dir = join(root, 'sites', d.site, 'logs');
    const name = `${d.timestamp}-${d.build}.json`;
    const body = Buffer.from(`${JSON.stringify(entry)}\n`);
    if (files === 'one-file') {
      await atomicWrite(join(dir, name), body);
    } else {
      const meta = { sha256: createHash('sha256').update(body).digest('hex'), size: body.length, contentType: 'application/json' };
      await Promise.all([atomicWrite(join(dir, name), body), atomicWrite(join(dir, '.meta', name), Buffer.from(JSON.stringify(meta)))]);
    }
    return { key: d.timestamp };
  }, { connection: redisConnection(ctx.redisUrl, 'worker'), concurrency });
}

const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(p * xs.length))] ?? 0;

export async function queueBench(): Promise<string> {
  const dir = await tempDir('stevedore-bench-queue-');
  const port = await freePort();
  // No persistence: the bench measures the worker, not Redis's disk.
  const redis = await startServerProcess({ command: 'redis-server', args: ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], port });
  const ctx: Ctx = { redisUrl: `redis://127.0.0.1:${port}`, root: dir.path };
  const stagingDir = join(dir.path, 'staging');
  const out: string[] = [];
  try {
    const logData = (i: number) => ({ site: 'bench', build: `b${i}`, action: 'build', status: 'ok', timestamp: new Date(1_700_000_000_000 + i).toISOString() });
    const rows: string[][] = [];
    for (const c of LEVELS) {
      // Mirrored order (two, one, ours, ours, one, two): a drift in machine load over the six
      // runs lands on every side alike.
      const ms = { 'two-file': [] as number[], 'one-file': [] as number[], ours: [] as number[] };
      const cpu = { 'two-file': [] as number[], 'one-file': [] as number[], ours: [] as number[] };
      for (const turn of ['two-file', 'one-file', 'ours', 'ours', 'one-file', 'two-file'] as const) {
        const run = await drain(ctx, LOG_JOBS, 'log', logData, turn === 'ours' ? await ours(ctx, c, stagingDir) : bare(ctx, c, turn));
        ms[turn].push(run.ms);
        // Microseconds of this process (worker, producer, BullMQ) per job: user + system; system holds the file creates.
        cpu[turn].push((run.cpu.user + run.cpu.system) / LOG_JOBS / 1000, run.cpu.system / LOG_JOBS / 1000);
        progress(`${turn === 'ours' ? 'stevedore' : `bare worker, ${turn}`}, concurrency ${c}: ${(LOG_JOBS / (run.ms / 1000)).toFixed(0)} jobs/s`);
      }
      const rate = (xs: number[]) => (2 * LOG_JOBS) / ((xs[0]! + xs[1]!) / 1000);
      const [our, two, one] = [rate(ms.ours), rate(ms['two-file']), rate(ms['one-file'])];
      // Mean over the two runs of [total, system] ms per job.
      const perJob = (xs: number[]) => `${((xs[0]! + xs[2]!) / 2).toFixed(2)} (sys ${((xs[1]! + xs[3]!) / 2).toFixed(2)})`;
      rows.push([String(c), our.toFixed(0), two.toFixed(0), `${(our / two).toFixed(2)}x`, verdict(1, our / two), one.toFixed(0), `${(our / one).toFixed(2)}x`,
        `${perJob(cpu.ours)} / ${perJob(cpu['two-file'])}`]);
    }
    out.push(table(`${LOG_JOBS} log jobs, one worker process`, ['concurrency', 'stevedore jobs/s', 'bare BullMQ, entry + sidecar, jobs/s', 'ratio', 'goal >= 1.0x', '(info) bare, entry alone, jobs/s', 'ratio', 'CPU ms/job: stevedore / entry + sidecar'], rows, [
      'bare, entry + sidecar (the reference): a BullMQ processor that writes the JSON entry and a JSON sidecar (sha256, size, content type) in a',
      '  metadata folder, each atomically (temp file, write, fsync, rename, fsync of its folder; no fsync shared between jobs), the two at once.',
      '  Stevedore does that work plus validation, the Bucket and driver checks, and shares folder fsyncs between concurrent jobs.',
      'bare, entry alone (information): the same atomic write of the entry only; its ratio is the price of a durable digest per entry.',
      'each side runs twice per level, in the order two-file, one-file, stevedore, stevedore, one-file, two-file; jobs/s over both runs.',
      'CPU: this process (worker, producer, BullMQ client) per job, user + system, and the system part. On ext4 without a journal the',
      '  system part moves with the machine: creating a file skips inodes deleted in the last minute (find_inode_bit, recently_deleted),',
      '  so whichever side runs after a mass delete (another process\'s rm -rf in the same block group) pays for it: read ratios with it.',
    ]));

    // BENCH_STORE_JOBS=0 skips the store table while iterating on log jobs.
    if (STORE_JOBS === 0) return out.join('\n');
    const blob = randomBytes(16 * 1024);
    await mkdir(join(stagingDir, 'in'), { recursive: true });
    for (let i = 0; i < 64; i++) await writeFile(join(stagingDir, 'in', `f${i}`), blob);
    const storeRows: string[][] = [];
    for (const c of LEVELS) {
      const res = await drain(ctx, STORE_JOBS, 'store', (i) => ({ key: `s/${i}`, source: { path: `in/f${i % 64}` } }), await ours(ctx, c, stagingDir));
      storeRows.push([String(c), `${(STORE_JOBS / (res.ms / 1000)).toFixed(0)}`, `${pct(res.latencies, 0.5)} ms`, `${pct(res.latencies, 0.99)} ms`]);
      progress(`store 16 KiB, concurrency ${c}: ${(STORE_JOBS / (res.ms / 1000)).toFixed(0)} jobs/s`);
    }
    out.push(table(`${STORE_JOBS} store jobs of 16 KiB`, ['concurrency', 'jobs/s', 'p50 enqueue->completion', 'p99'], storeRows,
      ['all jobs are enqueued before the worker starts, so latency includes queueing behind earlier jobs']));
  } finally {
    await redis.stop();
    await rm(dir.path, { recursive: true, force: true });
  }
  return out.join('\n');
}

/**
 * One large store end to end through Redis, against the storage layer's own put of the same file.
 * The two alternate which goes first: on this VM the first 1 GiB written after the previous pair
 * is ~40% slower than the second, so with an even number of runs each side pays it equally often.
 * Each figure is the median of `runs`.
 */
export async function largeStoreBench(file: string, bytes: number, runs = 6): Promise<string> {
  const dir = await tempDir('stevedore-bench-big-');
  const port = await freePort();
  const redis = await startServerProcess({ command: 'redis-server', args: ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], port });
  const ctx: Ctx = { redisUrl: `redis://127.0.0.1:${port}`, root: dir.path };
  try {
    const direct: number[] = [];
    const queued: number[] = [];
    const stagingDir = dirname(file);
    const putDirect = async (i: number) => {
      const root = join(dir.path, `direct-${i}`);
      const t0 = Date.now();
      await new Bucket(new FsDriver({ root })).put('big', { path: file });
      direct.push(Date.now() - t0);
      await rm(root, { recursive: true, force: true });
    };
    const putQueued = async (i: number) => {
      const q = `big-${i}`;
      const conn = redisConnection(ctx.redisUrl, 'producer');
      const queue = new Queue(q, { connection: conn });
      const eventsConn = redisConnection(ctx.redisUrl, 'worker');
      const events = new QueueEvents(q, { connection: eventsConn });
      await events.waitUntilReady();
      const worker = (await ours(ctx, 1, stagingDir))(q);
      const t1 = Date.now();
      const job = await queue.add('store', { key: 'big', source: { path: file.slice(stagingDir.length + 1) } });
      await job.waitUntilFinished(events);
      queued.push(Date.now() - t1);
      await worker.close();
      await (worker.opts.connection as unknown as { quit(): Promise<unknown> }).quit().catch(() => {});
      await events.close();
      // A connection handed to QueueEvents stays open after close(); left alone, it would retry
      // (and log ECONNREFUSED) once the bench's Redis is stopped.
      await eventsConn.quit().catch(() => {});
      await queue.close();
      await conn.quit();
      await rm(join(ctx.root), { recursive: true, force: true });
      await mkdir(ctx.root, { recursive: true });
    };
    for (let i = 0; i < runs; i++) {
      if (i % 2 === 0) { await putDirect(i); await putQueued(i); } else { await putQueued(i); await putDirect(i); }
    }
    const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
    const d = med(direct);
    const q = med(queued);
    return table(`one ${(bytes / 2 ** 30).toFixed(2)} GiB store, end to end`, ['path', 'median', 'throughput', 'ratio to put', 'goal'], [
      ['Bucket.put (filesystem)', secs(d), mbps(bytes, d), '1.00x', ''],
      ['store job through Redis', secs(q), mbps(bytes, q), ratio(q, d), `${verdict(q / d, 1 / 0.95)} (>= 0.95x speed)`],
    ]);
  } finally {
    await redis.stop();
    await rm(dir.path, { recursive: true, force: true });
  }
}

