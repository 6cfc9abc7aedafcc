import type { Logger } from 'pino';
import type { App } from '../app.js';
import { ErrorCode, StorageError } from '../errors.js';
import type { StevedoreClient } from '../queue/client.js';
import { waitForRedis } from '../queue/connection.js';
import type { Locks } from '../payload.js';
import type { Staging } from '../staging.js';
import type { Bucket } from '../storage/bucket.js';

/** What the routes use, resolved once when the server is built. */
export interface RouteContext {
  buckets: ReadonlyMap<string, Bucket>;
  staging: Staging;
  client: StevedoreClient;
  locks: Locks;
  log: Logger;
  maxUploadBytes: number;
  /** The named backend (`?backend=`, default `default`); InvalidInput for a name not configured. */
  bucket(name?: unknown): Bucket;
  /** Whether Redis answers a PING in time. */
  redisOk(): Promise<string>;
}

export async function routeContext(app: App, maxUploadBytes: number, log: Logger): Promise<RouteContext> {
  const buckets = await app.buckets();
  const client = app.client();
  // Health asks on a connection of its own, which fails fast instead of queueing commands.
  let probe: ReturnType<App['connect']> | undefined;
  return {
    buckets, staging: app.staging, client, locks: app.locks(), log, maxUploadBytes,
    bucket(name = 'default') {
      const b = typeof name === 'string' ? buckets.get(name) : undefined;
      if (!b) throw new StorageError(ErrorCode.InvalidInput, `backend: no backend named ${JSON.stringify(String(name)).slice(0, 80)} is configured`);
      return b;
    },
    async redisOk() {
      probe ??= app.connect('producer');
      if (probe.status !== 'ready') await waitForRedis(probe, 2_500);
      return (await probe.ping()) === 'PONG' ? 'ok' : 'no PONG';
    },
  };
}

/** A query string parameter as one string, or undefined. */
export function queryParam(query: unknown, name: string): string | undefined {
  const v = (query as Record<string, unknown> | undefined)?.[name];
  return typeof v === 'string' ? v : undefined;
}
