/**
 * Work per `log` job, which machine load changes little: `npx tsx bench/work.ts <jobs>
 * <concurrency> <side>...` with sides `ours`, `two-file`, `one-file`, run one after the other in
 * this process (say `ours two-file ours two-file` to interleave). Per run it prints CPU (user,
 * system) and Redis commands per job; with BENCH_STRACE=1 it attaches `strace -f -c` to this
 * process for the drain alone and prints the file syscalls per job.
 *
 * Nothing is deleted until every run is over: on ext4 without a journal, creating a file skips
 * every inode of its block group deleted in the last half minute (find_inode_bit,
 * recently_deleted), so a run after a mass delete pays kernel time for it that is no work of its own.
 */
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Queue, type Job, type Worker } from 'bullmq';
import { redisConnection } from '../src/queue/connection.js';
import { freePort, startServerProcess, tempDir } from '../test/harness/process.js';
import { bare, ours, type Ctx } from './queue.js';

const n = Number(process.argv[2] ?? 2000);
const concurrency = Number(process.argv[3] ?? 8);
const sides = process.argv.slice(4) as ('ours' | 'two-file' | 'one-file')[];
if (!sides.length) sides.push('ours', 'two-file');

function commandstats(info: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const m of info.matchAll(/^cmdstat_([^:]+):calls=(\d+)/gm)) out.set(m[1]!, Number(m[2]));
  return out;
}

/** strace -c's table as syscall -> calls, without the waits (futex, epoll) that are no file work. */
function syscalls(table: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const m of table.matchAll(/^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$/gm)) {
    if (!['futex', 'epoll_pwait', 'epoll_wait', 'total'].includes(m[2]!)) out.set(m[2]!, Number(m[1]));
  }
  return out;
}

/** CPU ms (user + system) of this process's main thread and of its other threads (libuv pool, V8, GC), from /proc. */
function threadCpu(): { main: number; rest: number } {
  let main = 0;
  let rest = 0;
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      // Fields after the command name (in parentheses): utime and stime are the 12th and 13th.
      const f = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8').replace(/^.*\) /s, '').split(' ');
      const ms = (Number(f[11]) + Number(f[12])) * 10;
      if (tid === String(process.pid)) main += ms;
      else rest += ms;
    } catch { /* a thread that ended */ }
  }
  return { main, rest };
}

const dir = await tempDir('stevedore-bench-work-');
const port = await freePort();
const redis = await startServerProcess({ command: 'redis-server', args: ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], port });
const ctx: Ctx = { redisUrl: `redis://127.0.0.1:${port}`, root: dir.path };
const conn = redisConnection(ctx.redisUrl, 'producer');
const per = (x: number) => (x / n).toFixed(2);
try {
  for (const [i, side] of sides.entries()) {
    const queue = `work-${randomUUID().slice(0, 8)}`;
    const q = new Queue(queue, { connection: conn });
    for (let j = 0; j < n; j += 1000) {
      await q.addBulk(Array.from({ length: Math.min(1000, n - j) }, (_, k) => ({
        name: 'log', data: { site: 'bench', build: `b${j + k}`, action: 'build', status: 'ok', timestamp: new Date(1_700_000_000_000 + j + k).toISOString() },
        opts: { removeOnComplete: true },
      })));
    }
    const make = side === 'ours' ? await ours(ctx, concurrency, join(dir.path, 'staging')) : bare(ctx, concurrency, side);
    const straceOut = join(dir.path, `strace-${i}`);
    let strace: ReturnType<typeof spawn> | undefined;
    if (process.env.BENCH_STRACE === '1') {
      // -f on the process attaches every thread (the libuv pool does the file I/O).
      strace = spawn('strace', ['-f', '-c', '-o', straceOut, '-p', String(process.pid)], { stdio: 'ignore' });
      await new Promise((r) => setTimeout(r, 1500));
    }
    await conn.call('CONFIG', 'RESETSTAT');
    const cpu0 = process.cpuUsage();
    const th0 = threadCpu();
    const t0 = Date.now();
    const worker: Worker = make(queue);
    await new Promise<void>((resolve) => {
      let done = 0;
      worker.on('completed', (_job: Job) => { if (++done === n) resolve(); });
      worker.on('failed', (job) => process.stderr.write(`job ${job?.id} failed: ${job?.failedReason}\n`));
    });
    const ms = Date.now() - t0;
    const cpu = process.cpuUsage(cpu0);
    const th1 = threadCpu();
    const stats = commandstats(String(await conn.call('INFO', 'commandstats')));
    if (strace) {
      strace.kill('SIGINT');
      await new Promise((r) => strace!.once('exit', r));
    }
    await worker.close();
    await (worker.opts.connection as unknown as { quit(): Promise<unknown> }).quit().catch(() => {});
    await q.close();
    stats.delete('info');
    stats.delete('config|resetstat');
    const total = [...stats.values()].reduce((a, b) => a + b, 0);
    console.log(`${side} n=${n} c=${concurrency}: ${(n / (ms / 1000)).toFixed(0)} jobs/s, CPU us/job user ${(cpu.user / n).toFixed(0)} sys ${(cpu.system / n).toFixed(0)} (main thread ${((th1.main - th0.main) * 1000 / n).toFixed(0)}, others ${((th1.rest - th0.rest) * 1000 / n).toFixed(0)}), Redis cmds/job ${per(total)}`);
    if (process.env.BENCH_VERBOSE) console.log(`  redis: ${[...stats].sort((a, b) => b[1] - a[1]).filter(([, v]) => v >= n / 100).map(([k, v]) => `${k} ${per(v)}`).join(', ')}`);
    if (strace) {
      const calls = syscalls(await readFile(straceOut, 'utf8'));
      const sum = [...calls.values()].reduce((a, b) => a + b, 0);
      console.log(`  syscalls/job (no futex/epoll) ${per(sum)}: ${[...calls].sort((a, b) => b[1] - a[1]).filter(([, v]) => v >= n / 100).map(([k, v]) => `${k} ${per(v)}`).join(', ')}`);
    }
  }
} finally {
  await conn.quit();
  await redis.stop();
  await dir.remove();
}
