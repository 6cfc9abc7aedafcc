import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { freePort, startServerProcess, tempDir, type ServerProcess } from './process.js';

const run = promisify(execFile);

export interface TestRedisCluster {
  /** `host:port` of every master, as REDIS_CLUSTER_NODES takes them. */
  nodes: string[];
  ports: number[];
  stop(): Promise<void>;
}

/**
 * A private three-master Redis Cluster on free loopback ports (no replicas, no persistence: a
 * test's data need not survive it). Resolves once every node reports `cluster_state:ok`; fails the
 * run when redis-server or redis-cli is missing.
 */
export async function startRedisCluster(masters = 3): Promise<TestRedisCluster> {
  const dir = await tempDir('stevedore-cluster-');
  const procs: ServerProcess[] = [];
  const ports: number[] = [];
  try {
    for (let i = 0; i < masters; i++) {
      const port = await freePort();
      ports.push(port);
      procs.push(await startServerProcess({
        command: 'redis-server',
        args: ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir.path, '--cluster-enabled', 'yes',
          '--cluster-config-file', `nodes-${port}.conf`, '--cluster-node-timeout', '5000', '--save', '', '--appendonly', 'no', '--protected-mode', 'yes'],
        port,
      }));
    }
    const nodes = ports.map((p) => `127.0.0.1:${p}`);
    await run('redis-cli', ['--cluster', 'create', ...nodes, '--cluster-replicas', '0', '--cluster-yes'], { timeout: 30_000 });
    const deadline = Date.now() + 20_000;
    for (const port of ports) {
      for (;;) {
        const { stdout } = await run('redis-cli', ['-p', String(port), 'cluster', 'info'], { timeout: 5_000 });
        // Every node must know all slots and all masters, or a client seeded there sees a partial map.
        if (/cluster_state:ok/.test(stdout) && new RegExp(`cluster_known_nodes:${masters}\\b`).test(stdout)) break;
        if (Date.now() > deadline) throw new Error(`the cluster on ${nodes.join(',')} did not reach cluster_state:ok:\n${stdout}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    return {
      nodes, ports,
      async stop() {
        await Promise.all(procs.map((p) => p.stop('SIGTERM')));
        await dir.remove();
      },
    };
  } catch (err) {
    await Promise.all(procs.map((p) => p.stop('SIGKILL')));
    await dir.remove();
    throw err;
  }
}
