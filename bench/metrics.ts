/**
 * `/metrics` with a full queue: 100,000 jobs waiting (BENCH_METRICS_JOBS), the workers' totals
 * filled by real jobs, scraped over a real socket. Beside it, the same Redis reads done bare
 * (HGETALL of the totals and BullMQ's getJobCounts), the floor any /metrics has to pay. Redis'
 * INFO commandstats, reset before the scrapes, shows which commands they cost: no KEYS, no SCAN.
 * Prints a table; asserts nothing.
 */
import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { Queue } from 'bullmq';
import Fastify from 'fastify';
import { pino } from 'pino';
import { FsDriver } from '../src/backends/fs.js';
import { metricsKey } from '../src/metrics/catalog.js';
import { MetricsRecorder } from '../src/metrics/recorder.js';
import { redisConnection } from '../src/queue/connection.js';
import { startWorker } from '../src/queue/worker.js';
import { metricsPlugin } from '../src/server/metrics.js';
import { Bucket } from '../src/storage/bucket.js';
import { Staging } from '../src/staging.js';
import { freePort, startServerProcess, tempDir } from '../test/harness/process.js';
import { table } from './table.js';

const JOBS = Number(process.env.BENCH_METRICS_JOBS ?? 100_000);
const SCRAPES = Number(process.env.BENCH_METRICS_SCRAPES ?? 200);
const progress = (s: string) => process.stderr.write(`[bench:metrics] ${s}\n`);
const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(xs.length * p))]!;
const ms = (x: number) => `${x.toFixed(2)} ms`;

export async function metricsBench(): Promise<string> {
  const port = await freePort();
  const redis = await startServerProcess({ command: 'redis-server', args: ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], port });
  const url = `redis://127.0.0.1:${port}`;
  const tmp = await tempDir('stevedore-bench-metrics-');
  const queue = `bench-${randomUUID().slice(0, 8)}`;
  const conn = redisConnection(url, 'worker');
  const log = pino({ level: 'silent' });
  try {
    // Some real jobs first, so the totals hold every metric's series (histograms too).
    const recorder = new MetricsRecorder(redisConnection(url, 'worker'), { prefix: 'bull', queue, flushMs: 100, log });
    const buckets = new Map([['default', new Bucket(new FsDriver({ root: join(tmp.path, 'objects') }), { name: 'default' })]]);
    const worker = startWorker(redisConnection(url, 'worker'), { queue, prefix: 'bull', concurrency: 8, hooks: [recorder], metricsDataPoints: 60 }, { buckets, staging: new Staging(join(tmp.path, 'staging')), log, limits: { maxInlineBytes: 1 << 20 } });
    const q = new Queue(queue, { connection: conn, prefix: 'bull' });
    await q.addBulk(Array.from({ length: 500 }, (_, i) => ({ name: i % 2 ? 'store' : 'log', data: i % 2 ? { key: `k/${i}`, source: { base64: 'aGVsbG8=' } } : { site: 's', build: `b${i}`, action: 'a', status: 'ok' } })));
    while (((await q.getJobCounts('completed')).completed ?? 0) < 500) await new Promise((r) => setTimeout(r, 100));
    await worker.close();
    await recorder.close();
    progress(`enqueueing ${JOBS} jobs`);
    for (let i = 0; i < JOBS; i += 1000) {
      await q.addBulk(Array.from({ length: Math.min(1000, JOBS - i) }, (_, j) => ({ name: 'log', data: { site: 's', build: `w${i + j}`, action: 'a', status: 'ok' } })));
    }
    const counts = await q.getJobCounts();
    const app = Fastify();
    await app.register(metricsPlugin, { queue, keyPrefix: 'bull', connect: () => redisConnection(url, 'producer') });
    await app.listen({ port: 0, host: '127.0.0.1' });
    const target = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}/metrics`;
    let size = 0;
    for (let i = 0; i < 20; i++) size = (await (await fetch(target)).text()).length;
    await conn.config('RESETSTAT');
    const scrape: number[] = [];
    for (let i = 0; i < SCRAPES; i++) {
      const t = performance.now();
      await (await fetch(target)).text();
      scrape.push(performance.now() - t);
    }
    const stats = await conn.info('commandstats');
    const bare: number[] = [];
    const key = metricsKey('bull', queue);
    for (let i = 0; i < SCRAPES; i++) {
      const t = performance.now();
      await Promise.all([conn.hgetall(key), q.getJobCounts()]);
      bare.push(performance.now() - t);
    }
    await app.close();
    await q.close();
    const calls = [...stats.matchAll(/^cmdstat_(\w+):calls=(\d+)/gm)].map(([, c, n]) => `${c} ${Number(n)}`);
    const scanLike = [...stats.matchAll(/^cmdstat_(keys|scan|hscan|sscan|zscan):calls=(\d+)/gm)].reduce((a, m) => a + Number(m[2]), 0);
    return table(`/metrics with ${counts.waiting} jobs waiting, ${counts.completed} completed (${SCRAPES} scrapes, one at a time, ${size} bytes each)`,
      ['', 'p50', 'p99', 'goal', 'vs bare'],
      [
        ['GET /metrics over a socket', ms(pct(scrape, 0.5)), ms(pct(scrape, 0.99)), '< 100 ms', `${(pct(scrape, 0.5) / pct(bare, 0.5)).toFixed(2)}x`],
        ['bare HGETALL + getJobCounts', ms(pct(bare, 0.5)), ms(pct(bare, 0.99)), '', '1.00x'],
      ],
      [`Redis commands during the scrapes (INFO commandstats): ${calls.join(', ')}`, `KEYS/SCAN calls: ${scanLike} (goal 0)`]);
  } finally {
    conn.disconnect();
    await redis.stop();
    await tmp.remove();
  }
}
