// The package's public surface: the producer client, the storage layer, and the contract's types.
export { StevedoreClient, DEFAULT_JOB_OPTIONS, type ClientOptions, type Payloads, type Results, type Progress } from './queue/client.js';
export { DEFAULT_RETENTION, type Retention } from './queue/retention.js';
export type { RedisTarget, ClusterSeed } from './queue/connection.js';
export { ErrorCode, StorageError, isRetryable } from './errors.js';
export { Bucket, type PutOptions, type GetOptions, type GetResult, type PutSource } from './storage/bucket.js';
export type { Driver, ObjectInfo } from './storage/driver.js';
export { openBackend, openBackends } from './backends/open.js';
export { versions, type BuildVersion } from './versions.js';
export { JOB_NAMES } from '../jobs/index.js';
export type { StorePayload, StoreResult, FetchPayload, FetchResult, LogPayload, LogResult } from '../jobs/index.js';
