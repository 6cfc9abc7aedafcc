import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Readable } from 'node:stream';
import { ErrorCode, StorageError } from '../../errors.js';
import { SiteId } from '../../payload.js';
import type { ObjectInfo } from '../../storage/driver.js';
import { validateSha256 } from '../../storage/keys.js';
import { queryParam, type RouteContext } from '../context.js';
import { enqueue, parseWait } from '../enqueue.js';
import { HttpError } from '../errors.js';
import { notModified, parseRange, sendVerified, setHeaders } from '../serve.js';
import { declaredLength, receiveToStaging } from '../upload.js';

/** The contract's artifact key for a build. */
export const artifactKey = (site: string, build: string): string => `sites/${site}/artifacts/${build}.tar.gz`;

/** Checks `site` and `build` as the contract defines them; 400 naming the field. */
export function siteAndBuild(params: unknown): { site: string; build?: string } {
  const p = params as { site?: string; build?: string };
  for (const field of ['site', 'build'] as const) {
    if (p[field] === undefined) continue;
    const r = SiteId.safeParse(p[field]);
    if (!r.success) throw new StorageError(ErrorCode.InvalidInput, `${field}: ${r.error.issues[0]?.message ?? 'invalid'}`);
  }
  return { site: p.site!, ...(p.build !== undefined ? { build: p.build } : {}) };
}

/** The build service's artifact routes: PUT streams into staging and enqueues `store`; GET and HEAD read the object. */
export function artifactRoutes(ctx: RouteContext) {
  return async (server: FastifyInstance): Promise<void> => {
    // The body is handed over as the raw stream, whatever its type: bytes are counted and staged here.
    server.removeAllContentTypeParsers();
    server.addContentTypeParser('*', (_req, payload, done) => { done(null, payload); });

    server.put('/sites/:site/artifacts/:build', async (req, reply) => {
      const { site, build } = siteAndBuild(req.params);
      const backend = queryParam(req.query, 'backend') ?? 'default';
      ctx.bucket(backend);
      const waitSeconds = parseWait(req.query);
      const header = req.headers['x-content-sha256'];
      const sha256 = typeof header === 'string' ? checkSha(header) : undefined;
      const declared = declaredLength(req.headers);
      // Before the body is read: an upload that cannot be enqueued is refused at once.
      await ctx.redisReady();
      // Without a digest to check, the server does not hash the body: the store job hashes the
      // staged file as it stores it (it reads it through once in any case). The file is then
      // fsynced here, also for ?wait, since no received digest could tell a file torn by a crash.
      const staged = await receiveToStaging(bodyOf(req), ctx.staging, sha256 === undefined
        ? { limit: ctx.maxUploadBytes, declared, digest: false }
        : { limit: ctx.maxUploadBytes, declared, sha256, durable: waitSeconds === undefined });
      const contentType = req.headers['content-type'];
      const out = await enqueue(ctx.client, 'store', {
        backend, key: artifactKey(site, build!), source: { path: staged.rel, consume: true }, ...(staged.sha256 ? { sha256: staged.sha256 } : {}),
        ...(contentType && contentType !== 'application/octet-stream' ? { contentType } : { contentType: 'application/gzip' }),
      }, { waitSeconds, onFinished: staged.remove, log: ctx.log, ready: ctx.redisReady });
      return out.result === undefined ? reply.code(202).send({ id: out.id }) : reply.code(200).send(out.result);
    });

    const read = (head: boolean) => async (req: FastifyRequest, reply: FastifyReply) => {
      const { site, build } = siteAndBuild(req.params);
      const bucket = ctx.bucket(queryParam(req.query, 'backend'));
      const key = artifactKey(site, build!);
      const describe = (info: ObjectInfo) => ({ size: info.size, etag: info.sha256 ?? info.etag, contentType: info.contentType ?? 'application/octet-stream', modified: info.modified });
      // A range needs the size first; a whole read learns everything from the open itself.
      const wanted = req.headers.range;
      const known = head || wanted !== undefined ? await bucket.stat(key) : undefined;
      const range = known ? parseRange(wanted, known.size) : undefined;
      if (known && notModified(req, describe(known).etag)) return reply.code(304).header('etag', `"${describe(known).etag}"`).send();
      if (head) {
        setHeaders(reply, describe(known!), range);
        return reply.send();
      }
      const got = await bucket.get(key, range ? { range } : {});
      const rep = describe(got.info);
      if (!known && notModified(req, rep.etag)) {
        got.stream.destroy();
        return reply.code(304).header('etag', `"${rep.etag}"`).send();
      }
      // The object may have been replaced since the stat: the range is checked against what is read.
      const ranged = range ? parseRange(wanted, got.info.size) : undefined;
      setHeaders(reply, rep, ranged);
      if (got.info.size === 0) {
        // Nothing to hold back: an empty object is checked before its headers go out.
        for await (const _ of got.stream) { /* drain */ }
        return reply.send('');
      }
      return sendVerified(reply, got.stream, ranged !== undefined);
    };
    server.head('/sites/:site/artifacts/:build', read(true));
    server.get('/sites/:site/artifacts/:build', read(false));
  };
}

export function checkSha(header: string): string {
  try {
    return validateSha256(header.trim())!.toLowerCase();
  } catch {
    throw new HttpError(400, 'InvalidInput', 'InvalidInput: X-Content-SHA256: must be 64 hex digits');
  }
}

/** The raw body the catch-all parser handed over (the request itself when there was none). */
export function bodyOf(req: FastifyRequest): Readable {
  return (req.body as Readable | undefined) ?? req.raw;
}
