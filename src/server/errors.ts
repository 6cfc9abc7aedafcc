import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { ErrorCode, classifyCommon, isStorageError, type StorageError } from '../errors.js';

/** The contract's status for each code (CONTRACT.md, HTTP). */
export const STATUS: Record<ErrorCode, number> = {
  InvalidInput: 400, NotFound: 404, PreconditionFailed: 409, ChecksumMismatch: 422,
  PermissionDenied: 403, Cancelled: 410, Transient: 503, Unknown: 500,
};

/** Routes under this prefix are the session service's drop-in and speak its own error codes. */
export const SESSION_API = '/api/storage-worker/';

/**
 * An answer decided by a route: a status and the `error` code to send (a contract code, or one of
 * the session service's). Thrown, so the one error handler writes every error body.
 */
export class HttpError extends Error {
  constructor(readonly status: number, readonly error: string, message: string, readonly headers: Record<string, string> = {}) {
    super(message);
    this.name = 'HttpError';
  }
}

/** The contract code of a job's failed reason (`<Code>: ...`), Unknown when it names none. */
export function codeOfReason(reason: string): ErrorCode {
  const code = /^(\w+):/.exec(reason)?.[1];
  return code && code in STATUS ? (code as ErrorCode) : ErrorCode.Unknown;
}

/** A job's failure (its reason) as the contract's answer. */
export function jobFailure(reason: string): HttpError {
  const code = codeOfReason(reason);
  return new HttpError(STATUS[code], code, reason);
}

/** The session service's code for a contract error (CONTRACT.md, Sessions). */
function sessionAnswer(err: StorageError | { code: ErrorCode; message: string; op?: string | undefined }, method: string): HttpError {
  switch (err.code) {
    case 'InvalidInput': return new HttpError(400, err.op === 'session' ? 'invalid_session_path' : 'invalid_request', err.message);
    // Reads say which of the two is missing by where they looked (the archive, or a path in it).
    case 'NotFound': return new HttpError(404, err.op === 'session' ? 'session_not_found' : 'file_not_found', err.message);
    case 'PreconditionFailed': return new HttpError(412, 'precondition_failed', err.message);
    case 'Transient': return new HttpError(503, 'service_unavailable', err.message);
    default: return new HttpError(500, method === 'GET' || method === 'HEAD' ? 'download_failed' : 'upload_failed', err.message);
  }
}

/** Fastify's own errors (bad JSON, an unsupported media type) by their status. */
function frameworkAnswer(err: FastifyError): { status: number; code: ErrorCode } {
  const status = err.statusCode ?? 500;
  if (status === 413) return { status, code: ErrorCode.InvalidInput };
  if (status >= 400 && status < 500) return { status: status === 415 ? 415 : 400, code: ErrorCode.InvalidInput };
  return { status: 500, code: ErrorCode.Unknown };
}

/** The one error handler: every error body is `{ error, message }`. */
export function errorHandler(err: FastifyError, req: FastifyRequest, reply: FastifyReply): void {
  const session = req.url.startsWith(SESSION_API);
  let answer: HttpError;
  if (err instanceof HttpError) {
    answer = err;
  } else if (isStorageError(err)) {
    answer = session ? sessionAnswer(err, req.method) : new HttpError(STATUS[err.code], err.code, err.message);
  } else if (typeof err.statusCode === 'number' && err.statusCode < 500) {
    const { status, code } = frameworkAnswer(err);
    answer = session ? new HttpError(status, status === 413 ? 'upload_too_large' : 'invalid_request', err.message) : new HttpError(status, code, err.message);
  } else {
    // Node and SDK errors that escaped a wrapper: classify by errno, never echo their detail blindly.
    const code = classifyCommon(err) ?? ErrorCode.Unknown;
    const message = `${code}: ${err.message}`;
    answer = session ? sessionAnswer({ code, message }, req.method) : new HttpError(STATUS[code], code, message);
  }
  if (answer.status >= 500) req.log.error({ err }, 'request failed');
  else req.log.info({ status: answer.status, error: answer.error }, 'request refused');
  void reply.code(answer.status).headers(answer.headers).send({ error: answer.error, message: answer.message });
}

/** The not-found handler: an unknown route is the same shape as every other error. */
export function notFoundHandler(req: FastifyRequest, reply: FastifyReply): void {
  const session = req.url.startsWith(SESSION_API);
  void reply.code(404).send({ error: session ? 'not_found' : ErrorCode.NotFound, message: `NotFound: no route ${req.method} ${req.url.split('?')[0]}` });
}
