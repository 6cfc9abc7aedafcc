import { expect } from 'vitest';
import { ErrorCode, StorageError } from '../../src/errors.js';
import { exists, listAll } from './tarballs.js';

export interface Refusal {
  code?: ErrorCode;
  /** The message must say "limit". */
  limit?: boolean;
  /** The message must match, so a refusal for the wrong reason does not pass. */
  match?: RegExp;
  /** The entry the error must name. */
  key?: string;
  /** Paths outside the destination that must not exist afterwards. */
  outside?: string[];
  /** What `root` must hold afterwards; by default only the empty staging directory. */
  rootHolds?: string[];
}

/**
 * Awaits a refused extraction and checks everything RELIABILITY asks of one: the code, no
 * destination, no temp directory left beside it, nothing written anywhere else.
 */
export async function expectRefused(
  box: { root: string; dest: string },
  run: Promise<unknown>,
  want: Refusal = {},
): Promise<StorageError> {
  const err: unknown = await run.then(() => new Error('extraction succeeded'), (e: unknown) => e);
  expect(err).toBeInstanceOf(StorageError);
  const e = err as StorageError;
  expect(e.code, e.message).toBe(want.code ?? ErrorCode.InvalidInput);
  if (want.limit) expect(e.message).toMatch(/limit/);
  if (want.match) expect(e.message).toMatch(want.match);
  if (want.key !== undefined) expect(e.key).toBe(want.key);
  expect(await exists(box.dest)).toBe(false);
  expect(await listAll(box.root)).toEqual(want.rootHolds ?? ['staging']);
  for (const p of want.outside ?? []) expect(await exists(p), p).toBe(false);
  return e;
}
