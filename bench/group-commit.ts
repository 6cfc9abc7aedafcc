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
const STAGGER_MS = Number(process.env.BENCH_GROUP_STAGGER_MS ?? 20);

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
    // All at once, and arriving STAGGER_MS apart (jobs join while a batch is being written).
    const variants: Array<{ label: string; locks: Locks; staggerMs: number; rounds: Round[] }> = [
      { label: `${EDITS} edits at once, group commit`, locks: grouped, staggerMs: 0, rounds: [] },
      { label: `${EDITS} edits at once, one rewrite each`, locks: oneByOne, staggerMs: 0, rounds: [] },
      { label: `${EDITS} edits ${STAGGER_MS} ms apart, group commit`, locks: grouped, staggerMs: STAGGER_MS, rounds: [] },
      { label: `${EDITS} edits ${STAGGER_MS} ms apart, one rewrite each`, locks: oneByOne, staggerMs: STAGGER_MS, rounds: [] },
    ];
    for (let r = 0; r < RUNS; r++) {
      for (const v of r % 2 === 0 ? variants : [...variants].reverse()) {
        const session = `bench__group__r${r}-${variants.indexOf(v)}`;
        await repack(session, [{ op: 'put', path: 'bulk.bin', source: { path: 'bulk' } }, ...Array.from({ length: FILES }, (_, i) => ({ op: 'put', path: `src/f${i}.txt`, source: { path: `f${i}` } }))], v.locks);
        const cpu = process.cpuUsage();
        const t = performance.now();
        const results = await Promise.all(Array.from({ length: EDITS }, async (_, i) => {
          await new Promise((res) => setTimeout(res, i * v.staggerMs));
          return repack(session, [{ op: 'put', path: `src/f${i}.txt`, text: `edited ${i}\n` }], v.locks);
        }));
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
    const gain = (g: number): string => (stats(variants[g + 1]!.rounds.map((x) => x.ms)).median / stats(variants[g]!.rounds.map((x) => x.ms)).median).toFixed(1);
    return table(`Group commit: ${EDITS} concurrent one-file edits of one session (fs, ${FILES} files + 16 MiB), median of ${RUNS}`,
      ['variant', 'wall', 'throughput', 'cpu (user+sys)', 'commits'], rows,
      [`group commit: ${gain(0)}x (at once) and ${gain(2)}x (staggered) the throughput of one rewrite per edit; commits are the distinct archives in the results`, `load average ${loadavg().map((l) => l.toFixed(2)).join(' ')}`]);
  } finally {
    await redis.quit().catch(() => redis.disconnect());
    await redisProc.stop();
    await dir.remove();
  }
}
