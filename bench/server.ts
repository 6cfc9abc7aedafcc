/**
 * `npm run bench -- --server`: the HTTP server against the same work without Stevedore.
 * - PUT + GET of a large artifact (1 GiB; BENCH_SERVER_BYTES) through `stevedore server` and a
 *   worker on the filesystem backend, with curl, beside curl against a bare Node `http` server that
 *   streams the body to a file with the same fsync and streams it back.
 * - GET of a 16 KiB artifact by 32 concurrent keep-alive clients in this process: requests/s, p99.
 * Peak RSS of the server process comes from /proc (VmHWM).
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { readFile, writeFile, rm, mkdir } from 'node:fs/promises';
import { Agent, request } from 'node:http';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort, startServerProcess, tempDir, type ServerProcess } from '../test/harness/process.js';
import { progress, randomFile, settle, warm } from './proc.js';
import { GiB, mb, mbps, ratio, secs, size, stats, table, verdict } from './table.js';

const KiB = 1024;

const REPO = fileURLToPath(new URL('..', import.meta.url));
const BYTES = Number(process.env.BENCH_SERVER_BYTES ?? GiB);
const RUNS = Number(process.env.BENCH_SERVER_RUNS ?? 3);
const SMALL = 16 * KiB;
const CLIENTS = 32;
const SMALL_REQUESTS = Number(process.env.BENCH_SERVER_REQUESTS ?? 20_000);
const TOKEN = 'bench-token-0123456789abcdef';

/** The reference: the same work without Stevedore (stream to a file, fsync, rename; stream back). */
const BARE = `
import { createServer } from 'node:http';
import { createReadStream, createWriteStream } from 'node:fs';
import { open, rename, stat } from 'node:fs/promises';
import { pipeline } from 'node:stream/promises';
const dir = process.argv[2];
createServer(async (req, res) => {
  const file = dir + '/' + encodeURIComponent(req.url);
  try {
    if (req.method === 'PUT') {
      await pipeline(req, createWriteStream(file + '.tmp', { highWaterMark: 1 << 20 }));
      const fh = await open(file + '.tmp', 'r+'); await fh.sync(); await fh.close();
      await rename(file + '.tmp', file);
      res.writeHead(201).end('{}');
    } else {
      const st = await stat(file);
      res.writeHead(200, { 'content-length': st.size, 'content-type': 'application/octet-stream' });
      await pipeline(createReadStream(file, { highWaterMark: 256 << 10 }), res);
    }
  } catch (err) { if (!res.headersSent) res.writeHead(500).end(String(err)); else res.destroy(); }
}).listen(Number(process.argv[3]), '127.0.0.1');
`;

function curl(args: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const child = spawn('curl', ['-sS', '-f', '-o', '/dev/null', ...args], { stdio: ['ignore', 'ignore', 'inherit'] });
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(performance.now() - started) : reject(new Error(`curl ${args.join(' ')} exited ${code}`))));
  });
}

/** The node flags of `npm start` (package.json's start script), unless BENCH_NODE_FLAGS names others ('' for none). */
function nodeFlags(): string[] {
  if (process.env.BENCH_NODE_FLAGS !== undefined) return process.env.BENCH_NODE_FLAGS.split(' ').filter(Boolean);
  const start = (JSON.parse(readFileSync(join(REPO, 'package.json'), 'utf8')) as { scripts: { start: string } }).scripts.start;
  return /^node((?: --\S+)*) dist\//.exec(start)?.[1]?.trim().split(' ').filter(Boolean) ?? [];
}

/** Peak resident set of a process so far, KiB (VmHWM). */
async function peakRssKiB(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/VmHWM:\s+(\d+)/.exec(status)?.[1] ?? 0);
}

/** `n` GETs by `clients` keep-alive clients: requests/s and the latency percentiles. */
async function load(url: string, headers: Record<string, string>, n: number, clients: number): Promise<{ rps: number; p50: number; p99: number }> {
  const agent = new Agent({ keepAlive: true, maxSockets: clients });
  const lat: number[] = [];
  let next = 0;
  const one = () => new Promise<void>((resolve, reject) => {
    const t = performance.now();
    request(url, { agent, headers }, (res) => {
      let got = 0;
      res.on('data', (c: Buffer) => { got += c.length; });
      res.on('end', () => {
        if (res.statusCode !== 200 || got !== SMALL) return reject(new Error(`GET ${url}: ${res.statusCode}, ${got} bytes`));
        lat.push(performance.now() - t);
        resolve();
      });
    }).on('error', reject).end();
  });
  const started = performance.now();
  await Promise.all(Array.from({ length: clients }, async () => { while (next++ < n) await one(); }));
  const ms = performance.now() - started;
  agent.destroy();
  lat.sort((a, b) => a - b);
  return { rps: n / (ms / 1000), p50: lat[Math.floor(lat.length * 0.5)]!, p99: lat[Math.floor(lat.length * 0.99)]! };
}

