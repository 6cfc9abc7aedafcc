import { freePort, startServerProcess, tempDir, type ServerProcess } from './process.js';

export interface TestRedis {
  url: string;
  port: number;
  /** Kills the server (SIGKILL by default) and starts it again on the same port with the same data. */
  restart(opts?: { downMs?: number; signal?: NodeJS.Signals }): Promise<void>;
  kill(signal?: NodeJS.Signals): Promise<void>;
  start(): Promise<void>;
  stop(): Promise<void>;
}

/**
 * A private redis-server per test file, on a free loopback port, persisting every write to an
 * append-only file so a kill and restart keeps what Redis acknowledged (as a production Redis
 * with AOF would). Fails the run when redis-server is missing or cannot start.
 */
export async function startRedis(): Promise<TestRedis> {
  const port = await freePort();
  const dir = await tempDir('stevedore-redis-');
  let proc: ServerProcess | undefined;
  const start = async () => {
    proc = await startServerProcess({
      command: 'redis-server',
      args: ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir.path, '--save', '', '--appendonly', 'yes', '--appendfsync', 'always', '--protected-mode', 'yes'],
      port,
    });
  };
  await start();
  return {
    url: `redis://127.0.0.1:${port}`,
    port,
    start,
    kill: async (signal: NodeJS.Signals = 'SIGKILL') => { await proc?.stop(signal); },
    async restart({ downMs = 500, signal = 'SIGKILL' } = {}) {
      await proc?.stop(signal);
      await new Promise((r) => setTimeout(r, downMs));
      await start();
    },
    async stop() {
      await proc?.stop('SIGTERM');
      await dir.remove();
    },
  };
}
