import { createReadStream } from 'node:fs';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { z } from 'zod';
import { settleSealed } from '../../../jobs/repack-session.js';
import { ErrorCode, StorageError } from '../../errors.js';
import { CONTENT_TYPE, readArchive } from '../../session/archive.js';
import { parseSessionId, sessionKey, sessionLockName, validateOpPath } from '../../session/ids.js';
import { listSession, openSessionFile } from '../../session/read.js';
import type { Bucket } from '../../storage/bucket.js';
import { queryParam, type RouteContext } from '../context.js';
import { enqueue } from '../enqueue.js';
import { HttpError, sessionAnswer, STATUS } from '../errors.js';
import { notModified, parseRange, sendVerified, setHeaders } from '../serve.js';
import { declaredLength, receiveToStaging } from '../upload.js';
import { bodyOf } from './artifacts.js';

/** How long a file write waits for its repack before answering 503 (the edit still lands later). */
const WRITE_WAIT_SECONDS = 600;
const BULK_MAX = 1000;
const SESSION_CODES = { tooLarge: 'upload_too_large', mismatch: 'upload_failed' };

function session(params: unknown): string {
  const s = (params as { session?: string }).session;
  try {
    parseSessionId(s, 'sessionPath');
  } catch (err) {
    throw new HttpError(400, 'invalid_session_path', (err as Error).message);
  }
  return s!;
}

function filePath(params: unknown): string {
  const p = (params as { '*'?: string })['*'];
  try {
    validateOpPath(p, 'filePath');
  } catch (err) {
    throw new HttpError(400, 'invalid_file_path', (err as Error).message);
  }
  return p!;
}

