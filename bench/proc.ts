/** Process plumbing for the bench: child runs of bench/storage.ts, openssl, test files, progress. */
import { spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { open, symlink, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { caseArgv, type CaseArgs, type CaseName, type CaseResult } from './storage.js';
import { MiB, secs, size } from './table.js';

const REPO = fileURLToPath(new URL('..', import.meta.url));
const t0 = performance.now();

/** A progress line on stderr, so stdout holds only the tables. */
export function progress(msg: string): void {
  process.stderr.write(`[bench ${((performance.now() - t0) / 1000).toFixed(1).padStart(6)} s] ${msg}\n`);
}

/** The SDK warns once per process that it will soon need Node 22; in every child that drowns the progress lines. */
const CHILD_ENV = { ...process.env, AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true' };

export function run(command: string, args: string[], env: NodeJS.ProcessEnv = process.env): Promise<{ stdout: string; ms: number }> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    // stderr passes through so a failing child shows its stack trace.
    const child = spawn(command, args, { cwd: REPO, env, stdio: ['ignore', 'pipe', 'inherit'] });
    let stdout = '';
    child.stdout.on('data', (b: Buffer) => { stdout += b.toString(); });
    child.on('error', reject);
    child.on('close', (code, signal) => {
      const ms = performance.now() - started;
      if (code === 0) resolve({ stdout, ms });
      else reject(new Error(`${command} ${args.slice(0, 4).join(' ')} ... exited with ${code ?? signal}`));
    });
  });
}

export type Child = (name: CaseName, args: CaseArgs) => Promise<CaseResult>;

/** Compiles `entry` (relative to the repository) and what it imports to plain JS under `dir`; returns the JS entry's path. */
export async function compileEntry(entry: string, dir: string): Promise<string> {
  const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
  // --noCheck: `npm run typecheck` checks types; here only the emitted JS matters, and fast.
  await run(process.execPath, [tsc, '--outDir', dir, '--rootDir', REPO, '--module', 'NodeNext', '--moduleResolution', 'NodeNext',
    '--target', 'ES2022', '--lib', 'ES2024', '--types', 'node', '--skipLibCheck', '--noCheck', join(REPO, entry)]);
  // The JS must load as ESM and find the project's packages from outside the repository.
  await writeFile(join(dir, 'package.json'), '{ "type": "module" }\n');
  await symlink(join(REPO, 'node_modules'), join(dir, 'node_modules'), 'dir').catch((err: NodeJS.ErrnoException) => { if (err.code !== 'EEXIST') throw err; });
  return join(dir, entry.replace(/\.ts$/, '.js'));
}

/**
 * Compiles bench/storage.ts and what it imports to plain JS under `dir`, and returns a runner of
 * one case per fresh `node` process. Not `node --import tsx`: tsx's loader runs on a second thread
 * with its own V8 heap, ~40 MB of RSS that is no part of what a deployed (compiled) worker uses.
 */
export async function compileCases(dir: string): Promise<Child> {
  const script = await compileEntry('bench/storage.ts', dir);
  return async (name, args) => {
    const { stdout } = await run(process.execPath, [script, ...caseArgv(name, args)], CHILD_ENV);
    return JSON.parse(stdout.trim().split('\n').pop() ?? '') as CaseResult;
  };
}

/** `openssl dgst -sha256`: wall time of the whole process, spawn included, and the digest it printed. */
export async function openssl(file: string): Promise<{ ms: number; sha256: string }> {
  const { stdout, ms } = await run('openssl', ['dgst', '-sha256', file]);
  const sha256 = /=\s*([0-9a-f]{64})\s*$/.exec(stdout)?.[1];
  if (!sha256) throw new Error(`unexpected openssl output: ${stdout}`);
  return { ms, sha256 };
}

/** `dd bs=1M conv=fsync`: copying a file durably without hashing, the disk's floor for a put. */
export async function dd(src: string, dst: string): Promise<number> {
  return (await run('dd', [`if=${src}`, `of=${dst}`, 'bs=1M', 'conv=fsync', 'status=none'])).ms;
}

/**
 * The best standard-tool pipeline doing a put's work: one read of the file feeds both `openssl dgst
 * -sha256` (through tee's process substitution) and a durable copy (`dd bs=1M conv=fsync`). bash
 * does not wait for a process substitution, so openssl writes its digest to the pipe this process
 * reads (fd 3, the script's own stdout: inside `tee >(...)` stdout is already the pipe to dd). The
 * child's 'close' comes only once every holder of that pipe, openssl included, has exited: the
 * time covers openssl finishing, and the digest it printed proves it hashed every byte.
 */
export async function teePipeline(src: string, dst: string): Promise<{ ms: number; sha256: string }> {
  const script = 'set -o pipefail; exec 3>&1; tee >(openssl dgst -sha256 >&3) < "$1" | dd of="$2" bs=1M conv=fsync status=none';
  const { stdout, ms } = await run('bash', ['-c', script, 'bash', src, dst]);
  const sha256 = /=\s*([0-9a-f]{64})\s*$/.exec(stdout)?.[1];
  if (!sha256) throw new Error(`unexpected pipeline output: ${stdout}`);
  return { ms, sha256 };
}

/** Flushes every dirty page (the previous run's writes, deletes), so no run pays for another's writeback. */
export async function settle(): Promise<void> {
  await run('sync', []);
}

/** Writes `bytes` random bytes, so no layer (disk, page cache, emulator) can profit from patterns. */
export async function randomFile(path: string, bytes: number): Promise<void> {
  const started = performance.now();
  const fh = await open(path, 'wx');
  try {
    const buf = Buffer.allocUnsafe(4 * MiB);
    for (let done = 0; done < bytes;) {
      const n = Math.min(buf.length, bytes - done);
      randomFillSync(buf, 0, n);
      for (let off = 0; off < n;) off += (await fh.write(buf, off, n - off)).bytesWritten;
      done += n;
    }
  } finally {
    await fh.close();
  }
  progress(`generated ${size(bytes)} of random bytes in ${secs(performance.now() - started)}: ${path}`);
}

/** Reads a file once so every timed run, the openssl reference included, starts from a warm page cache. */
export async function warm(path: string): Promise<void> {
  await pipeline(createReadStream(path, { highWaterMark: 4 * MiB }), new Writable({ write: (_c, _e, cb) => cb() }));
}