export async function serverBench(): Promise<string> {
  const dir = await tempDir('stevedore-bench-server-');
  const procs: ServerProcess[] = [];
  try {
    const redisPort = await freePort();
    procs.push(await startServerProcess({ command: 'redis-server', args: ['--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], port: redisPort }));
    const env = {
      REDIS_URL: `redis://127.0.0.1:${redisPort}`, STEVEDORE_BACKENDS: `default=file://${join(dir.path, 'objects')}`,
      STEVEDORE_STAGING_DIR: join(dir.path, 'staging'), STEVEDORE_API_TOKEN: TOKEN, LOG_LEVEL: 'warn', AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true',
    };
    // The product as `npm start` runs it: compiled, plain node (no tsx loader in the RSS).
    progress('building dist/ (npm run build)');
    await new Promise<void>((resolve, reject) => spawn(process.execPath, [join(REPO, 'node_modules/typescript/bin/tsc'), '-p', 'tsconfig.build.json'], { cwd: REPO, stdio: 'inherit' })
      .on('close', (code) => (code === 0 ? resolve() : reject(new Error(`tsc exited ${code}`)))));
    // With the V8 flags `npm start` passes (package.json), or BENCH_NODE_FLAGS to compare others.
    const BIN = [...nodeFlags(), 'dist/src/bin/stevedore.js'];
    const node = (args: string[], port: number, extra: Record<string, string> = {}) =>
      startServerProcess({ command: process.execPath, args: [...BIN, ...args], port, cwd: REPO, env: { ...env, ...extra } });
    const port = await freePort();
    const server = await node(['server'], port, { STEVEDORE_HTTP_PORT: String(port) });
    procs.push(server);
    // The worker in a process of its own, so the server's RSS is the server's alone.
    const workerPort = await freePort();
    const worker = spawn(process.execPath, [...BIN, 'worker'], { cwd: REPO, env: { ...process.env, ...env, STEVEDORE_HTTP_PORT: String(workerPort) }, stdio: 'inherit' });
    const barePort = await freePort();
    await mkdir(join(dir.path, 'bare'));
    await writeFile(join(dir.path, 'bare.mjs'), BARE);
    procs.push(await startServerProcess({ command: process.execPath, args: [join(dir.path, 'bare.mjs'), join(dir.path, 'bare'), String(barePort)], port: barePort }));
    const bare = procs[procs.length - 1]!;

    const src = join(dir.path, 'artifact.bin');
    await randomFile(src, BYTES);
    await warm(src);
    const ours = `http://127.0.0.1:${port}`;
    const ref = `http://127.0.0.1:${barePort}`;
    const auth = ['-H', `Authorization: Bearer ${TOKEN}`];
    const times = { oursPut: [] as number[], oursGet: [] as number[], barePut: [] as number[], bareGet: [] as number[] };
    for (let i = 0; i < RUNS; i++) {
      const order = i % 2 ? ['bare', 'ours'] : ['ours', 'bare'];
      for (const who of order) {
        await settle();
        if (who === 'ours') {
          times.oursPut.push(await curl([...auth, '-T', src, `${ours}/sites/bench/artifacts/b${i}?wait=3600`]));
          await settle();
          times.oursGet.push(await curl([...auth, `${ours}/sites/bench/artifacts/b${i}`]));
          await rm(join(dir.path, 'objects', 'sites', 'bench', 'artifacts', `b${i}.tar.gz`), { force: true });
        } else {
          times.barePut.push(await curl(['-T', src, `${ref}/a${i}`]));
          await settle();
          times.bareGet.push(await curl([`${ref}/a${i}`]));
          await rm(join(dir.path, 'bare', encodeURIComponent(`/a${i}`)), { force: true });
        }
        progress(`${who}: run ${i + 1}/${RUNS}: PUT ${secs((who === 'ours' ? times.oursPut : times.barePut).at(-1)!)}, GET ${secs((who === 'ours' ? times.oursGet : times.bareGet).at(-1)!)}`);
      }
    }
    const med = (xs: number[]) => stats(xs).median;
    const both = (p: number[], g: number[]) => p.map((x, i) => x + g[i]!);
    const [oPut, oGet, bPut, bGet] = [med(times.oursPut), med(times.oursGet), med(times.barePut), med(times.bareGet)];
    const [oAll, bAll] = [med(both(times.oursPut, times.oursGet)), med(both(times.barePut, times.bareGet))];
    const rss = await peakRssKiB(server.child.pid!);
    const workerRss = await peakRssKiB(worker.pid!);
    const big = table(`PUT + GET of ${size(BYTES)} through the HTTP server (filesystem backend, curl), median of ${RUNS}`, ['', 'stevedore', 'bare node http + fsync', 'throughput ratio', 'goal'], [
      ['PUT (staged, stored, ?wait)', `${secs(oPut)} (${mbps(BYTES, oPut)})`, `${secs(bPut)} (${mbps(BYTES, bPut)})`, ratio(bPut, oPut), ''],
      ['GET (verified)', `${secs(oGet)} (${mbps(BYTES, oGet)})`, `${secs(bGet)} (${mbps(BYTES, bGet)})`, ratio(bGet, oGet), ''],
      ['PUT + GET', `${secs(oAll)} (${mbps(2 * BYTES, oAll)})`, `${secs(bAll)} (${mbps(2 * BYTES, bAll)})`, ratio(bAll, oAll), `>= 0.80x ${verdict(oAll / bAll, 1 / 0.8)}`],
      ['server peak RSS', mb(rss), mb(await peakRssKiB(bare.child.pid!)), '', `< 150 MB ${rss < 150 * 1024 ? 'ok' : 'MISSED'}`],
    ], [
      'ratio = bare time / stevedore time (1.00x is as fast as the bare server).',
      'stevedore PUT with ?wait (no X-Content-SHA256): the body is counted into the staging area, not hashed, and fsynced as it arrives (an fdatasync every 64 MiB, then a last fsync), then the store job (a worker process of its own) links the staged file into the backend (source.consume: same filesystem) and reads it once to hash it (its fdatasync finds the file clean) before the answer; the bare server writes the file once and fsyncs it at the end.',
      `worker peak RSS ${mb(workerRss)}.`,
    ]);

    // Small artifact, many clients.
    await writeFile(join(dir.path, 'small.bin'), Buffer.alloc(SMALL, 1));
    await curl([...auth, '-T', join(dir.path, 'small.bin'), `${ours}/sites/bench/artifacts/small?wait=60`]);
    await curl(['-T', join(dir.path, 'small.bin'), `${ref}/small`]);
    await load(`${ours}/sites/bench/artifacts/small`, { authorization: `Bearer ${TOKEN}` }, 2000, CLIENTS); // warm-up
    await load(`${ref}/small`, {}, 2000, CLIENTS);
    const o = await load(`${ours}/sites/bench/artifacts/small`, { authorization: `Bearer ${TOKEN}` }, SMALL_REQUESTS, CLIENTS);
    const b = await load(`${ref}/small`, {}, SMALL_REQUESTS, CLIENTS);
    progress(`small GET: stevedore ${o.rps.toFixed(0)} req/s, bare ${b.rps.toFixed(0)} req/s`);
    const small = table(`GET of a ${SMALL / KiB} KiB artifact, ${CLIENTS} concurrent keep-alive clients, ${SMALL_REQUESTS} requests`, ['', 'req/s', 'p50', 'p99'], [
      ['stevedore (auth, open + verified read)', o.rps.toFixed(0), `${o.p50.toFixed(1)} ms`, `${o.p99.toFixed(1)} ms`],
      ['bare node http (stat + read)', b.rps.toFixed(0), `${b.p50.toFixed(1)} ms`, `${b.p99.toFixed(1)} ms`],
      ['ratio', `${(o.rps / b.rps).toFixed(2)}x`, '', `${(o.p99 / b.p99).toFixed(2)}x`],
    ], ['The load generator runs in the bench process, on the same 2 cores as the servers.']);
    worker.kill('SIGTERM');
    await new Promise((r) => worker.once('exit', r));
    return `${big}\n${small}`;
  } finally {
    for (const p of procs.reverse()) await p.stop().catch(() => {});
    await dir.remove();
  }
}
