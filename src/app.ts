import type { Logger } from 'pino';
import { openBackends } from './backends/open.js';
import { redisTarget, type Config } from './config.js';
import { StevedoreClient } from './queue/client.js';
import { describeTarget, redisConnection, type RedisClient, type RedisRole, type RedisTarget } from './queue/connection.js';
import { RedisLocks } from './queue/lock.js';
import type { Locks } from './payload.js';
import type { Retention } from './queue/retention.js';
import { Staging } from './staging.js';
import type { Bucket } from './storage/bucket.js';

/** What a process hands the composition: nothing here reads process.env itself. */
export interface AppOptions {
  /** Base of relative paths (`file:./...` backends). */
  cwd: string;
  /** Environment the SDKs' credentials come from (AZURE_STORAGE_CONNECTION_STRING...). */
  env: NodeJS.ProcessEnv;
  log: Logger;
  /** Another Redis than the configured one (`npm start`'s private redis-server). */
  redis?: RedisTarget;
}

/**
 * The parts every process is made of (worker, `start`, the CLI commands, the HTTP server): the
 * named buckets, the staging area, Redis connections and the producer client, built from one
 * Config, each only when first asked for, and closed together by `close`.
 */
export interface App {
  readonly config: Config;
  readonly log: Logger;
  /** Where Redis is: the configured URL or cluster, or the `redis` override. */
  readonly redis: RedisTarget;
  readonly retention: Retention;
  readonly staging: Staging;
  /** The configured backends, opened on first use (cloud SDKs load only then). */
  buckets(): Promise<ReadonlyMap<string, Bucket>>;
  /** A new Redis connection for this role, closed by `close`. */
  connect(role: RedisRole): RedisClient;
  /** The one producer client of this process, closed by `close`. */
  client(): StevedoreClient;
  /**
   * Named Redis locks with fencing tokens (per-session serialisation of repacks and whole-session
   * writes), on a connection of their own, under the queue's prefix (so in its cluster slot).
   */
  locks(): Locks;
  /** Sweeps what killed writers left (the staging area, every backend that has a sweep); logs, never rejects. */
  sweep(): Promise<void>;
  /**
   * Closes what was opened. `force` (a forced worker stop, whose handlers may still be running):
   * drop Redis connections instead of waiting for their replies, and leave the buckets open.
   */
  close(opts?: { force?: boolean }): Promise<void>;
}

export function composeApp(config: Config, opts: AppOptions): App {
  const redis = opts.redis ?? redisTarget(config);
  const retention: Retention = { keepCompleted: config.keepCompleted, keepFailed: config.keepFailed };
  const staging = new Staging(config.stagingDir);
  const connections: RedisClient[] = [];
  let buckets: Promise<Map<string, Bucket>> | undefined;
  let client: StevedoreClient | undefined;
  let locks: Locks | undefined;

  const app: App = {
    config, log: opts.log, redis, retention, staging,
    buckets() {
      buckets ??= openBackends(config.backends, { cwd: opts.cwd, AZURE_STORAGE_CONNECTION_STRING: opts.env.AZURE_STORAGE_CONNECTION_STRING });
      return buckets;
    },
    connect(role) {
      const conn = redisConnection(redis, role);
      conn.on('error', (err: Error) => opts.log.warn({ err: { message: err.message }, redis: describeTarget(redis) }, 'redis connection error'));
      connections.push(conn);
      return conn;
    },
    client() {
      client ??= new StevedoreClient({ redis, queue: config.queue, prefix: config.prefix, retention });
      return client;
    },
    locks() {
      locks ??= new RedisLocks(app.connect('worker'), { prefix: config.prefix, queue: config.queue, ttlMs: config.lockDurationMs });
      return locks;
    },
    async sweep() {
      const opened = await app.buckets().catch(() => new Map<string, Bucket>());
      const sweeps: Array<[string, Promise<number>]> = [['staging', staging.sweep({ maxAgeMs: config.sweepAfterMs, recordsMaxAgeMs: config.migrateRecordsDays * 86_400_000 })]];
      // Only drivers that leave temp files behind have a sweep (the filesystem).
      for (const [name, b] of opened) if (b.driver.sweep) sweeps.push([`backend ${name}`, b.driver.sweep(config.sweepAfterMs)]);
      await Promise.all(sweeps.map(([where, done]) => done.then(
        (n) => { if (n) opts.log.info({ where, removed: n }, 'swept stale temp files'); },
        (err: unknown) => opts.log.warn({ err, where }, 'sweep failed'),
      )));
    },
    async close({ force = false } = {}) {
      await client?.close().catch(() => {});
      for (const c of connections.splice(0)) {
        if (force) c.disconnect();
        else await c.quit().catch(() => c.disconnect());
      }
      // Handlers still running after a forced stop keep their buckets until the process exits.
      const opened = force ? undefined : await buckets?.catch(() => undefined);
      if (opened) await Promise.allSettled([...opened.values()].map((b) => b.close()));
    },
  };
  return app;
}
