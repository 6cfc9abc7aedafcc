import type { z } from 'zod';
import type { JobDeps } from '../src/payload.js';
import { FetchPayload, fetchToStaging } from './fetch-to-staging.js';
import { LogPayload, log } from './log.js';
import { RepackPayload, repackSession } from './repack-session.js';
import { StorePayload, store } from './store.js';

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
} as const;

export type JobName = keyof typeof JOBS;
export const JOB_NAMES = Object.keys(JOBS) as JobName[];

export type { StorePayload, StoreResult } from './store.js';
export type { FetchPayload, FetchResult } from './fetch-to-staging.js';
export type { LogPayload, LogResult } from './log.js';
export type { RepackPayload, RepackResult } from './repack-session.js';
