import { Redis, type RedisOptions } from 'ioredis';

export const DEFAULT_QUEUE = 'stevedore';

/**
 * A Redis connection for BullMQ. Workers need `maxRetriesPerRequest: null` (blocking commands wait
 * out a Redis restart instead of failing); producers fail fast so an HTTP call or CLI does not hang.
 */
export function redisConnection(url: string, role: 'worker' | 'producer', extra: RedisOptions = {}): Redis {
  return new Redis(url, {
    maxRetriesPerRequest: role === 'worker' ? null : 3,
    enableOfflineQueue: role === 'worker',
    // Reconnect forever with a capped backoff: a restarted Redis is the normal case, not an error.
    retryStrategy: (times) => Math.min(200 * 2 ** Math.min(times, 6), 5_000),
    lazyConnect: false,
    ...extra,
  });
}
