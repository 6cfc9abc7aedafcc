import { rm } from 'node:fs/promises';
import { InvalidArgumentError, type Command } from 'commander';
import type { App } from '../app.js';
import type { Config } from '../config.js';
import { StorageError } from '../errors.js';
import type { Payloads } from '../queue/client.js';
import { parseSessionId, validateOpPath } from '../session/ids.js';
import { catSession, listSession } from '../session/read.js';
import type { Bucket } from '../storage/bucket.js';
import { EXIT, parsePositive, stageFile, submit, type CliIo } from './common.js';

/** What the session commands need of the program: its io, exit code, configuration and composition. */
export interface SessionCliContext {
  io: CliIo;
  setExit: (code: number) => void;
  config: () => Config;
  compose: (config: Config) => App;
}

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
    .option('--timeout <seconds>', 'with --wait, give up after this long', parsePositive);

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
        finished = await submit(ctx.compose(cfg), ctx.io, ctx.setExit, o, 'repack-session', {
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
      await submit(ctx.compose(ctx.config()), ctx.io, ctx.setExit, o, 'repack-session', { backend: o.backend, session: id, ops: [{ op: 'delete', path, ...(o.ifSha256 ? { ifSha256: o.ifSha256 } : {}) }] });
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
  const app = ctx.compose(ctx.config());
  const buckets = await app.buckets();
  try {
    const bucket = buckets.get(name);
    if (!bucket) throw new InvalidArgumentError(`no backend named "${name}"`);
    try {
      await fn(bucket);
    } catch (err) {
      // A missing session or file, a corrupt or rotten archive: the read failed (1), the input was fine.
      if (!(err instanceof StorageError)) throw err;
      ctx.io.err(`${err.message}\n`);
      ctx.setExit(EXIT.failed);
    }
  } finally {
    await app.close();
  }
}

function octal(v: string): number {
  if (!/^0?[0-7]{1,4}$/.test(v)) throw new InvalidArgumentError('must be an octal mode such as 644 or 0755');
  return parseInt(v, 8);
}
