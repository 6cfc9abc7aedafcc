/**
 * `npm run bench -- --group`: N concurrent one-file edits of one session (filesystem backend, real
 * Redis), applied with group commit (the jobs waiting for the session's lock hand their ops to
 * its holder: few rewrites) beside one rewrite per job (locks without the group: today's path
 * before slice 3), interleaved in the same run. Prints wall time, CPU time and commits; asserts nothing.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { RepackPayload, repackSession, type RepackResult } from '../jobs/repack-session.js';
import { FsDriver } from '../src/backends/fs.js';
import { parsePayload, type Locks } from '../src/payload.js';
import { RedisLocks } from '../src/queue/lock.js';
import { Bucket } from '../src/storage/bucket.js';
import { freePort, startServerProcess, tempDir } from '../test/harness/process.js';
import { jobDeps } from '../test/session/helpers.js';
import { randomFile } from './proc.js';
import { secs, stats, table } from './table.js';

const RUNS = Number(process.env.BENCH_GROUP_RUNS ?? 3);
const EDITS = Number(process.env.BENCH_GROUP_EDITS ?? 30);
const FILES = 900;

interface Round { ms: number; cpuMs: number; commits: number }

export async function groupCommitBench(): Promise<string> {
  const dir = await tempDir('stevedore-bench-group-');
  const port = await freePort();
  const redisProc = await startServerProcess({ command: 'redis-server', args: ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], port });
  const redis = new Redis(`redis://127.0.0.1:${port}`, { maxRetriesPerRequest: null });
  try {
    const staging = join(dir.path, 'staging');
    await mkdir(staging, { recursive: true });
    const bucket = new Bucket(new FsDriver({ root: join(dir.path, 'objects') }), { name: 'default' });
    // A session of FILES small files and 16 MiB of binary: a rewrite costs what copying it costs.
    await randomFile(join(staging, 'bulk'), 16 << 20);
    for (let i = 0; i < FILES; i++) await writeFile(join(staging, `f${i}`), `file ${i}\n${'x'.repeat(i % 2000)}\n`);
    let job = 0;
    const grouped = new RedisLocks(redis, { prefix: 'bull', queue: 'bench-group', waitMs: 600_000 });
    // The same locks without the group: every job takes the lock in turn and rewrites once.
    const oneByOne: Locks = { acquire: (name, signal) => grouped.acquire(name, signal) };
    const repack = (session: string, ops: unknown[], locks: Locks): Promise<RepackResult> => {
      const d = jobDeps(bucket, redis, staging, { jobId: `b${++job}`, enqueuedAt: Date.now() + job, queue: 'bench-group' });
      return repackSession(parsePayload(RepackPayload, { session, ops }), { ...d, locks });
    };
    const variants: Array<{ label: string; locks: Locks; rounds: Round[] }> = [
      { label: `${EDITS} edits, group commit`, locks: grouped, rounds: [] },
      { label: `${EDITS} edits, one rewrite each`, locks: oneByOne, rounds: [] },
    ];
    for (let r = 0; r < RUNS; r++) {
      for (const v of r % 2 === 0 ? variants : [...variants].reverse()) {
        const session = `bench__group__r${r}-${v.locks === grouped ? 'g' : 'o'}`;
        await repack(session, [{ op: 'put', path: 'bulk.bin', source: { path: 'bulk' } }, ...Array.from({ length: FILES }, (_, i) => ({ op: 'put', path: `src/f${i}.txt`, source: { path: `f${i}` } }))], v.locks);
        const cpu = process.cpuUsage();
        const t = performance.now();
        const results = await Promise.all(Array.from({ length: EDITS }, (_, i) => repack(session, [{ op: 'put', path: `src/f${i}.txt`, text: `edited ${i}\n` }], v.locks)));
        const used = process.cpuUsage(cpu);
        v.rounds.push({ ms: performance.now() - t, cpuMs: (used.user + used.system) / 1000, commits: new Set(results.map((x) => x.sha256)).size });
      }
    }
    const rows = variants.map((v) => {
      const ms = stats(v.rounds.map((x) => x.ms)).median;
      const cpu = stats(v.rounds.map((x) => x.cpuMs)).median;
      const commits = stats(v.rounds.map((x) => x.commits)).median;
      return [v.label, secs(ms), `${(EDITS / (ms / 1000)).toFixed(1)} edits/s`, secs(cpu), String(commits)];
    });
    const base = stats(variants[1]!.rounds.map((x) => x.ms)).median / stats(variants[0]!.rounds.map((x) => x.ms)).median;
    return table(`Group commit: ${EDITS} concurrent one-file edits of one session (fs, ${FILES} files + 16 MiB), median of ${RUNS}`,
      ['variant', 'wall', 'throughput', 'cpu (user+sys)', 'commits'], rows,
      [`group commit: ${base.toFixed(1)}x the throughput of one rewrite per edit`, `load average ${loadavg().map((l) => l.toFixed(2)).join(' ')}`]);
  } finally {
    await redis.quit().catch(() => redis.disconnect());
    await redisProc.stop();
    await dir.remove();
  }
}
