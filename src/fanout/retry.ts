import { ErrorCode, classifyCommon, isRetryable } from '../errors.js';

/** Tries of one object inside a chunk before it is reported as failed (the chunk itself goes on). */
const OBJECT_TRIES = 3;
const BACKOFF_MS = 250;

/** The contract code of any error a Bucket raised. */
export function codeOf(err: unknown): ErrorCode {
  return classifyCommon(err) ?? ErrorCode.Unknown;
}

/**
 * Runs one object's work with the contract's error rules: Transient and Unknown are tried again
 * (OBJECT_TRIES in all, backing off with jitter), other codes fail at once. A cancelled job's
 * abort is rethrown as is, never retried or reported as the object's failure.
 */
export async function retrying<T>(signal: AbortSignal, work: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await work();
    } catch (err) {
      if (signal.aborted || attempt >= OBJECT_TRIES || !isRetryable(codeOf(err))) throw err;
      await new Promise((r) => setTimeout(r, BACKOFF_MS * 2 ** (attempt - 1) * (0.5 + Math.random() / 2)));
    }
  }
}
