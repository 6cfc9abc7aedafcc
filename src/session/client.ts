import type { Writable } from 'node:stream';
import type { JobsOptions } from 'bullmq';
import { ErrorCode, StorageError } from '../errors.js';
import type { Payloads, Progress, Results, StevedoreClient } from '../queue/client.js';
import type { Bucket } from '../storage/bucket.js';
import { catSession, listSession, type CatResult, type SessionListing } from './read.js';

type Op = Payloads['repack-session']['ops'][number];
/** A put's content: text, base64, or a file already in the staging area (relative to it). */
export type PutContent = { text: string } | { base64: string } | { source: { path: string } };

export interface EditOptions {
  backend?: string;
  /** Apply only if the file's current sha256 is this (PreconditionFailed otherwise, nothing applied). */
  ifSha256?: string;
  /** Await the job's result instead of returning its id. */
  wait?: boolean;
  timeoutMs?: number;
  onProgress?: (p: Progress) => void;
  job?: JobsOptions;
}

/**
 * The session operations for a producer: reads straight from the backend (as the CLI and the HTTP
 * server do, no job), edits as repack-session jobs through the producer client.
 */
export class SessionClient {
  constructor(private readonly client: StevedoreClient, private readonly buckets: ReadonlyMap<string, Bucket>) {}

  ls(session: string, opts: { backend?: string; digests?: boolean; signal?: AbortSignal } = {}): Promise<SessionListing> {
    return listSession(this.bucket(opts.backend), session, opts);
  }

  cat(session: string, path: string, out: Writable, opts: { backend?: string; signal?: AbortSignal } = {}): Promise<CatResult> {
    return catSession(this.bucket(opts.backend), session, path, out, opts);
  }

  put(session: string, path: string, content: PutContent, opts: EditOptions & { mode?: number } = {}): Promise<string | Results['repack-session']> {
    return this.edit(session, [{ op: 'put', path, ...content, ...(opts.mode !== undefined ? { mode: opts.mode } : {}), ...(opts.ifSha256 ? { ifSha256: opts.ifSha256 } : {}) } as Op], opts);
  }

  rm(session: string, path: string, opts: EditOptions = {}): Promise<string | Results['repack-session']> {
    return this.edit(session, [{ op: 'delete', path, ...(opts.ifSha256 ? { ifSha256: opts.ifSha256 } : {}) }], opts);
  }

  /** Any ordered ops in one job (all or none). Resolves to the job id, or with `wait` to its result. */
  async edit(session: string, ops: Op[], opts: EditOptions = {}): Promise<string | Results['repack-session']> {
    const payload = { session, ops, ...(opts.backend ? { backend: opts.backend } : {}) };
    if (!opts.wait) return this.client.repackSession(payload, opts.job);
    return this.client.run('repack-session', payload, { ...opts.job, timeoutMs: opts.timeoutMs, ...(opts.onProgress ? { onProgress: opts.onProgress } : {}) });
  }

  private bucket(name = 'default'): Bucket {
    const b = this.buckets.get(name);
    if (!b) throw new StorageError(ErrorCode.InvalidInput, `backend: no backend named "${name}" is configured`);
    return b;
  }
}
