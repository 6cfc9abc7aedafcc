/**
 * `npm run bench -- --migrate`: migrate and verify against rclone and sha256sum, measured in the
 * same run on the same s3rver: a legacy tree (no sidecars) of 2,000 x 16 KiB + 8 x 32 MiB copied
 * by one worker process (concurrency 8) and by two, against `rclone copy --checksum --transfers 8`;
 * each re-run on the complete destination; verify of the copies against `sha256sum` of the files;
 * and 100,000 tiny objects for Redis memory and the listing + enqueue rate. Worker processes run
 * the compiled JS (as deployed). Prints tables; asserts nothing.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { StevedoreClient } from '../src/queue/client.js';
import { redisConnection } from '../src/queue/connection.js';
import { freePort, startServerProcess, tempDir } from '../test/harness/process.js';
import { S3RVER_CREDENTIALS, startS3rver, type S3rver } from '../test/harness/s3.js';
import { compileEntry, progress, run } from './proc.js';
import { MiB, mbps, secs, table } from './table.js';

const SMALL = Number(process.env.BENCH_MIGRATE_SMALL ?? 2000);
const BIG = Number(process.env.BENCH_MIGRATE_BIG ?? 8);
const TINY = Number(process.env.BENCH_MIGRATE_TINY ?? 100_000);

interface Worker { child: ChildProcess; stop(): Promise<void> }

/** CPU seconds (user + system) a process has used so far, from /proc (Linux). */
async function cpuSeconds(pid: number | undefined): Promise<number> {
  if (pid === undefined) return 0;
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11] ?? 0) + Number(fields[12] ?? 0)) / 100;
}

/** How the workers cut chunks, when the bench's own environment sets it (STEVEDORE_CHUNK_KEYS, _BYTES, _WINDOW, _LANES). */
const CHUNK_ENV = Object.fromEntries(Object.entries(process.env).filter((e): e is [string, string] => e[0].startsWith('STEVEDORE_CHUNK_') && e[1] !== undefined));

/** BENCH_MIGRATE_PROF=<dir>: each worker process writes a V8 CPU profile there (stopped with SIGTERM, so it is written). */
const PROF = process.env.BENCH_MIGRATE_PROF;