/** `If-Match: "<sha256>"` as an op's ifSha256 (`*` asks nothing the edit can check, so is ignored). */
function ifMatch(req: FastifyRequest): string | undefined {
  const h = req.headers['if-match'];
  if (h === undefined || h.trim() === '*') return undefined;
  const tag = h.trim().replace(/^W\//, '').replace(/^"(.*)"$/, '$1');
  if (!/^[0-9a-fA-F]{64}$/.test(tag)) throw new HttpError(412, 'precondition_failed', `PreconditionFailed: If-Match ${JSON.stringify(h.slice(0, 80))} is no file's ETag (a sha256)`);
  return tag.toLowerCase();
}

const missingSession = (s: string) => new HttpError(404, 'session_not_found', `NotFound: no session ${JSON.stringify(s)}`);

async function statSession(bucket: Bucket, s: string) {
  return bucket.stat(sessionKey(s)).catch((err: unknown) => {
    if (err instanceof StorageError && err.code === ErrorCode.NotFound) throw missingSession(s);
    throw err;
  });
}

/** The session service's routes, a drop-in for its clients (CONTRACT.md, Sessions). */
export function sessionRoutes(ctx: RouteContext) {
  /**
   * Whole-session writes hold the lock repack-session takes, so none races an edit, and settle
   * first the edits a holder that went away sealed (settleSealed), so none is applied after them.
   */
  const locked = async <T>(s: string, bucket: Bucket, fn: (signal: AbortSignal) => Promise<T>): Promise<T> => {
    const lease = await ctx.locks.acquire(sessionLockName(s), AbortSignal.timeout(120_000));
    try {
      await settleSealed(bucket, s, ctx.locks);
      return await fn(lease.signal);
    } finally {
      await lease.release();
    }
  };
  /** One op as a repack job, awaited; `onFinished` runs once the job is over (also after a 503 for a wait that ran out). */
  const edit = async (s: string, backend: string, op: Record<string, unknown>, onFinished?: () => Promise<void>, extra: { create?: false } = {}) => {
    const out = await enqueue(ctx.client, 'repack-session', { backend, session: s, ops: [op], ...extra } as never, {
      waitSeconds: WRITE_WAIT_SECONDS, log: ctx.log, ready: ctx.redisReady, ...(onFinished ? { onFinished } : {}),
    })
      .catch((err: unknown) => {
        // The job's failure by its contract code, in the session service's words.
        // A job told not to create the session is NotFound only when the session is gone.
        if (err instanceof HttpError && err.error in STATUS) throw sessionAnswer({ code: err.error as ErrorCode, message: err.message, ...(extra.create === false ? { op: 'session' } : {}) }, 'PUT');
        throw err;
      });
    if (out.result === undefined) throw new HttpError(503, 'service_unavailable', `Transient: repack job ${out.id} did not finish within ${WRITE_WAIT_SECONDS} s; it may still apply`);
    return out.result as { missing: string[] };
  };

  return async (server: FastifyInstance): Promise<void> => {
    server.removeAllContentTypeParsers();
    server.addContentTypeParser('application/json', { parseAs: 'string', bodyLimit: 1 << 20 }, (_req, body, done) => {
      try {
        done(null, JSON.parse(body as string));
      } catch (err) {
        done(new HttpError(400, 'invalid_request', `InvalidInput: body is not JSON: ${(err as Error).message}`), undefined);
      }
    });
    server.addContentTypeParser('*', (_req, payload, done) => { done(null, payload); });

    server.get('/', async (req) => {
      const bucket = ctx.bucket(queryParam(req.query, 'backend'));
      const sessions: Array<{ sessionPath: string; size: number; modified: string }> = [];
      for await (const o of bucket.list('sessions/')) {
        const m = /^sessions\/([^/]+)\/session\.tar\.gz$/.exec(o.key);
        if (m) sessions.push({ sessionPath: m[1]!, size: o.size, modified: o.modified.toISOString() });
      }
      return { count: sessions.length, sessions };
    });

    server.head('/:session', async (req, reply) => {
      const s = session(req.params);
      const info = await statSession(ctx.bucket(queryParam(req.query, 'backend')), s);
      setHeaders(reply, { size: info.size, etag: info.sha256 ?? info.etag, contentType: CONTENT_TYPE, modified: info.modified }, undefined);
      return reply.send();
    });

    server.get('/:session', async (req) => {
      const s = session(req.params);
      const l = await listSession(ctx.bucket(queryParam(req.query, 'backend')), s);
      return { sessionPath: s, size: l.size, sha256: l.sha256, modified: l.modified, entries: l.entries.length };
    });

    server.delete('/:session', async (req) => {
      const s = session(req.params);
      const bucket = ctx.bucket(queryParam(req.query, 'backend'));
      await locked(s, bucket, async () => {
        await statSession(bucket, s);
        await bucket.delete(sessionKey(s));
      });
      return { success: true, sessionPath: s };
    });

    server.post('/bulk-delete', async (req) => {
      const body = z.strictObject({ sessionPaths: z.array(z.string()).min(1).max(BULK_MAX) }).safeParse(req.body);
      if (!body.success) throw new HttpError(400, 'invalid_request', `InvalidInput: body must be { sessionPaths: [...] } with 1 to ${BULK_MAX} session paths`);
      // All checked before any is deleted.
      for (const s of body.data.sessionPaths) session({ session: s });
      const bucket = ctx.bucket(queryParam(req.query, 'backend'));
      const deleted: string[] = [];
      const notFound: string[] = [];
      for (const s of new Set(body.data.sessionPaths)) {
        await locked(s, bucket, async () => {
          const there = await bucket.stat(sessionKey(s)).then(() => true, (err: unknown) => {
            if (err instanceof StorageError && err.code === ErrorCode.NotFound) return false;
            throw err;
          });
          if (there) await bucket.delete(sessionKey(s));
          (there ? deleted : notFound).push(s);
        });
      }
      return { success: true, count: deleted.length, deleted, notFound };
    });

    server.post('/:session/upload', async (req) => {
      const s = session(req.params);
      const bucket = ctx.bucket(queryParam(req.query, 'backend'));
      const declared = declaredLength(req.headers, 'invalid_request');
      // Stored here, with the received digest, before the answer: no fsync of the staged copy needed.
      const staged = await receiveToStaging(bodyOf(req), ctx.staging, { limit: ctx.maxUploadBytes, declared, codes: SESSION_CODES, durable: false });
      try {
        // Refused whole before it can replace a good session: read by the same rules as a repack.
        await readArchive(createReadStream(staged.abs), async (e) => { for await (const _ of e.data) { /* drain */ } }).catch((err: unknown) => {
          throw new HttpError(400, 'invalid_archive', `InvalidInput: the upload is not a readable session tar.gz: ${(err as Error).message}`);
        });
        const info = await locked(s, bucket, (signal) => bucket.put(sessionKey(s), { path: staged.abs }, { sha256: staged.sha256, contentType: CONTENT_TYPE, signal }));
        return { success: true, sessionPath: s, size: info.size, sha256: info.sha256 };
      } finally {
        await staged.remove();
      }
    });

    server.get('/:session/download', async (req, reply) => {
      const s = session(req.params);
      const bucket = ctx.bucket(queryParam(req.query, 'backend'));
      const got = await bucket.get(sessionKey(s)).catch((err: unknown) => {
        if (err instanceof StorageError && err.code === ErrorCode.NotFound) throw missingSession(s);
        throw err;
      });
      setHeaders(reply, { size: got.info.size, etag: got.info.sha256 ?? got.info.etag, contentType: CONTENT_TYPE, modified: got.info.modified }, undefined);
      void reply.header('content-disposition', `attachment; filename="session.tar.gz"`);
      return sendVerified(reply, got.stream, false);
    });

    server.get('/:session/files', async (req) => {
      const s = session(req.params);
      const l = await listSession(ctx.bucket(queryParam(req.query, 'backend')), s, { digests: true });
      const files = l.entries.filter((e) => e.type === 'file').map((e) => ({ path: e.path, size: e.size, sha256: e.sha256, mode: e.mode, mtime: e.mtime }));
      return { sessionPath: s, count: files.length, files };
    });

    const readFile = (head: boolean) => async (req: FastifyRequest, reply: FastifyReply) => {
      const s = session(req.params);
      const path = filePath(req.params);
      const file = await openSessionFile(ctx.bucket(queryParam(req.query, 'backend')), s, path);
      let handedOver = false;
      try {
        if (notModified(req, file.sha256)) return await reply.code(304).header('etag', `"${file.sha256}"`).send();
        const range = parseRange(req.headers.range, file.size);
        setHeaders(reply, { size: file.size, etag: file.sha256, contentType: contentTypeOf(path) }, range);
        if (head || file.size === 0) return await reply.send(head ? undefined : '');
        // The whole archive was verified before the spool was written: a range of it is good bytes too.
        const stream = createReadStream(file.spool, range ? { start: range.start, end: range.end } : {});
        stream.once('close', () => { void file.close(); });
        handedOver = true;
        return await reply.send(stream);
      } finally {
        if (!handedOver) await file.close();
      }
    };
    server.head('/:session/files/*', readFile(true));
    server.get('/:session/files/*', readFile(false));

    server.put('/:session/files/*', async (req) => {
      const s = session(req.params);
      const path = filePath(req.params);
      const ifSha256 = ifMatch(req);
      const backend = queryParam(req.query, 'backend') ?? 'default';
      ctx.bucket(backend);
      const declared = declaredLength(req.headers, 'invalid_request');
      // Durable: a repack op carries no digest of its source, and the job outlives a crash of this server.
      const staged = await receiveToStaging(bodyOf(req), ctx.staging, { limit: ctx.maxUploadBytes, declared, codes: SESSION_CODES });
      // The staged file goes once the job is over, not when this answer does: a repack still
      // running past the wait reads it later.
      await edit(s, backend, { op: 'put', path, source: { path: staged.rel }, ...(ifSha256 ? { ifSha256 } : {}) }, staged.remove);
      return { success: true, sessionPath: s, filePath: path, size: staged.size, sha256: staged.sha256 };
    });

    server.delete('/:session/files/*', async (req) => {
      const s = session(req.params);
      const path = filePath(req.params);
      const ifSha256 = ifMatch(req);
      const backend = queryParam(req.query, 'backend') ?? 'default';
      // A delete must not create the session a repack would otherwise start.
      await statSession(ctx.bucket(backend), s);
      // `create: false`: a whole-session delete landing between that check and the job (under the
      // session's lock) makes the job NotFound instead of recreating an empty session.
      const result = await edit(s, backend, { op: 'delete', path, ...(ifSha256 ? { ifSha256 } : {}) }, undefined, { create: false });
      if (result.missing.includes(path)) throw new HttpError(404, 'file_not_found', `NotFound: no file ${JSON.stringify(path)} in session ${JSON.stringify(s)}`);
      return { success: true, sessionPath: s, filePath: path };
    });
  };
}

const TYPES: Record<string, string> = {
  txt: 'text/plain; charset=utf-8', md: 'text/markdown; charset=utf-8', json: 'application/json', html: 'text/html; charset=utf-8',
  css: 'text/css', js: 'text/javascript', ts: 'text/plain; charset=utf-8', png: 'image/png', jpg: 'image/jpeg', svg: 'image/svg+xml',
  yaml: 'text/yaml', yml: 'text/yaml', gz: 'application/gzip', pdf: 'application/pdf',
};

/** The archive keeps no content types: a file's is guessed from its extension, else octet-stream. */
function contentTypeOf(path: string): string {
  const ext = /\.([A-Za-z0-9]+)$/.exec(path)?.[1]?.toLowerCase();
  return (ext && TYPES[ext]) ?? 'application/octet-stream';
}
