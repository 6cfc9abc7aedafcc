import { z } from 'zod';
import type { Logger } from 'pino';
import { ErrorCode, StorageError } from './errors.js';
import type { Bucket } from './storage/bucket.js';
import { validateKey, validateSha256 } from './storage/keys.js';
import type { Staging } from './staging.js';

/** Everything a job handler may use. Handlers never read process.env, touch Redis or decide retries. */
export interface JobDeps {
  /** The named backend; unknown names are InvalidInput. */
  bucket(name: string): Bucket;
  staging: Staging;
  log: Logger;
  signal: AbortSignal;
  /** Bytes done (and total when known), throttled by the runner before it reaches Redis. */
  progress(done: number, total?: number): void;
  /** When the job was first enqueued (ms since epoch): the same on every attempt. */
  enqueuedAt: number;
  /** The BullMQ job id: the same on every attempt and every redelivery of one job. */
  jobId: string;
  limits: { maxInlineBytes: number };
  /** Named locks shared by every worker process (Redis); repack-session serialises a session with them. */
  locks?: Locks;
}

/** A held lock. `signal` aborts when the lock is lost (not renewed in time, or taken over): stop before committing. */
export interface Lease {
  readonly signal: AbortSignal;
  release(): Promise<void>;
}
export interface Locks {
  /** Waits (bounded) for the lock; Transient when it stays busy, or when `signal` aborts the wait. */
  acquire(name: string, signal: AbortSignal): Promise<Lease>;
}

const storageRule = (check: (v: string) => unknown) => (v: string, ctx: z.RefinementCtx) => {
  try {
    check(v);
  } catch (err) {
    ctx.addIssue({ code: 'custom', message: err instanceof StorageError ? err.detail : String(err) });
  }
};

export const Key = z.string().superRefine(storageRule((k) => validateKey(k)));
export const BackendName = z.string().regex(/^[A-Za-z0-9._-]{1,64}$/, 'must be a configured backend name').default('default');
export const Sha256 = z.string().superRefine(storageRule(validateSha256)).transform((s) => s.toLowerCase());
export const SiteId = z.string().regex(/^[A-Za-z0-9._-]{1,128}$/, 'must match [A-Za-z0-9._-]{1,128}').refine((s) => s !== '.' && s !== '..', 'must not be "." or ".."');
export const Metadata = z.record(z.string(), z.string());
/** A path relative to the staging directory; containment is checked by Staging when used. */
export const StagingPath = z.string().min(1).max(4096);

/** Names no payload field uses, at any depth: the shapes of prototype pollution (RELIABILITY #11). */
const FORBIDDEN_NAMES = new Set(['__proto__', 'constructor', 'prototype']);

/** The path of the first forbidden name in `v`; own keys only (JSON.parse makes `__proto__` one). */
function forbiddenName(v: unknown, path: string[] = []): string | undefined {
  if (typeof v !== 'object' || v === null || path.length > 64) return undefined;
  for (const k of Object.keys(v)) {
    if (FORBIDDEN_NAMES.has(k)) return [...path, k].join('.');
    const found = forbiddenName((v as Record<string, unknown>)[k], [...path, k]);
    if (found) return found;
  }
  return undefined;
}

/** Validates a payload; the error names every offending field, and unknown fields are refused. */
export function parsePayload<S extends z.ZodType>(schema: S, data: unknown): z.infer<S> {
  const res = schema.safeParse(data);
  if (res.success) {
    // zod drops a `__proto__` key inside records (metadata) without a word; it must not pass silently.
    const bad = forbiddenName(data);
    if (bad) throw new StorageError(ErrorCode.InvalidInput, `${bad}: "${bad.split('.').pop()!}" is not allowed as a field name`);
    return res.data;
  }
  const detail = res.error.issues
    .slice(0, 5)
    .map((i) => {
      const path = i.path.length ? i.path.map(String).join('.') : 'payload';
      if (i.code === 'unrecognized_keys') return `${path}: unknown field(s) ${i.keys.map((k) => JSON.stringify(k)).join(', ')}`;
      return `${path}: ${i.message}`;
    })
    .join('; ');
  throw new StorageError(ErrorCode.InvalidInput, detail);
}
