import { rm } from 'node:fs/promises';
import { Command, InvalidArgumentError } from 'commander';
import { composeApp, type App } from '../app.js';
import { loadConfig, type Config } from '../config.js';
import { createLogger } from '../logger.js';
import { versions } from '../versions.js';
import { EXIT, parsePositive, stageFile, submit, type CliIo } from './common.js';
import { registerSessionCommands } from './session.js';

export type { CliIo } from './common.js';
export { EXIT, progressBar } from './common.js';

/** What the commands that become long-running processes need from the composition root (bin/). */
export interface CliProcesses {
  /** `worker` and `start`: one worker process, its signals wired by the caller. */
  runWorker(config: Config, opts: { embeddedRedis: boolean; env: NodeJS.ProcessEnv; cwd: string; withServer?: boolean }): Promise<unknown>;
  /** `server`: the HTTP server alone. */
  runServer?(config: Config, opts: { env: NodeJS.ProcessEnv; cwd: string }): Promise<unknown>;
}

/** The `stevedore` command line, thin over the producer client. */
export function buildProgram(io: CliIo, setExit: (code: number) => void, processes: CliProcesses): Command {
  const config = (): Config => loadConfig(io.env, io.cwd);
  const compose = (cfg: Config): App => composeApp(cfg, { cwd: io.cwd, env: io.env, log: createLogger(cfg.logLevel) });
  const program = new Command('stevedore')
    .description('Queue-driven storage jobs: move build artifacts and sessions into durable storage and back.')
    .showHelpAfterError();

  program.command('worker').description('run one worker process (STEVEDORE_* and REDIS_URL or REDIS_CLUSTER_NODES configure it)')
    .action(async () => { await processes.runWorker(config(), { embeddedRedis: false, env: io.env, cwd: io.cwd }); });
  program.command('start').description('worker and HTTP server on embedded defaults: starts a private redis-server if REDIS_URL is unset and none answers')
    .action(async () => { await processes.runWorker(config(), { embeddedRedis: true, env: io.env, cwd: io.cwd, withServer: true }); });
  program.command('server').description('run the HTTP server (STEVEDORE_HTTP_HOST, STEVEDORE_HTTP_PORT, STEVEDORE_API_TOKEN)')
    .action(async () => {
      if (!processes.runServer) throw new Error('this build has no HTTP server');
      await processes.runServer(config(), { env: io.env, cwd: io.cwd });
    });

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
        finished = await submit(compose(cfg), io, setExit, o, 'store', {
          backend: String(o.backend), key, source: { path: staged.rel },
          ...(o.sha256 ? { sha256: String(o.sha256) } : {}), ...(o.contentType ? { contentType: String(o.contentType) } : {}),
          ...(o.ifAbsent ? { ifAbsent: true } : {}),
        });
      } finally {
        // Only once the job is over, or was never enqueued: a job still running after --timeout still reads it.
        if (finished) await rm(staged.abs, { force: true });
      }
    });

  withWait(program.command('fetch <key> <dest>').description('enqueue a fetch-to-staging job: <key> into <dest> under the staging area'))
    .option('--sha256 <hex>', 'expected SHA-256')
    .option('--extract', 'unpack the tar(.gz) into directory <dest>', false)
    .action(async (key: string, dest: string, o: Record<string, string | boolean | number | undefined>) => {
      await submit(compose(config()), io, setExit, o, 'fetch-to-staging', {
        backend: String(o.backend), key, dest, ...(o.sha256 ? { sha256: String(o.sha256) } : {}), ...(o.extract ? { extract: true } : {}),
      });
    });

  withWait(program.command('log').description('enqueue a log job: one JSON entry at sites/<site>/logs/<timestamp>-<build>.json'))
    .requiredOption('--site <site>', 'site id').requiredOption('--build <build>', 'build id')
    .requiredOption('--action <action>', 'what happened').requiredOption('--status <status>', 'its status')
    .option('--metadata <json>', 'a JSON object of extra fields', parseJsonObject)
    .option('--timestamp <iso>', 'entry time (default: when enqueued)')
    .action(async (o: Record<string, unknown>) => {
      await submit(compose(config()), io, setExit, o as Record<string, string>, 'log', {
        backend: String(o.backend), site: String(o.site), build: String(o.build), action: String(o.action), status: String(o.status),
        ...(o.metadata ? { metadata: o.metadata as Record<string, unknown> } : {}), ...(o.timestamp ? { timestamp: String(o.timestamp) } : {}),
      });
    });

  program.command('versions <site>').description("list a site's builds from its artifacts and log entries, newest first")
    .option('--backend <name>', 'configured backend name', 'default')
    .option('--json', 'print JSON', false)
    .action(async (site: string, o: { backend: string; json: boolean }) => {
      const app = compose(config());
      try {
        const bucket = (await app.buckets()).get(o.backend);
        if (!bucket) throw new InvalidArgumentError(`no backend named "${o.backend}"`);
        const list = await versions(bucket, site);
        if (o.json) io.out(`${JSON.stringify(list, null, 2)}\n`);
        else for (const v of list) io.out(`${v.build}\t${v.updated}\t${v.artifact ? `${v.artifact.size} bytes` : 'no artifact'}\t${v.logs.length} log entries\n`);
      } finally {
        await app.close();
      }
    });
  program.command('cancel <id>').description('cancel a job: a waiting one is removed, a running one stops and fails Cancelled')
    .action(async (id: string) => {
      const app = compose(config());
      try {
        await app.client().ready();
        const outcome = await app.client().cancel(id);
        io.out(`${id}\t${outcome}\n`);
        if (outcome === 'not-found' || outcome === 'finished') setExit(EXIT.failed);
      } finally {
        await app.close();
      }
    });
  program.command('migrate').description('enqueue a migrate job: copy every object under --prefix from one backend to another, verified')
    .requiredOption('--from <name>', 'source backend').requiredOption('--to <name>', 'destination backend')
    .option('--prefix <prefix>', 'only keys starting with this')
    .option('--dry-run', 'report what would be copied, skipped and deleted; write nothing', false)
    .option('--delete-source', 'delete each source object once its copy verified in this run', false)
    .option('--recheck', 'read and hash both sides instead of trusting recorded digests', false)
    .option('--wait', 'wait for the job, show its progress and print its result', false)
    .option('--timeout <seconds>', 'with --wait, give up after this long', parsePositive)
    .action(async (o: Record<string, string | boolean | number | undefined>) => {
      await submit(compose(config()), io, setExit, o, 'migrate', {
        from: String(o.from), to: String(o.to), ...(o.prefix ? { prefix: String(o.prefix) } : {}),
        ...(o.dryRun ? { dryRun: true } : {}), ...(o.deleteSource ? { deleteSource: true } : {}), ...(o.recheck ? { recheck: true } : {}),
      });
    });
  withWait(program.command('verify').description('enqueue a verify job: re-read every object under --prefix against its recorded SHA-256 (exit 1 on a mismatch)'))
    .option('--prefix <prefix>', 'only keys starting with this')
    .action(async (o: Record<string, string | boolean | number | undefined>) => {
      await submit(compose(config()), io, setExit, o, 'verify', { backend: String(o.backend), ...(o.prefix ? { prefix: String(o.prefix) } : {}) }, (r) => {
        const v = r as { mismatched: number; failures: unknown[] };
        // Anything not verified (a mismatch, or an object that could not be read) fails the command.
        if (v.mismatched > 0 || v.failures.length > 0) setExit(EXIT.failed);
      });
    });
  registerSessionCommands(program, { io, setExit, config, compose });
  return program;
}

function parseJsonObject(v: string): Record<string, unknown> {
  try {
    const o = JSON.parse(v) as unknown;
    if (typeof o === 'object' && o !== null && !Array.isArray(o)) return o as Record<string, unknown>;
  } catch { /* fall through */ }
  throw new InvalidArgumentError('must be a JSON object');
}
