import { randomUUID } from 'node:crypto';
import { copyFile, mkdir, open, rename, rm } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { Command, InvalidArgumentError } from 'commander';
import { openBackends } from '../backends/open.js';
import { loadConfig, type Config } from '../config.js';
import { StevedoreClient, type JobName, type Payloads, type Progress } from '../queue/client.js';
import { STAGING_TMP } from '../staging.js';
import { versions } from '../versions.js';
import { runWorker } from '../bin/run-worker.js';
import { registerSessionCommands } from './session.js';

export interface CliIo {
  env: NodeJS.ProcessEnv;
  cwd: string;
  out: (s: string) => void;
  err: (s: string) => void;
  isTTY: boolean;
}

/** Exit codes: 0 done, 1 the job failed, 2 bad usage or input. */
export const EXIT = { ok: 0, failed: 1, usage: 2 } as const;

/** The `stevedore` command line, thin over the producer client. */
export function buildProgram(io: CliIo, setExit: (code: number) => void): Command {
  const config = (): Config => loadConfig(io.env, io.cwd);
  const program = new Command('stevedore')
    .description('Queue-driven storage jobs: move build artifacts and sessions into durable storage and back.')
    .showHelpAfterError();

  program.command('worker').description('run one worker process (STEVEDORE_* and REDIS_URL configure it)')
    .action(async () => { await runWorker(config(), { embeddedRedis: false, env: io.env, cwd: io.cwd }); });
  program.command('start').description('the worker on embedded defaults: starts a private redis-server if REDIS_URL is unset and none answers')
    .action(async () => { await runWorker(config(), { embeddedRedis: true, env: io.env, cwd: io.cwd }); });

  const withWait = (c: Command) => c
    .option('--backend <name>', 'configured backend name', 'default')
    .option('--wait', 'wait for the job and print its result', false)
    .option('--timeout <seconds>', 'with --wait, give up after this long', parsePositive);

  withWait(program.command('store <file>').description('copy <file> into the staging area and enqueue a store job'))
    .option('--key <key>', 'object key')
    .option('--site <site>', 'site id (with --build: key sites/<site>/artifacts/<build>.tar.gz)')
    .option('--build <build>', 'build id')
    .option('--sha256 <hex>', 'expected SHA-256; a mismatch stores nothing')
    .option('--content-type <type>', 'content type')
    .option('--if-absent', 'fail if the key already exists', false)
    .action(async (file: string, o: Record<string, string | boolean | number | undefined>) => {
      const key = typeof o.key === 'string' ? o.key : o.site && o.build ? `sites/${String(o.site)}/artifacts/${String(o.build)}.tar.gz` : undefined;
      if (!key) throw new InvalidArgumentError('give --key, or --site and --build');
      const cfg = config();
      const staged = await stageFile(cfg.stagingDir, file);
      let finished = false;
      try {
        finished = await submit(cfg, io, setExit, o, 'store', {
          backend: String(o.backend), key, source: { path: staged.rel },
          ...(o.sha256 ? { sha256: String(o.sha256) } : {}), ...(o.contentType ? { contentType: String(o.contentType) } : {}),
          ...(o.ifAbsent ? { ifAbsent: true } : {}),
        });
      } finally {
        // Only once the job is over: a job still running after --timeout still reads it.
        if (finished) await rm(staged.abs, { force: true });
      }
    });

  withWait(program.command('fetch <key> <dest>').description('enqueue a fetch-to-staging job: <key> into <dest> under the staging area'))
    .option('--sha256 <hex>', 'expected SHA-256')
    .option('--extract', 'unpack the tar(.gz) into directory <dest>', false)
    .action(async (key: string, dest: string, o: Record<string, string | boolean | number | undefined>) => {
      await submit(config(), io, setExit, o, 'fetch-to-staging', {
        backend: String(o.backend), key, dest, ...(o.sha256 ? { sha256: String(o.sha256) } : {}), ...(o.extract ? { extract: true } : {}),
      });
    });

  withWait(program.command('log').description('enqueue a log job: one JSON entry at sites/<site>/logs/<timestamp>-<build>.json'))
    .requiredOption('--site <site>', 'site id').requiredOption('--build <build>', 'build id')
    .requiredOption('--action <action>', 'what happened').requiredOption('--status <status>', 'its status')
    .option('--metadata <json>', 'a JSON object of extra fields', parseJsonObject)
    .option('--timestamp <iso>', 'entry time (default: when enqueued)')
    .action(async (o: Record<string, unknown>) => {
      await submit(config(), io, setExit, o as Record<string, string>, 'log', {
        backend: String(o.backend), site: String(o.site), build: String(o.build), action: String(o.action), status: String(o.status),
        ...(o.metadata ? { metadata: o.metadata as Record<string, unknown> } : {}), ...(o.timestamp ? { timestamp: String(o.timestamp) } : {}),
      });
    });

  program.command('versions <site>').description("list a site's builds from its artifacts and log entries, newest first")
    .option('--backend <name>', 'configured backend name', 'default')
    .option('--json', 'print JSON', false)
    .action(async (site: string, o: { backend: string; json: boolean }) => {
      const cfg = config();
      const buckets = await openBackends(cfg.backends, { cwd: io.cwd, AZURE_STORAGE_CONNECTION_STRING: io.env.AZURE_STORAGE_CONNECTION_STRING });
      const bucket = buckets.get(o.backend);
      if (!bucket) throw new InvalidArgumentError(`no backend named "${o.backend}"`);
      try {
        const list = await versions(bucket, site);
        if (o.json) io.out(`${JSON.stringify(list, null, 2)}\n`);
        else for (const v of list) io.out(`${v.build}\t${v.updated}\t${v.artifact ? `${v.artifact.size} bytes` : 'no artifact'}\t${v.logs.length} log entries\n`);
      } finally {
        await Promise.allSettled([...buckets.values()].map((b) => b.close()));
      }
    });
  registerSessionCommands(program, { io, setExit, config });
  return program;
}