async function startWorkerProcess(script: string, env: Record<string, string>): Promise<Worker> {
  const child = spawn(process.execPath, [...(PROF ? ['--cpu-prof', `--cpu-prof-dir=${PROF}`] : []), script, 'worker'], { env: { PATH: process.env.PATH ?? '', AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true', ...env }, stdio: ['ignore', 'ignore', 'pipe'] });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  await new Promise<void>((resolve, reject) => {
    let out = '';
    child.stderr!.on('data', (b: Buffer) => {
      out += b.toString();
      if (out.includes('"worker started"')) resolve();
      if (out.length > 100_000) out = out.slice(-10_000);
    });
    child.once('exit', (code) => reject(new Error(`worker exited ${code}: ${out.slice(-2000)}`)));
  });
  child.stderr!.resume();
  return { child, stop: async () => { child.kill(PROF ? 'SIGTERM' : 'SIGKILL'); await exited; } };
}

async function writeTree(root: string, small: number, big: number): Promise<number> {
  let bytes = 0;
  for (let i = 0; i < small; i++) {
    const dir = join(root, 'small', String(i % 20));
    if (i < 20) await mkdir(dir, { recursive: true });
    await writeFile(join(dir, `f-${i}.bin`), randomBytes(16 * 1024));
    bytes += 16 * 1024;
  }
  await mkdir(join(root, 'big'), { recursive: true });
  for (let i = 0; i < big; i++) {
    const f = join(root, 'big', `b-${i}.bin`);
    // 32 MiB of random bytes in 4 MiB pieces.
    const parts = Array.from({ length: 8 }, () => randomBytes(4 * MiB));
    await writeFile(f, Buffer.concat(parts));
    bytes += 32 * MiB;
  }
  return bytes;
}

/**
 * rclone against s3rver: provider Other, path style, and AWS_CA_BUNDLE removed from its environment;
 * run under GNU time for its own CPU seconds (user + system), the figure the workers' CPU compares with.
 */
async function rclone(s3: S3rver, args: string[], dir: string): Promise<{ ms: number; cpu: number }> {
  const env: NodeJS.ProcessEnv = { ...process.env };
  delete env.AWS_CA_BUNDLE;
  Object.assign(env, {
    RCLONE_CONFIG_S3RVER_TYPE: 's3', RCLONE_CONFIG_S3RVER_PROVIDER: 'Other', RCLONE_CONFIG_S3RVER_ENDPOINT: s3.endpoint,
    RCLONE_CONFIG_S3RVER_ACCESS_KEY_ID: S3RVER_CREDENTIALS.accessKeyId, RCLONE_CONFIG_S3RVER_SECRET_ACCESS_KEY: S3RVER_CREDENTIALS.secretAccessKey,
    RCLONE_CONFIG_S3RVER_FORCE_PATH_STYLE: 'true', RCLONE_CONFIG_S3RVER_REGION: 'us-east-1',
  });
  const out = join(dir, `rclone-time-${randomUUID()}`);
  const { ms } = await run('/usr/bin/time', ['-f', '%U %S', '-o', out, 'rclone', ...args], env);
  const [user = 0, system = 0] = (await readFile(out, 'utf8')).trim().split(/\s+/).map(Number);
  return { ms, cpu: user + system };
}

export async function migrateBench(): Promise<string> {
  const load0 = loadavg()[0]!.toFixed(1);
  const tmp = await tempDir('stevedore-bench-migrate-');
  const redisPort = await freePort();
  const redis = await startServerProcess({ command: 'redis-server', args: ['--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], port: redisPort });
  const redisUrl = `redis://127.0.0.1:${redisPort}`;
  const s3 = await startS3rver();
  const workers: Worker[] = [];
  try {
    const script = await compileEntry('src/bin/stevedore.ts', join(tmp.path, 'js'));
    const tree = join(tmp.path, 'tree');
    progress(`migrate: writing a legacy tree of ${SMALL} x 16 KiB + ${BIG} x 32 MiB`);
    const bytes = await writeTree(tree, SMALL, BIG);
    const objects = SMALL + BIG;
    const buckets = { rclone: await s3.bucket(), one: await s3.bucket(), two: await s3.bucket() };
    const envFor = (queue: string, extra: Record<string, string> = {}) => ({
      REDIS_URL: redisUrl, STEVEDORE_QUEUE: queue, STEVEDORE_STAGING_DIR: join(tmp.path, `staging-${queue}`), STEVEDORE_CONCURRENCY: '8', LOG_LEVEL: 'info',
      STEVEDORE_BACKENDS: [`tree=file://${tree}`, ...Object.entries(buckets).map(([n, b]) => `${n}=s3://${b}?endpoint=${s3.endpoint}&forcePathStyle=true&conditionalWrites=false`)].join(','),
      AWS_ACCESS_KEY_ID: S3RVER_CREDENTIALS.accessKeyId, AWS_SECRET_ACCESS_KEY: S3RVER_CREDENTIALS.secretAccessKey, ...CHUNK_ENV, ...extra,
    });
    const migration = async (n: number, to: string, tag: string, extra: Record<string, string> = {}) => {
      const queue = `bench-${tag}-${randomUUID().slice(0, 6)}`;
      const ws = await Promise.all(Array.from({ length: n }, () => startWorkerProcess(script, envFor(queue, extra))));
      workers.push(...ws);
      const client = new StevedoreClient({ redisUrl, queue });
      const cpu = async () => (await Promise.all([...ws.map((w) => cpuSeconds(w.child.pid)), cpuSeconds(s3.server.child.pid)]));
      const timed = async (payload: { from: string; to: string; recheck?: boolean }) => {
        const before = await cpu();
        const t = performance.now();
        const r = await client.run('migrate', payload, { timeoutMs: 30 * 60_000 });
        const ms = performance.now() - t;
        const after = await cpu();
        const used = after.map((c, i) => c - before[i]!);
        return { ms, r, workerCpu: used.slice(0, -1).reduce((a, b) => a + b, 0), s3rverCpu: used.at(-1)! };
      };
      const first = await timed({ from: 'tree', to });
      progress(`migrate ${n} worker(s): ${secs(first.ms)} ${JSON.stringify({ ...first.r, failures: first.r.failures.length })}`);
      const again = await timed({ from: 'tree', to });
      progress(`migrate ${n} worker(s), re-run: ${secs(again.ms)} ${JSON.stringify({ ...again.r, failures: again.r.failures.length })}`);
      return { first, again, client, queue, stop: async () => { await client.close(); await Promise.all(ws.map((w) => w.stop())); } };
    };

    progress('migrate: rclone copy --checksum --transfers 8');
    const rcCpu0 = await cpuSeconds(s3.server.child.pid);
    const rc = await rclone(s3, ['copy', '--checksum', '--transfers', '8', tree, `s3rver:${buckets.rclone}`], tmp.path);
    const rcS3rverCpu = (await cpuSeconds(s3.server.child.pid)) - rcCpu0;
    const rcAgain = await rclone(s3, ['copy', '--checksum', '--transfers', '8', tree, `s3rver:${buckets.rclone}`], tmp.path);
    progress(`rclone: ${secs(rc.ms)}, re-run ${secs(rcAgain.ms)}`);
    const one = await migration(1, 'one', 'one');
    const two = await migration(2, 'two', 'two');

    // verify of the copies the one-worker run made, against sha256sum of the files.
    const files = (await readdir(tree, { recursive: true, withFileTypes: true })).filter((e) => e.isFile()).map((e) => join(e.parentPath, e.name));
    const sum = await run('sha256sum', files);
    const t = performance.now();
    const v = await one.client.run('verify', { backend: 'one' }, { timeoutMs: 30 * 60_000 });
    const verifyMs = performance.now() - t;
    progress(`verify: ${secs(verifyMs)} ${JSON.stringify({ ...v, failures: v.failures.length })}; sha256sum ${secs(sum.ms)}`);
    await one.stop();
    await two.stop();

    // BENCH_MIGRATE_TINY=0 leaves the 100,000-object part out (it takes minutes) while iterating on speed.
    const tiny = TINY > 0 ? await tinyBench(script, tmp.path, redisUrl) : '';
    const perS = (n: number, ms: number) => `${(n / (ms / 1000)).toFixed(0)}/s`;
    const row = (label: string, ms: number, ref: number | undefined, goal: string, cpu = '') =>
      [label, secs(ms), perS(objects, ms), mbps(bytes, ms), ref === undefined ? 'reference' : `${(ref / ms).toFixed(2)}x speed`, goal, cpu];
    const cpuCell = (t: { workerCpu: number; s3rverCpu: number }) => `worker ${t.workerCpu.toFixed(1)} s, s3rver ${t.s3rverCpu.toFixed(1)} s`;
    const out = [
      table(`migrate: legacy tree (${SMALL} x 16 KiB + ${BIG} x 32 MiB, no sidecars) to s3rver`, ['run', 'time', 'objects/s', 'MB/s', 'vs rclone', 'goal', 'CPU'], [
        row('rclone copy --checksum --transfers 8', rc.ms, undefined, '', `rclone ${rc.cpu.toFixed(1)} s, s3rver ${rcS3rverCpu.toFixed(1)} s`),
        row('migrate, 1 worker process, concurrency 8', one.first.ms, rc.ms, `>= 1.0x ${rc.ms / one.first.ms >= 1 ? 'ok' : 'MISSED'}`, cpuCell(one.first)),
        row('migrate, 2 worker processes', two.first.ms, rc.ms, `> 1 worker ${two.first.ms < one.first.ms ? 'ok' : 'MISSED'}`, cpuCell(two.first)),
        ['rclone re-run (complete destination)', secs(rcAgain.ms), '', '', 'reference', '', `rclone ${rcAgain.cpu.toFixed(1)} s`],
        ['migrate re-run, 1 worker', secs(one.again.ms), '', '', `${(one.again.ms / rcAgain.ms).toFixed(2)}x of rclone's time`, `<= 0.5x ${one.again.ms / rcAgain.ms <= 0.5 ? 'ok' : 'MISSED'}`, cpuCell(one.again)],
        ['migrate re-run, 2 workers', secs(two.again.ms), '', '', `${(two.again.ms / rcAgain.ms).toFixed(2)}x of rclone's time`, '', cpuCell(two.again)],
        ['verify (1 worker) of the 1-worker copies', secs(verifyMs), perS(objects, verifyMs), mbps(bytes, verifyMs), `${(sum.ms / verifyMs).toFixed(2)}x sha256sum's speed`, '(info)', ''],
        ['sha256sum over the same files', secs(sum.ms), perS(objects, sum.ms), mbps(bytes, sum.ms), 'reference for verify', '', ''],
      ], [
        `Times from enqueue to the result (listing, chunking, the copies, the parent's wake-up); workers already started. Results: 1 worker ${JSON.stringify({ ...one.first.r, failures: one.first.r.failures.length })}; re-run ${JSON.stringify({ ...one.again.r, failures: one.again.r.failures.length })}.`,
        'rclone: provider Other, path style, --checksum (MD5 of every local file on each run), --transfers 8. migrate: chunks of 250 keys / 64 MiB (or STEVEDORE_CHUNK_* as the bench is given them), 8 objects at once per chunk,',
        '  each object SHA-256 verified; a legacy tree is hashed while copied: up to the S3 driver\'s singlePutSize (40 MiB) as the one PutObject is buffered, larger objects in a first read.',
        'Re-run: migrate trusts its record of what the first run verified (source size, mtime, etag; destination ETag): a listing of both sides, no object read or HEADed.',
        'CPU: user + system seconds used during the run by the worker process(es) and by s3rver (from /proc), and by rclone (GNU time).',
        `Load average (1 min) at the start: ${load0}, at the end: ${loadavg()[0]!.toFixed(1)} (a shared 2-core VM: compare rows of one run only).`,
        'verify reads every object back from s3rver and checks it against its recorded digest; sha256sum reads the local files (page cache).',
      ]),
      tiny,
    ];
    return out.join('\n');
  } finally {
    await Promise.all(workers.map((w) => w.stop().catch(() => {})));
    await s3.stop();
    await redis.stop();
    await tmp.remove();
  }
}

/** 100,000 tiny objects filesystem to filesystem: Redis memory during the run, the parent's size, listing and enqueue rate. */
async function tinyBench(script: string, dir: string, redisUrl: string): Promise<string> {
  const src = join(dir, 'tiny');
  progress(`migrate: writing ${TINY} tiny files`);
  for (let i = 0; i < TINY; i++) {
    const d = join(src, String(i % 100));
    if (i < 100) await mkdir(d, { recursive: true });
    await writeFile(join(d, `t-${i}`), `tiny ${i}\n`);
  }
  const queue = `bench-tiny-${randomUUID().slice(0, 6)}`;
  const env = {
    REDIS_URL: redisUrl, STEVEDORE_QUEUE: queue, STEVEDORE_STAGING_DIR: join(dir, 'staging-tiny'), STEVEDORE_CONCURRENCY: '8', LOG_LEVEL: 'info',
    STEVEDORE_BACKENDS: `tiny=file://${src},out=file://${join(dir, 'tiny-out')}`,
  };
  const w = await startWorkerProcess(script, env);
  const client = new StevedoreClient({ redisUrl, queue });
  const conn = redisConnection(redisUrl, 'worker');
  const usedMemory = async () => Number(/used_memory:(\d+)/.exec(await conn.info('memory'))?.[1] ?? 0);
  try {
    const base = await usedMemory();
    let peak = base;
    let parentPeak = 0;
    let listedAt: number | undefined;
    const t = performance.now();
    const id = await client.migrate({ from: 'tiny', to: 'out' });
    const jobKey = client.queue.toKey(id);
    const sampler = setInterval(() => {
      void (async () => {
        peak = Math.max(peak, await usedMemory());
        const sizes = await Promise.all(['', ':processed', ':dependencies', ':fanout'].map((s) => conn.call('MEMORY', 'USAGE', `${jobKey}${s}`).then((n: unknown) => Number(n ?? 0), () => 0)));
        parentPeak = Math.max(parentPeak, sizes.reduce((a: number, b: number) => a + b, 0));
        // The parent's checkpoint marks the end of its listing (every chunk added).
        if (listedAt === undefined && (await conn.hget(`${jobKey}:fanout`, 'cp.done')) === '1') listedAt = performance.now() - t;
      })().catch(() => {});
    }, 250);
    const r = await client.result<'migrate'>(id, { timeoutMs: 60 * 60_000 });
    clearInterval(sampler);
    const ms = performance.now() - t;
    progress(`tiny: ${secs(ms)} ${JSON.stringify({ ...r, failures: r.failures.length })}, redis peak ${((peak - base) / MiB).toFixed(1)} MiB over base`);
    return table(`migrate: ${TINY} tiny objects, filesystem to filesystem, 1 worker process`, ['figure', 'value'], [
      ['whole run', `${secs(ms)} (${(TINY / (ms / 1000)).toFixed(0)} objects/s), copied ${r.copied}, failed ${r.failed}`],
      ['listing + enqueue (parent listed every key)', listedAt === undefined ? 'not seen' : `${secs(listedAt)} (${(TINY / (listedAt / 1000)).toFixed(0)} keys/s; paced by the window of 16 chunks in flight)`],
      ['Redis used_memory, before / peak during the run', `${(base / MiB).toFixed(1)} MiB / ${(peak / MiB).toFixed(1)} MiB (+${((peak - base) / MiB).toFixed(1)} MiB)`],
      ['the parent job in Redis at its largest (job hash + processed + dependencies + fan-out state)', `${(parentPeak / 1024).toFixed(1)} KiB`],
    ], ['Sampled every 250 ms with INFO memory and MEMORY USAGE; chunks leave their summary in the parent\'s processed hash and are removed on completion.']);
  } finally {
    await client.close();
    conn.disconnect();
    await w.stop();
  }
}
