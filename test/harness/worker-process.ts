import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';

/** The repository root, where `--import tsx` resolves and the worker's relative paths start. */
const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const ENTRY = 'src/bin/stevedore.ts';

/** One pino line of the worker's log (non-JSON output is kept as `{ msg }`). */
export interface LogLine {
  level?: number;
  time?: number;
  msg?: string;
  jobId?: string;
  [field: string]: unknown;
}

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface WorkerProcess {
  /** STEVEDORE_WORKER_NAME: what jobs record as `processedBy`. */
  name: string;
  pid: number;
  child: ChildProcess;
  /** Log lines so far, parsed. */
  logs(): LogLine[];
  /** Everything the process printed, for failure messages. */
  output(): string;
  /** Resolves with the first log line (already seen or still to come) that matches. */
  waitForLog(match: (l: LogLine) => boolean, timeoutMs?: number): Promise<LogLine>;
  alive(): boolean;
  kill(signal?: NodeJS.Signals): void;
  /** Settles when the process has exited. */
  exited: Promise<Exit>;
  /** SIGKILL if still running; resolves once it has exited. */
  stop(): Promise<void>;
}

/** Every child not yet known to have exited, so a failing test cannot leak one. */
const live = new Set<WorkerProcess>();
let counter = 0;

/** Variables of the test runner's own environment that would otherwise leak into the worker's configuration. */
const OWN = /^(STEVEDORE_|REDIS_URL$|REDIS_CLUSTER_NODES$|AWS_|LOG_LEVEL$|AZURE_STORAGE_|GOOGLE_APPLICATION_CREDENTIALS$)/;

/**
 * Starts `stevedore worker` as a child process, configured only by `env` over test defaults:
 * info-level JSON logs (read back through `logs()`), a 4 s lock and a 2 s stalled check so a killed
 * worker's job is handed back within seconds. Resolves once the worker logs 'worker started';
 * rejects with its output if it exits or stays silent first.
 */
export async function spawnWorker(env: Record<string, string>, opts: { startTimeoutMs?: number } = {}): Promise<WorkerProcess> {
  const name = env.STEVEDORE_WORKER_NAME ?? `test-worker-${process.pid}-${++counter}`;
  const inherited = Object.fromEntries(Object.entries(process.env).filter(([k]) => !OWN.test(k)));
  const child = spawn(process.execPath, ['--import', 'tsx', ENTRY, 'worker'], {
    cwd: ROOT,
    env: {
      ...inherited,
      LOG_LEVEL: 'info',
      STEVEDORE_LOCK_DURATION_MS: '4000',
      STEVEDORE_STALLED_INTERVAL_MS: '2000',
      ...env,
      STEVEDORE_WORKER_NAME: name,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines: LogLine[] = [];
  const waiters = new Set<{ match: (l: LogLine) => boolean; resolve: (l: LogLine) => void }>();
  let out = '';
  const onText = (): ((b: Buffer) => void) => {
    let partial = '';
    return (b) => {
      const text = b.toString();
      out = (out + text).slice(-200_000);
      const parts = (partial + text).split('\n');
      partial = parts.pop() ?? '';
      for (const raw of parts) {
        if (!raw.trim()) continue;
        let line: LogLine;
        try {
          const parsed = JSON.parse(raw) as unknown;
          line = typeof parsed === 'object' && parsed !== null ? (parsed as LogLine) : { msg: raw };
        } catch {
          line = { msg: raw };
        }
        lines.push(line);
        for (const w of waiters) if (w.match(line)) { waiters.delete(w); w.resolve(line); }
      }
    };
  };
  child.stdout?.on('data', onText());
  child.stderr?.on('data', onText());

  let exit: Exit | undefined;
  const exited = new Promise<Exit>((resolve) => {
    child.once('exit', (code, signal) => { exit = { code, signal }; resolve(exit); });
  });
  // Last resort: a test process that ends without running its hooks still takes its workers along.
  const onParentExit = () => { if (!exit) child.kill('SIGKILL'); };
  process.once('exit', onParentExit);

  const w: WorkerProcess = {
    name,
    pid: child.pid ?? -1,
    child,
    logs: () => lines,
    output: () => out,
    waitForLog(match, timeoutMs = 30_000) {
      const seen = lines.find(match);
      if (seen) return Promise.resolve(seen);
      return new Promise<LogLine>((resolve, reject) => {
        const waiter = { match, resolve: (l: LogLine) => { clearTimeout(timer); resolve(l); } };
        const timer = setTimeout(() => {
          waiters.delete(waiter);
          reject(new Error(`worker ${name} logged no matching line within ${timeoutMs} ms${exit ? ` (exited ${JSON.stringify(exit)})` : ''}\n${out.slice(-4000)}`));
        }, timeoutMs);
        waiters.add(waiter);
      });
    },
    alive: () => !exit,
    kill(signal = 'SIGTERM') {
      if (!exit) child.kill(signal);
    },
    exited,
    async stop() {
      if (!exit) child.kill('SIGKILL');
      await exited;
    },
  };
  live.add(w);
  void exited.then(() => {
    live.delete(w);
    process.off('exit', onParentExit);
  });

  const started = w.waitForLog((l) => l.msg === 'worker started', opts.startTimeoutMs ?? 30_000);
  const died = exited.then((e) => { throw new Error(`worker ${name} exited ${JSON.stringify(e)} before it started:\n${out.slice(-4000)}`); });
  try {
    await Promise.race([started, died]);
  } catch (err) {
    await w.stop();
    throw err;
  } finally {
    started.catch(() => {});
    died.catch(() => {});
  }
  return w;
}

/** SIGKILLs every worker process this harness started that is still running; for afterEach/afterAll. */
export async function stopAllWorkers(): Promise<void> {
  await Promise.all([...live].map((w) => w.stop()));
}

/** After a test: on failure, print the last `tail` characters of each worker's output; then forget the workers (they are stopped by the caller). */
export function printWorkersOnFailure(ctx: { task: { result?: { state?: string } } }, spawned: WorkerProcess[], tail = 6000): void {
  if (ctx.task.result?.state === 'fail') for (const w of spawned) console.error(`--- ${w.name} ---\n${w.output().slice(-tail)}`);
  spawned.length = 0;
}
