import { z } from 'zod';
import { ErrorCode, StorageError } from '../errors.js';
import { validateKey } from '../storage/keys.js';

/**
 * A session id is one key segment on every backend: the filesystem refuses segments over 255
 * bytes (ENAMETOOLONG) where the clouds accept them, so the longest id is fixed here instead.
 */
export const MAX_SESSION_BYTES = 255;
/** Longest op path (PAX carries any length; this bounds what one op may make a reader allocate). */
export const MAX_OP_PATH_BYTES = 4096;
/** Deepest op path, as the archive limits' `maxPathDepth`. */
export const MAX_OP_PATH_DEPTH = 1024;
/** One path segment: NAME_MAX on every filesystem an extraction could land on. */
const MAX_SEGMENT_BYTES = 255;

const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;

export interface SessionParts {
  owner: string;
  repo: string;
  branch: string;
}

/**
 * Splits `<owner>__<repo>__<branch>` at its first two `__` (the branch is the rest, `__` and all)
 * and checks it (RELIABILITY #10): each part non-empty, no `/`, no `..` anywhere (git refuses `..`
 * in branch names too), no NUL or control characters, at most 255 bytes, and the session's key
 * valid. Throws InvalidInput before any I/O.
 */
export function parseSessionId(session: unknown, field = 'session'): SessionParts {
  const bad = (why: string): never => {
    throw new StorageError(ErrorCode.InvalidInput, `${field}: ${why}`, { op: 'session', key: typeof session === 'string' ? session.slice(0, 200) : undefined });
  };
  if (typeof session !== 'string') return bad('not a string');
  if (!session.isWellFormed()) return bad('not valid UTF-8 (lone surrogate)');
  if (CONTROL.test(session)) return bad('contains NUL or a control character');
  if (Buffer.byteLength(session) > MAX_SESSION_BYTES) return bad(`longer than ${MAX_SESSION_BYTES} bytes`);
  if (session.includes('/')) return bad('must not contain "/"');
  if (session.includes('..')) return bad('must not contain ".."');
  const first = session.indexOf('__');
  const second = first < 0 ? -1 : session.indexOf('__', first + 2);
  if (second < 0) return bad('must be <owner>__<repo>__<branch>');
  const parts = { owner: session.slice(0, first), repo: session.slice(first + 2, second), branch: session.slice(second + 2) };
  for (const [name, value] of Object.entries(parts)) if (value === '') bad(`the ${name} part is empty`);
  validateKey(sessionKey(session), 'session');
  return parts;
}

/**
 * The lock every write of a whole session takes (repack-session; the HTTP upload and delete
 * should take the same), so none races another.
 */
export function sessionLockName(session: string): string {
  return `session:${session}`;
}

/** Where a session's archive lives (the contract's convention). */
export function sessionKey(session: string): string {
  return `sessions/${session}/session.tar.gz`;
}

/**
 * Checks a file path inside a session archive, as an op names it: relative, `/`-separated, no
 * empty, `.` or `..` segment, no backslash, no NUL or control characters, no Windows drive
 * prefix, bounded length and depth. The spelling is exact (never normalised): it must match the
 * archive's entry as written. Throws InvalidInput before any I/O.
 */
export function validateOpPath(path: unknown, field = 'path'): string[] {
  const bad = (why: string): never => {
    throw new StorageError(ErrorCode.InvalidInput, `${field}: ${why}`, { op: 'session', key: typeof path === 'string' ? path.slice(0, 200) : undefined });
  };
  if (typeof path !== 'string') return bad('not a string');
  if (path.length === 0) return bad('empty');
  if (!path.isWellFormed()) return bad('not valid UTF-8 (lone surrogate)');
  if (CONTROL.test(path)) return bad('contains NUL or a control character');
  if (path.includes('\ufffd')) return bad('contains U+FFFD');
  if (path.includes('\\')) return bad('contains a backslash');
  if (path.startsWith('/')) return bad('must be relative (no leading "/")');
  if (/^[A-Za-z]:/.test(path)) return bad('Windows drive prefix');
  if (Buffer.byteLength(path) > MAX_OP_PATH_BYTES) return bad(`longer than ${MAX_OP_PATH_BYTES} bytes`);
  const segments = path.split('/');
  if (segments.length > MAX_OP_PATH_DEPTH) return bad(`deeper than ${MAX_OP_PATH_DEPTH} segments`);
  for (const seg of segments) {
    if (seg === '') bad('empty path segment (leading, trailing or double "/")');
    if (seg === '.' || seg === '..') bad(`"${seg}" segment`);
    if (Buffer.byteLength(seg) > MAX_SEGMENT_BYTES) bad(`a segment longer than ${MAX_SEGMENT_BYTES} bytes`);
  }
  return segments;
}

const rule = (check: (v: string) => unknown) => (v: string, ctx: z.RefinementCtx) => {
  try {
    check(v);
  } catch (err) {
    // The field is named by zod's path; the detail without our own field prefix.
    const detail = err instanceof StorageError ? err.detail.replace(/^[^:]+: /, '') : String(err);
    ctx.addIssue({ code: 'custom', message: detail });
  }
};

export const SessionId = z.string().superRefine(rule((s) => parseSessionId(s)));
export const OpPath = z.string().superRefine(rule((p) => validateOpPath(p)));
