import type { z } from 'zod';
import type { JobDeps } from '../src/payload.js';
import { FetchPayload, fetchToStaging } from './fetch-to-staging.js';
import { LogPayload, log } from './log.js';
import { RepackPayload, repackSession } from './repack-session.js';
import { StorePayload, store } from './store.js';
import { MigratePayload, migrate } from './migrate.js';
import { MIGRATE_CHUNK, MigrateChunkPayload, migrateChunk } from './migrate-chunk.js';
import { VerifyPayload, verify } from './verify.js';
import { VERIFY_CHUNK, VerifyChunkPayload, verifyChunk } from './verify-chunk.js';

export interface JobType<S extends z.ZodType = z.ZodType, R = unknown> {
  payload: S;
  handle(p: z.infer<S>, d: JobDeps): Promise<R>;
}

const job = <S extends z.ZodType, R>(payload: S, handle: (p: z.infer<S>, d: JobDeps) => Promise<R>): JobType<S, R> => ({ payload, handle });

/** Job name (the contract's) to its payload schema and handler. */
export const JOBS = {
  store: job(StorePayload, store),
  'fetch-to-staging': job(FetchPayload, fetchToStaging),
  log: job(LogPayload, log),
  'repack-session': job(RepackPayload, repackSession),
  migrate: job(MigratePayload, migrate),
  verify: job(VerifyPayload, verify),
  // Internal: a migration's and a verify's chunks (the contract allows internal names).
  [MIGRATE_CHUNK]: job(MigrateChunkPayload, migrateChunk),
  [VERIFY_CHUNK]: job(VerifyChunkPayload, verifyChunk),
} as const;

/** The contract's public job names; the chunk jobs are internal (the runner still serves them). */
export type JobName = Exclude<keyof typeof JOBS, typeof MIGRATE_CHUNK | typeof VERIFY_CHUNK>;
/** The contract's public job names (the chunk jobs are internal). */
export const JOB_NAMES = (Object.keys(JOBS) as Array<keyof typeof JOBS>).filter((n): n is JobName => n !== MIGRATE_CHUNK && n !== VERIFY_CHUNK);

export type { StorePayload, StoreResult } from './store.js';
export type { FetchPayload, FetchResult } from './fetch-to-staging.js';
export type { LogPayload, LogResult } from './log.js';
export type { RepackPayload, RepackResult } from './repack-session.js';
export type { MigratePayload, MigrateResult } from './migrate.js';
export type { VerifyPayload, VerifyResult } from './verify.js';
