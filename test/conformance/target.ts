import type { Driver } from '../../src/storage/driver.js';

/**
 * What a backend's test file hands the shared conformance suite: a few lines of harness per
 * backend, one suite for all (the go-cloud `drivertest` shape).
 */
export interface ConformanceTarget {
  /** Backend kind, for test names. */
  name: string;
  /** A new driver on an empty bucket/container/root, or on a shared one (each test also gets its own key prefix). */
  driver(): Promise<Driver>;
  /**
   * Replace the stored bytes of the store key `storeKey` (prefix included) with `bytes`, keeping the
   * recorded metadata (digest) as it was: simulated bit rot, done behind the Bucket's back.
   */
  corrupt(storeKey: string, bytes: Buffer): Promise<void>;
  /** Size above which the driver uploads in several parts/blocks/chunks; the suite writes one bigger than this. */
  multipartThreshold: number;
  /**
   * Longest key segment (bytes) the emulator behind the target can store, when it is below the
   * contract's 255 (s3rver keeps each object in a file named after its last segment plus a suffix).
   * Only an emulator's limit belongs here, never a driver's; real stores take the suite's keys.
   */
  emulatorSegmentLimit?: number;
  /** The store behind the target splices (Driver.splice): the suite expects splices to assemble, not to resolve undefined. */
  splices?: boolean;
  /** Stops servers and removes temp dirs. */
  teardown(): Promise<void>;
}
