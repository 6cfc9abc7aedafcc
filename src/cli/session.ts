import { randomUUID } from 'node:crypto';
import { copyFile, mkdir, open, rename, rm } from 'node:fs/promises';
import { basename, join } from 'node:path';
import type { Writable } from 'node:stream';
import { InvalidArgumentError, type Command } from 'commander';
import { openBackends } from '../backends/open.js';
import type { Config } from '../config.js';
import { StorageError } from '../errors.js';
import { StevedoreClient, type Payloads } from '../queue/client.js';
import { parseSessionId, validateOpPath } from '../session/ids.js';
import { catSession, listSession } from '../session/read.js';
import { STAGING_TMP } from '../staging.js';
import type { Bucket } from '../storage/bucket.js';
import type { CliIo } from './program.js';

/** What the session commands need of the program: its io, exit code and configuration. */
export interface SessionCliContext {
  io: CliIo & { stdout?: Writable };
  setExit: (code: number) => void;
  config: () => Config;
}

const EXIT_FAILED = 1;
const EXIT_USAGE = 2;

/**
 * `stevedore session ls|cat|put|rm`. Reads go straight to the backend (no job); writes enqueue
 * repack-session, with `--wait` as for `store`. Exit codes as everywhere: 0 done, 1 failed (the
 * code leads the message on stderr), 2 bad usage or input.
 */
export function registerSessionCommands(program: Command, ctx: SessionCliContext): void {
  const { io, setExit } = ctx;
  const session = program.command('session').description('read and edit session archives (sessions/<owner>__<repo>__<branch>/session.tar.gz)');

  session.command('ls <session>').description('list the entries of a session archive')
    .option('--backend <name>', 'configured backend name', 'default')
    .option('--json', 'print JSON, with the sha256 of each file (what --if-sha256 compares with)', false)
    .action(async (id: string, o: { backend: string; json: boolean }) => {
      parseSessionId(id);
      await withBucket(ctx, o.backend, async (bucket) => {
        const listing = await listSession(bucket, id, { digests: o.json });
        if (o.json) {
          io.out(`${JSON.stringify({ session: id, ...listing })}\n`);
          return;
        }
        if (!listing.verified) io.err('warning: the archive has no recorded digest; read unverified\n');
        for (const e of listing.entries) {
          io.out(`${e.type}\t${e.mode.toString(8).padStart(4, '0')}\t${e.size}\t${e.mtime}\t${e.path}${e.linkname !== undefined ? ` -> ${e.linkname}` : ''}\n`);
        }
      });
    });

  session.command('cat <session> <path>').description("write one file's verified bytes to stdout")
    .option('--backend <name>', 'configured backend name', 'default')
    .action(async (id: string, path: string, o: { backend: string }) => {
      parseSessionId(id);
      validateOpPath(path);
      await withBucket(ctx, o.backend, async (bucket) => {
        const got = await catSession(bucket, id, path, io.stdout ?? process.stdout);
        if (!got.verified) io.err('warning: the archive has no recorded digest; read unverified\n');
      });
    });

  const withWait = (c: Command) => c
    .option('--backend <name>', 'configured backend name', 'default')
    .option('--if-sha256 <hex>', "apply only if the file's current sha256 is this (else PreconditionFailed, nothing applied)")
    .option('--wait', 'wait for the job and print its result', false)
    .option('--timeout <seconds>', 'with --wait, give up after this long', positive);

  withWait(session.command('put <session> <path> [file]').description('enqueue repack-session: put <file> (or --text) at <path>'))
    .option('--text <text>', 'the content, instead of a file')
    .option('--mode <octal>', 'file mode, e.g. 755 (default: the existing file\'s, 644 for a new one)', octal)
    .action(async (id: string, path: string, file: string | undefined, o: Options & { text?: string; mode?: number }) => {
      parseSessionId(id);
      validateOpPath(path);
      if ((file === undefined) === (o.text === undefined)) throw new InvalidArgumentError('give a <file> or --text, not both');
      const cfg = ctx.config();
      const staged = file !== undefined ? await stageFile(cfg.stagingDir, file) : undefined;
      let finished = false;
      try {
        finished = await submit(ctx, cfg, o, {
          backend: o.backend, session: id,
          ops: [{ op: 'put', path, ...(staged ? { source: { path: staged.rel } } : { text: o.text! }), ...(o.mode !== undefined ? { mode: o.mode } : {}), ...(o.ifSha256 ? { ifSha256: o.ifSha256 } : {}) }],
        });
      } finally {
        // Only once the job is over: a job still running after --timeout still reads it.
        if (finished && staged) await rm(staged.abs, { force: true });
      }
    });

  withWait(session.command('rm <session> <path>').description('enqueue repack-session: delete <path> (a file, or a directory and everything under it)'))
    .action(async (id: string, path: string, o: Options) => {
      parseSessionId(id);
      validateOpPath(path);
      await submit(ctx, ctx.config(), o, { backend: o.backend, session: id, ops: [{ op: 'delete', path, ...(o.ifSha256 ? { ifSha256: o.ifSha256 } : {}) }] });
    });
}

