import { randomUUID } from 'node:crypto';
import { copyFile, mkdir, open, rename, rm } from 'node:fs/promises';
import { basename, join } from 'node:path';
import type { Writable } from 'node:stream';
import { InvalidArgumentError } from 'commander';
import type { App } from '../app.js';
import type { JobName, Payloads, Progress } from '../queue/client.js';
import { STAGING_INCOMING, STAGING_TMP } from '../staging.js';

/** What the commands read and write: the process's environment and streams, passed in by bin/. */
export interface CliIo {
  env: NodeJS.ProcessEnv;
  cwd: string;
  out: (s: string) => void;
  err: (s: string) => void;
  isTTY: boolean;
  /** Where raw bytes go (`session cat`). @defaultValue process.stdout */
  stdout?: Writable;
}

/** Exit codes: 0 done, 1 the job failed (or could not be submitted: Redis unreachable), 2 bad usage or input. */
export const EXIT = { ok: 0, failed: 1, usage: 2 } as const;

/** How long a command waits for Redis to answer before it gives up (exit 1). */
const REDIS_WAIT_MS = 5_000;

/**
 * Enqueues, and with --wait awaits the outcome. Returns true once the job is over or was never
 * enqueued (its staged input is no longer needed), false while it may still run.
 */
/** The options every enqueueing command has. */
export interface WaitOptions {
  wait?: boolean | undefined;
  /** Seconds. */
  timeout?: number | undefined;
}

export async function submit<N extends JobName>(app: App, io: CliIo, setExit: (c: number) => void, o: WaitOptions, name: N, payload: Payloads[N], judge?: (result: unknown) => void): Promise<boolean> {
  const client = app.client();
  try {
    try {
      await client.ready(REDIS_WAIT_MS);
    } catch (err) {
      // Not bad usage: the same command succeeds once Redis is back.
      io.err(`${(err as Error).message}\n`);
      setExit(EXIT.failed);
      return true;
    }
    if (!o.wait) {
      try {
        io.out(`${await client.add(name, payload)}\n`);
      } catch (err) {
        // The reply was lost, not necessarily the job: it may have been enqueued.
        io.err(`Transient: enqueueing at ${client.where} failed, the job may or may not have been enqueued: ${(err as Error).message}\n`);
        setExit(EXIT.failed);
      }
      return false;
    }
    const bar = io.isTTY ? (p: Progress) => io.err(`\r${'scanned' in p ? countersBar(p as unknown as Record<string, number>) : progressBar(p)}`) : undefined;
    let added = false;
    try {
      const result = await client.run(name, payload, {
        timeoutMs: typeof o.timeout === 'number' ? o.timeout * 1000 : undefined, ...(bar ? { onProgress: bar } : {}), onAdded: () => { added = true; },
      });
      if (bar) io.err('\n');
      io.out(`${JSON.stringify(result)}\n`);
      judge?.(result);
      return true;
    } catch (err) {
      if (bar) io.err('\n');
      if (!added) {
        // As above: the add's reply was lost, and with it whether the job exists.
        io.err(`Transient: enqueueing at ${client.where} failed, the job may or may not have been enqueued: ${(err as Error).message}\n`);
        setExit(EXIT.failed);
        return false;
      }
      io.err(`${(err as Error).message}\n`);
      setExit((err as { code?: string }).code === 'InvalidInput' ? EXIT.usage : EXIT.failed);
      return (err as { pending?: boolean }).pending !== true;
    }
  } finally {
    await app.close();
  }
}

/**
 * Copies a file into the staging area under incoming/, whole and on disk before it is visible
 * there (a crash must not leave a short file for the job to store), under a temp name the staging
 * sweep removes if the copy dies half-way.
 */
export async function stageFile(stagingDir: string, file: string): Promise<{ rel: string; abs: string }> {
  const rel = join(STAGING_INCOMING, `${randomUUID()}-${basename(file)}`);
  const abs = join(stagingDir, rel);
  await mkdir(join(stagingDir, STAGING_INCOMING), { recursive: true });
  const tmp = join(stagingDir, STAGING_INCOMING, `${STAGING_TMP}${randomUUID()}`);
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

/** A fanned-out job's progress (migrate, verify): objects done of those listed so far, and its counters. */
export function countersBar(p: Record<string, number>, width = 30): string {
  const listed = Number(p.listed ?? 0);
  const f = listed > 0 ? Math.min(1, Number(p.scanned ?? 0) / listed) : 0;
  const counts = Object.entries(p).filter(([k, v]) => typeof v === 'number' && !['listed', 'scanned', 'bytes'].includes(k)).map(([k, v]) => `${k} ${v}`).join(' ');
  return `[${'#'.repeat(Math.round(f * width)).padEnd(width, '.')}] ${p.scanned ?? 0}/${listed}${p.listingDone ? '' : '+'} ${counts} ${(Number(p.bytes ?? 0) / 1048576).toFixed(1)} MiB`;
}

export function parsePositive(v: string): number {
  const n = Number(v);
  if (!(n > 0)) throw new InvalidArgumentError('must be a positive number');
  return n;
}

