import { randomUUID } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Cluster } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StevedoreClient } from '../../src/queue/client.js';
import { sha } from '../conformance/suite.js';
import { tempDir } from '../harness/process.js';
import { runCli } from '../harness/cli.js';
import { startRedisCluster, type TestRedisCluster } from '../harness/redis-cluster.js';
import { spawnWorker, stopAllWorkers, type WorkerProcess } from '../harness/worker-process.js';

// Contract, Queue: REDIS_CLUSTER_NODES connects to a Redis Cluster; a prefix without a hash tag
// is refused at start. A real three-master cluster, a worker process, the client and the CLI.
describe('on a Redis Cluster', () => {
  let cluster: TestRedisCluster;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  let worker: WorkerProcess;
  let client: StevedoreClient;
  let env: Record<string, string>;
  const queue = `cluster-${randomUUID().slice(0, 8)}`;
  const prefix = '{stevedore}';

  beforeAll(async () => {
    cluster = await startRedisCluster();
    tmp = await tempDir();
    await mkdir(join(tmp.path, 'staging'), { recursive: true });
    env = {
      REDIS_CLUSTER_NODES: cluster.nodes.join(','), STEVEDORE_PREFIX: prefix, STEVEDORE_QUEUE: queue,
      STEVEDORE_BACKENDS: `default=file://${join(tmp.path, 'objects')}`, STEVEDORE_STAGING_DIR: join(tmp.path, 'staging'),
    };
    worker = await spawnWorker(env);
    client = new StevedoreClient({ redis: { cluster: cluster.ports.map((port) => ({ host: '127.0.0.1', port })) }, queue, prefix });
  }, 60_000);
  afterAll(async () => {
    await client?.close();
    await stopAllWorkers();
    await cluster?.stop();
    await tmp?.remove();
  });

  it('runs store and log jobs end to end from the client', async () => {
    await writeFile(join(tmp.path, 'staging', 'a.bin'), 'cluster bytes');
    const stored = await client.run('store', { key: 'sites/s/artifacts/1.tar.gz', source: { path: 'a.bin' } }, { timeoutMs: 20_000 });
    expect(stored).toEqual({ backend: 'default', key: 'sites/s/artifacts/1.tar.gz', size: 13, sha256: sha(Buffer.from('cluster bytes')) });
    expect(await readFile(join(tmp.path, 'objects', 'sites/s/artifacts/1.tar.gz'), 'utf8')).toBe('cluster bytes');
    const logged = await client.run('log', { site: 's', build: '1', action: 'deploy', status: 'ok' }, { timeoutMs: 20_000 });
    expect(logged.key).toMatch(/^sites\/s\/logs\/.*-1\.json$/);
    // Both jobs ran in that worker process, through the cluster.
    const done = await client.queue.getJobs(['completed'], 0, -1);
    expect(done.map((j) => j.processedBy)).toEqual([worker.name, worker.name]);
    // And the queue's keys are where the hash tag puts them: one slot, on one master.
    const raw = new Cluster(cluster.ports.map((port) => ({ host: '127.0.0.1', port })));
    try {
      expect(await raw.zcard(`${prefix}:${queue}:completed`)).toBe(2);
    } finally {
      raw.disconnect();
    }
  });

  it('runs a job from the CLI', async () => {
    const run = await runCli({ PATH: process.env.PATH, ...env, LOG_LEVEL: 'silent' }, 'log', '--site', 's', '--build', '2', '--action', 'deploy', '--status', 'ok', '--wait');
    expect(run.err).toBe('');
    expect(run.code).toBe(0);
    expect(JSON.parse(run.out).key).toMatch(/^sites\/s\/logs\/.*-2\.json$/);
  });

  it('refuses at start a prefix without a hash tag, saying why', async () => {
    const run = await runCli({ PATH: process.env.PATH, ...env, STEVEDORE_PREFIX: 'bull' }, 'worker');
    expect(run.code).toBe(2);
    expect(run.err).toMatch(/STEVEDORE_PREFIX: "bull" has no hash tag, and REDIS_CLUSTER_NODES is set: .*CROSSSLOT.*one slot/);
    expect(() => new StevedoreClient({ redis: { cluster: [{ host: '127.0.0.1', port: cluster.ports[0]! }] }, prefix: 'bull' })).toThrow(/prefix "bull" has no hash tag; .*CROSSSLOT/);
  });
});