interface Options {
  backend: string;
  ifSha256?: string;
  wait: boolean;
  timeout?: number;
}

/** Opens the configured backends for a read; failures after the arguments were checked exit 1 with their code. */
async function withBucket(ctx: SessionCliContext, name: string, fn: (b: Bucket) => Promise<void>): Promise<void> {
  const cfg = ctx.config();
  const buckets = await openBackends(cfg.backends, { cwd: ctx.io.cwd, AZURE_STORAGE_CONNECTION_STRING: ctx.io.env.AZURE_STORAGE_CONNECTION_STRING });
  try {
    const bucket = buckets.get(name);
    if (!bucket) throw new InvalidArgumentError(`no backend named "${name}"`);
    try {
      await fn(bucket);
    } catch (err) {
      // A missing session or file, a corrupt or rotten archive: the read failed (1), the input was fine.
      if (!(err instanceof StorageError)) throw err;
      ctx.io.err(`${err.message}\n`);
      ctx.setExit(EXIT_FAILED);
    }
  } finally {
    await Promise.allSettled([...buckets.values()].map((b) => b.close()));
  }
}

/** Enqueues, and with --wait awaits the outcome; returns false while the job may still run. */
async function submit(ctx: SessionCliContext, cfg: Config, o: Options, payload: Payloads['repack-session']): Promise<boolean> {
  const client = new StevedoreClient({ redisUrl: cfg.redisUrl, queue: cfg.queue, prefix: cfg.prefix });
  try {
    if (!o.wait) {
      ctx.io.out(`${await client.repackSession(payload)}\n`);
      return false;
    }
    try {
      const result = await client.run('repack-session', payload, { timeoutMs: o.timeout !== undefined ? o.timeout * 1000 : undefined });
      ctx.io.out(`${JSON.stringify(result)}\n`);
      return true;
    } catch (err) {
      ctx.io.err(`${(err as Error).message}\n`);
      ctx.setExit((err as { code?: string }).code === 'InvalidInput' ? EXIT_USAGE : EXIT_FAILED);
      return (err as { pending?: boolean }).pending !== true;
    }
  } finally {
    await client.close();
  }
}

/**
 * Copies a file into the staging area under incoming/ as `store` does: whole and fsynced before
 * it gets its name, under a temp name the staging sweep removes if the copy dies half-way.
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

function positive(v: string): number {
  const n = Number(v);
  if (!(n > 0)) throw new InvalidArgumentError('must be a positive number');
  return n;
}

function octal(v: string): number {
  if (!/^0?[0-7]{1,4}$/.test(v)) throw new InvalidArgumentError('must be an octal mode such as 644 or 0755');
  return parseInt(v, 8);
}