/** Enqueues, and with --wait awaits the outcome; returns false while the job may still run. */
async function submit<N extends JobName>(cfg: Config, io: CliIo, setExit: (c: number) => void, o: Record<string, unknown>, name: N, payload: Payloads[N]): Promise<boolean> {
  const client = new StevedoreClient({ redisUrl: cfg.redisUrl, queue: cfg.queue, prefix: cfg.prefix });
  try {
    if (!o.wait) {
      io.out(`${await client.add(name, payload)}\n`);
      return false;
    }
    const bar = io.isTTY ? (p: Progress) => io.err(`\r${progressBar(p)}`) : undefined;
    try {
      const result = await client.run(name, payload, { timeoutMs: typeof o.timeout === 'number' ? o.timeout * 1000 : undefined, ...(bar ? { onProgress: bar } : {}) });
      if (bar) io.err('\n');
      io.out(`${JSON.stringify(result)}\n`);
      return true;
    } catch (err) {
      if (bar) io.err('\n');
      io.err(`${(err as Error).message}\n`);
      setExit((err as { code?: string }).code === 'InvalidInput' ? EXIT.usage : EXIT.failed);
      return (err as { pending?: boolean }).pending !== true;
    }
  } finally {
    await client.close();
  }
}

/**
 * Copies a file into the staging area under incoming/, whole and on disk before it is visible
 * there (a crash must not leave a short file for the job to store), under a temp name the staging
 * sweep removes if the copy dies half-way.
 */
async function stageFile(stagingDir: string, file: string): Promise<{ rel: string; abs: string }> {
  const rel = join('incoming', `${randomUUID()}-${basename(file)}`);
  const abs = join(stagingDir, rel);
  await mkdir(join(stagingDir, 'incoming'), { recursive: true });
  const tmp = join(stagingDir, 'incoming', `${STAGING_TMP}${randomUUID()}`);
  try {
    await copyFile(file, tmp);
    const fh = await open(tmp, 'r+');
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, abs);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  return { rel, abs };
}

export function progressBar(p: Progress, width = 30): string {
  const mib = (n: number) => (n / 1048576).toFixed(1);
  if (!p.total) return `${mib(p.bytes)} MiB`;
  const f = Math.min(1, p.bytes / p.total);
  return `[${'#'.repeat(Math.round(f * width)).padEnd(width, '.')}] ${(f * 100).toFixed(0).padStart(3)}% ${mib(p.bytes)}/${mib(p.total)} MiB`;
}

function parsePositive(v: string): number {
  const n = Number(v);
  if (!(n > 0)) throw new InvalidArgumentError('must be a positive number');
  return n;
}

function parseJsonObject(v: string): Record<string, unknown> {
  try {
    const o = JSON.parse(v) as unknown;
    if (typeof o === 'object' && o !== null && !Array.isArray(o)) return o as Record<string, unknown>;
  } catch { /* fall through */ }
  throw new InvalidArgumentError('must be a JSON object');
}
