import { Cluster, Redis, type RedisOptions } from 'ioredis';
import { redactUrl } from '../logger.js';

export const DEFAULT_QUEUE = 'stevedore';

/** Either one Redis (`REDIS_URL`) or the seed nodes of a Redis Cluster (`REDIS_CLUSTER_NODES`). */
export type RedisTarget = { url: string } | { cluster: ClusterSeed[] };
export interface ClusterSeed {
  host: string;
  port: number;
  /** From a `redis://user:pass@host:port` seed; applies to every node of the cluster. */
  username?: string | undefined;
  password?: string | undefined;
  tls?: boolean | undefined;
}
/** What BullMQ accepts as a ready-made connection, and what every piece here hands around. */
export type RedisClient = Redis | Cluster;
export type RedisRole = 'worker' | 'producer';

/** Reconnect forever with a capped backoff: a restarted Redis is the normal case, not an error. */
const retryStrategy = (times: number) => Math.min(200 * 2 ** Math.min(times, 6), 5_000);

/**
 * A Redis connection for BullMQ. Workers need `maxRetriesPerRequest: null` (blocking commands wait
 * out a Redis restart instead of failing); producers fail fast so an HTTP call or CLI does not hang.
 */
export function redisConnection(url: string, role: RedisRole, extra?: RedisOptions): Redis;
export function redisConnection(target: string | RedisTarget, role: RedisRole, extra?: RedisOptions): RedisClient;
export function redisConnection(target: string | RedisTarget, role: RedisRole, extra: RedisOptions = {}): RedisClient {
  const t: RedisTarget = typeof target === 'string' ? { url: target } : target;
  // A producer's socket that never connected holds the process for this long after disconnect()
  // (ioredis waits for a 'close' such a socket may never emit): short, so a CLI exits promptly.
  const perRequest = { maxRetriesPerRequest: role === 'worker' ? null : 3, ...(role === 'producer' ? { disconnectTimeout: 200 } : {}) };
  if ('url' in t) {
    return new Redis(t.url, { ...perRequest, enableOfflineQueue: role === 'worker', retryStrategy, lazyConnect: false, ...extra });
  }
  const [first] = t.cluster;
  if (!first) throw new Error('a Redis Cluster needs at least one seed node');
  const auth = t.cluster.find((s) => s.password !== undefined || s.username !== undefined);
  return new Cluster(t.cluster.map(({ host, port }) => ({ host, port })), {
    // ioredis queues commands until the slot map is known; producers still fail fast per request.
    enableOfflineQueue: true,
    clusterRetryStrategy: retryStrategy,
    redisOptions: {
      ...perRequest,
      ...(auth?.username !== undefined ? { username: auth.username } : {}),
      ...(auth?.password !== undefined ? { password: auth.password } : {}),
      ...(first.tls ? { tls: {} } : {}),
      ...extra,
    },
  });
}

/** For logs and messages: the URL with its password hidden, or the cluster's seeds. */
export function describeTarget(t: RedisTarget): string {
  return 'url' in t ? redactUrl(t.url) : `Redis Cluster ${t.cluster.map((s) => `${s.host}:${s.port}`).join(',')}`;
}

/**
 * `REDIS_CLUSTER_NODES` seeds: `host:port` or `redis[s]://[user:pass@]host:port`, comma-separated.
 * Throws a message naming the bad seed.
 */
export function parseClusterSeeds(spec: string): ClusterSeed[] {
  return spec.split(',').map((s) => s.trim()).filter(Boolean).map((seed) => {
    let u: URL;
    try {
      u = new URL(/^rediss?:\/\//.test(seed) ? seed : `redis://${seed}`);
    } catch {
      throw new Error(`"${redactUrl(seed)}" is not host:port`);
    }
    const port = Number(u.port || '6379');
    if (!u.hostname || u.pathname.replace(/^\/$/, '') !== '' || !(port > 0 && port < 65536)) throw new Error(`"${redactUrl(seed)}" is not host:port`);
    return {
      host: u.hostname.replace(/^\[|\]$/g, ''), port,
      ...(u.username ? { username: decodeURIComponent(u.username) } : {}),
      ...(u.password ? { password: decodeURIComponent(u.password) } : {}),
      ...(u.protocol === 'rediss:' ? { tls: true } : {}),
    };
  });
}

/**
 * True when every key starting with `prefix` hashes to one cluster slot: Redis hashes only the part
 * between the first `{` and the first `}` after it, when that part is not empty.
 */
export function hasHashTag(prefix: string): boolean {
  const open = prefix.indexOf('{');
  if (open < 0) return false;
  const close = prefix.indexOf('}', open + 1);
  return close > open + 1;
}

/** Why a prefix without a hash tag cannot work on a cluster; the same words at every start-up check. */
export const CLUSTER_PREFIX_REASON = "Redis Cluster needs a prefix with a hash tag such as \"{stevedore}\": BullMQ's scripts touch several keys of a queue at once, and Redis Cluster refuses (CROSSSLOT) unless they all hash to one slot";

/** Throws unless `prefix` can be used on a Redis Cluster. */
export function assertClusterPrefix(prefix: string): void {
  if (!hasHashTag(prefix)) throw new Error(`prefix "${prefix}" has no hash tag; ${CLUSTER_PREFIX_REASON}`);
}

/** The name of an internal queue (webhook deliveries, a migration's chunks): `<queue>-<purpose>`. */
export const internalQueue = (queue: string, purpose: string): string => `${queue}-${purpose}`;

/**
 * Resolves once `conn` is connected and answers, or rejects after `timeoutMs` with the last
 * connection error: for one-shot callers (the CLI) that must fail rather than wait out an outage.
 */
export async function waitForRedis(conn: RedisClient, timeoutMs: number): Promise<void> {
  // The connection's own error (ECONNREFUSED, auth) says more than a refused command's.
  let connError: Error | undefined;
  let last: Error | undefined;
  const onError = (err: Error) => { connError = err; };
  conn.on('error', onError);
  let timer: NodeJS.Timeout | undefined;
  let over = false;
  try {
    await Promise.race([
      (async () => {
        // `ping` goes through the offline queue (cluster) or fails at once while disconnected (a
        // producer without one): either way, try again until it answers or time runs out.
        while (!over) {
          try {
            if ((await conn.ping()) === 'PONG') return;
          } catch (err) {
            last = err as Error;
          }
          await new Promise((r) => setTimeout(r, 100));
        }
      })(),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => {
          const why = connError ?? last;
          reject(new Error(`no answer within ${timeoutMs} ms${why ? ` (${why.message})` : ''}`));
        }, timeoutMs);
      }),
    ]);
  } finally {
    over = true;
    clearTimeout(timer);
    conn.off('error', onError);
  }
}

/** A second connection like `conn` (BullMQ's blocking readers need one of their own). */
export function duplicateConnection(conn: RedisClient): RedisClient {
  // The same call on both sides: TypeScript cannot call `duplicate` on the union, whose signatures differ.
  return conn instanceof Cluster ? conn.duplicate() : conn.duplicate();
}
