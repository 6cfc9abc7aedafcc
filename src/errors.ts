/**
 * The contract's error codes. Programs act on the code, never on the message; the code leads the
 * message so it shows in a failed job's reason.
 */
export const ErrorCode = {
  InvalidInput: 'InvalidInput',
  NotFound: 'NotFound',
  ChecksumMismatch: 'ChecksumMismatch',
  PreconditionFailed: 'PreconditionFailed',
  PermissionDenied: 'PermissionDenied',
  Transient: 'Transient',
  Unknown: 'Unknown',
  /** Stopped on a producer's request (`DELETE /jobs/<id>`): never retried. A worker's own stop or a lost lock is not this: such a job is handed back or retried. */
  Cancelled: 'Cancelled',
} as const;
export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

const CODES = new Set<string>(Object.values(ErrorCode));

export interface StorageErrorOptions {
  /** The operation that failed: `put`, `get`, `list`, ... */
  op?: string;
  /** The object key involved, if any. */
  key?: string;
  /** The raw error underneath (SDK, filesystem), kept for logs and debugging. */
  cause?: unknown;
}

/** An error with a contract code. `message` reads `<Code>: <op> <key>: <detail>`. */
export class StorageError extends Error {
  readonly code: ErrorCode;
  readonly op: string | undefined;
  readonly key: string | undefined;
  /** The message without the code, operation and key. */
  readonly detail: string;

  constructor(code: ErrorCode, detail: string, opts: StorageErrorOptions = {}) {
    const where = [opts.op, opts.key === undefined ? undefined : JSON.stringify(opts.key)]
      .filter((s) => s !== undefined)
      .join(' ');
    super(`${code}: ${where ? `${where}: ` : ''}${detail}`, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'StorageError';
    this.code = code;
    this.op = opts.op;
    this.key = opts.key;
    this.detail = detail;
  }
}

export function isStorageError(err: unknown): err is StorageError {
  return err instanceof StorageError || (err instanceof Error && CODES.has((err as { code?: unknown }).code as string) && err.name === 'StorageError');
}

/** Only these codes can heal by themselves; everything else fails at once. */
export function isRetryable(code: ErrorCode): boolean {
  return code === ErrorCode.Transient || code === ErrorCode.Unknown;
}

const TRANSIENT_ERRNO = new Set([
  'ECONNRESET', 'ECONNREFUSED', 'ECONNABORTED', 'ETIMEDOUT', 'EPIPE', 'EAI_AGAIN', 'ENOTFOUND',
  'EHOSTUNREACH', 'ENETUNREACH', 'ENETDOWN', 'ESOCKETTIMEDOUT', 'UND_ERR_SOCKET',
  'UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT',
  // Resource exhaustion and I/O errors: the write is abandoned and retried from scratch.
  'ENOSPC', 'EIO', 'EDQUOT', 'EMFILE', 'ENFILE', 'EAGAIN', 'EBUSY', 'ESTALE',
]);

/**
 * Codes for errors every backend can meet: Node's own errno codes and HTTP statuses. Drivers map
 * their SDK's specific errors first and fall back to this.
 */
export function classifyCommon(err: unknown): ErrorCode | undefined {
  if (isStorageError(err)) return err.code;
  if (typeof err !== 'object' || err === null) return undefined;
  const e = err as { code?: unknown; name?: unknown; status?: unknown; statusCode?: unknown };
  if (e.name === 'AbortError' || e.code === 'ABORT_ERR') return ErrorCode.Transient;
  if (typeof e.code === 'string') {
    if (e.code === 'ENOENT') return ErrorCode.NotFound;
    if (e.code === 'EACCES' || e.code === 'EPERM' || e.code === 'EROFS') return ErrorCode.PermissionDenied;
    if (e.code === 'EEXIST') return ErrorCode.PreconditionFailed;
    // A path the input asked for that cannot be: a file where a folder must be, or a name too long.
    if (e.code === 'ENOTDIR' || e.code === 'EISDIR' || e.code === 'ENAMETOOLONG') return ErrorCode.InvalidInput;
    // A symlink where none may be followed (O_NOFOLLOW): the input named a link.
    if (e.code === 'ELOOP') return ErrorCode.InvalidInput;
    if (TRANSIENT_ERRNO.has(e.code)) return ErrorCode.Transient;
  }
  const status = typeof e.statusCode === 'number' ? e.statusCode : typeof e.status === 'number' ? e.status : undefined;
  if (status !== undefined) return codeForHttpStatus(status);
  return undefined;
}

export function codeForHttpStatus(status: number): ErrorCode | undefined {
  if (status === 404) return ErrorCode.NotFound;
  if (status === 401 || status === 403) return ErrorCode.PermissionDenied;
  if (status === 409 || status === 412) return ErrorCode.PreconditionFailed;
  if (status === 400 || status === 411 || status === 413 || status === 416) return ErrorCode.InvalidInput;
  if (status === 408 || status === 429 || status >= 500) return ErrorCode.Transient;
  return undefined;
}
