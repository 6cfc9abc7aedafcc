import { randomUUID } from 'node:crypto';
import { GcsDriver, type GcsDriverOptions } from '../../src/backends/gcs.js';
import type { ConformanceTarget } from '../conformance/target.js';
import { startFakeGcs, type FakeGcs } from './gcs-server.js';

/** Small sizes so the suite's bigger-than-threshold objects become multi-chunk resumable uploads. */
export const TEST_RESUMABLE_THRESHOLD = 1024 * 1024;
export const TEST_CHUNK_SIZE = 256 * 1024;

export interface GcsTarget extends ConformanceTarget {
  /** The fake server behind the target, started on first use. */
  server(): Promise<FakeGcs>;
  /** A driver on a new, empty bucket of the same server (or on `opts.bucket`). */
  newDriver(opts?: Partial<GcsDriverOptions>): Promise<GcsDriver>;
}

/**
 * The GCS conformance target, on the in-process fake JSON API server (test/harness/gcs-server.ts).
 * The server starts on first use, so a failure to start fails the tests that need it.
 */
export function gcsConformanceTarget(opts: { resumableThreshold?: number; chunkSize?: number } = {}): GcsTarget {
  const resumableThreshold = opts.resumableThreshold ?? TEST_RESUMABLE_THRESHOLD;
  const chunkSize = opts.chunkSize ?? TEST_CHUNK_SIZE;
  let started: Promise<FakeGcs> | undefined;
  const server = () => (started ??= startFakeGcs());
  // One bucket for every driver() and corrupt(): the suite gives each test its own key prefix.
  const shared = `t-${randomUUID().slice(0, 8)}`;
  let sharedMade: Promise<void> | undefined;
  const sharedBucket = async () => {
    const s = await server();
    await (sharedMade ??= Promise.resolve().then(() => s.createBucket(shared)));
    return shared;
  };
  const newDriver = async (extra: Partial<GcsDriverOptions> = {}) => {
    const s = await server();
    let bucket = extra.bucket;
    if (bucket === undefined) {
      bucket = `t-${randomUUID().slice(0, 8)}`;
      s.createBucket(bucket);
    }
    // maxRetries 2 keeps failing tests quick; the SDK waits 1-2 s between attempts.
    return new GcsDriver({ endpoint: s.endpoint, resumableThreshold, chunkSize, maxRetries: 2, timeoutMs: 30_000, ...extra, bucket });
  };
  return {
    name: 'gcs',
    multipartThreshold: resumableThreshold,
    server,
    newDriver,
    async driver() {
      return newDriver({ bucket: await sharedBucket() });
    },
    async corrupt(storeKey, bytes) {
      await (await server()).corrupt(await sharedBucket(), storeKey, bytes);
    },
    async teardown() {
      const s = started;
      started = undefined;
      sharedMade = undefined;
      await s?.then((x) => x.close(), () => {});
    },
  };
}
