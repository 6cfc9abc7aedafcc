import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { createReadStream, createWriteStream } from 'node:fs';
import { copyFile, mkdtemp, rm, stat } from 'node:fs/promises';
import { pipeline } from 'node:stream/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { AddressInfo } from 'node:net';
import {
  badRequest, FakeGcsStore, GcsHttpError, preconditionsFrom, RunningHash, writableMeta,
  type StoredObject,
} from './gcs-store.js';
import { mediaUpload, multipartUpload, readJson, ResumableUploads, type InsertTarget } from './gcs-upload.js';

export { crc32c, crc32cBase64 } from './gcs-store.js';

/**
 * A small, strict GCS JSON API server (storage/v1, upload/storage/v1, download/storage/v1) for
 * tests: no GCS emulator can be installed here, and the official client must meet real protocol
 * behaviour (resumable sessions, preconditions, hash headers), not a mock of its own calls.
 */

export interface FakeGcsOptions {
  /** @defaultValue 0 (a free port) */
  port?: number;
  /** Buckets that exist from the start. @defaultValue [] */
  buckets?: string[];
  /** Where object bytes live. @defaultValue a fresh temp dir, removed on close */
  dir?: string;
}

export interface RequestRecord {
  method: string;
  /** Path with segments decoded, e.g. `/upload/storage/v1/b/bkt/o`. */
  path: string;
  query: Record<string, string>;
  contentRange: string | undefined;
  status: number;
}

export interface FaultSpec {
  method?: string;
  uploadType?: 'media' | 'multipart' | 'resumable';
  /** Only resumable PUTs that carry bytes (not status queries). */
  chunk?: boolean;
  /** Answer with this status (after draining the body) instead of serving the request. */
  status?: number;
  /** Serve the request but drop the connection after this many body bytes. */
  resetAfterBytes?: number;
  /** @defaultValue 1 */
  times?: number;
}

export interface FakeGcs {
  endpoint: string;
  port: number;
  /** Every request served, in order. */
  requests: RequestRecord[];
  createBucket(name: string): void;
  /** Replaces an object's stored bytes but keeps its md5/crc32c/size: bit rot. */
  corrupt(bucket: string, name: string, bytes: Uint8Array): Promise<void>;
  /** Makes the next matching request(s) fail. */
  injectFault(fault: FaultSpec): void;
  /** Resumable sessions not yet completed. */
  openSessions(): number;
  close(): Promise<void>;
}

export async function startFakeGcs(opts: FakeGcsOptions = {}): Promise<FakeGcs> {
  const root = opts.dir ?? (await mkdtemp(join(tmpdir(), 'fake-gcs-')));
  const store = new FakeGcsStore(root);
  await store.init();
  for (const b of opts.buckets ?? []) store.createBucket(b);
  const uploads = new ResumableUploads(store);
  const requests: RequestRecord[] = [];
  const faults: Array<FaultSpec & { left: number }> = [];
  let endpoint = '';

  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x');
    const record: RequestRecord = {
      method: req.method ?? 'GET', path: url.pathname, query: Object.fromEntries(url.searchParams),
      contentRange: req.headers['content-range'], status: 0,
    };
    requests.push(record);
    res.on('finish', () => { record.status = res.statusCode; });
    handle(req, res, url, record).catch((err: unknown) => {
      const e = err instanceof GcsHttpError ? err
        : new GcsHttpError(503, 'backendError', err instanceof Error ? err.message : String(err));
      if (res.headersSent || res.destroyed || !req.socket || req.socket.destroyed) { res.destroy(); req.socket?.destroy(); return; }
      // Unread body bytes would otherwise break the connection under the error response.
      req.resume();
      sendJson(res, e.status, { error: { code: e.status, message: e.message, errors: [{ domain: 'global', reason: e.reason, message: e.message }] } });
    });
  });
  // Big uploads in one request must not hit Node's default 5-minute request timeout.
  server.requestTimeout = 0;

  function takeFault(req: IncomingMessage, q: URLSearchParams): FaultSpec | undefined {
    const i = faults.findIndex((f) => (!f.method || f.method === req.method)
      && (!f.uploadType || f.uploadType === q.get('uploadType') || (f.uploadType === 'resumable' && q.has('upload_id')))
      && (!f.chunk || (q.has('upload_id') && req.method === 'PUT' && !/^bytes \*\//.test(req.headers['content-range'] ?? ''))));
    if (i < 0) return undefined;
    const f = faults[i]!;
    if (--f.left <= 0) faults.splice(i, 1);
    return f;
  }

  async function handle(req: IncomingMessage, res: ServerResponse, url: URL, record: RequestRecord): Promise<void> {
    const q = url.searchParams;
    // Held here: Node detaches req.socket once the request stream is destroyed mid-body.
    const socket = req.socket;
    const seg = url.pathname.split('/').slice(1).map((s) => {
      try { return decodeURIComponent(s); } catch { throw badRequest(`Invalid path segment: ${s}`); }
    });
    record.path = '/' + seg.join('/');
    const method = req.method ?? 'GET';
    const fault = takeFault(req, q);
    if (fault?.status !== undefined) {
      for await (const _ of req) { /* drain */ }
      throw new GcsHttpError(fault.status, fault.status === 429 ? 'rateLimitExceeded' : 'backendError', 'Injected fault.');
    }
    const resumablePut = q.has('upload_id') && method !== 'DELETE';
    if (fault?.resetAfterBytes !== undefined && !resumablePut) {
      socket.destroy();
      return;
    }
    const [api, a1, a2, a3] = seg;
    // /upload/storage/v1/b/{bucket}/o
    if (api === 'upload' && a1 === 'storage' && a2 === 'v1' && a3 === 'b' && seg[5] === 'o' && seg.length === 6) {
      const bucket = seg[4]!;
      store.bucket(bucket);
      const t: InsertTarget = { store, bucket, query: q, pre: preconditionsFrom(q) };
      if (method === 'POST') {
        const type = q.get('uploadType');
        if (type === 'media') return sendObject(res, await mediaUpload(req, t));
        if (type === 'multipart') return sendObject(res, await multipartUpload(req, t));
        if (type === 'resumable') {
          const id = await uploads.create(req, t);
          const host = req.headers.host ?? new URL(endpoint).host;
          res.setHeader('Location', `http://${host}/upload/storage/v1/b/${encodeURIComponent(bucket)}/o?uploadType=resumable&upload_id=${id}`);
          res.setHeader('X-GUploader-UploadID', id);
          return sendJson(res, 200, {});
        }
        throw badRequest(`Invalid uploadType: ${type}`, 'invalidParameter');
      }
      if (method === 'PUT' || method === 'POST') {
        const out = await uploads.put(q.get('upload_id'), req, fault?.resetAfterBytes).catch((err: unknown) => {
          if (fault?.resetAfterBytes === undefined) throw err;
          socket.destroy();
          return undefined;
        });
        if (!out) return;
        if (out.status === 200) return sendObject(res, out.object);
        if (out.persisted > 0) res.setHeader('Range', `bytes=0-${out.persisted - 1}`);
        res.setHeader('Content-Length', '0');
        res.writeHead(308).end();
        return;
      }
      if (method === 'DELETE') {
        await uploads.cancel(q.get('upload_id'));
        res.writeHead(499, { 'Content-Length': '0' }).end();
        return;
      }
    }
    // /download/storage/v1/b/{bucket}/o/{object}: media only.
    if (api === 'download' && a1 === 'storage' && a2 === 'v1' && a3 === 'b' && seg[5] === 'o' && seg.length === 7 && method === 'GET') {
      return sendMedia(req, res, store.lookup(seg[4]!, seg[6]!, q.get('generation')), q);
    }
    if (api !== 'storage' || a1 !== 'v1' || a2 !== 'b') throw new GcsHttpError(404, 'notFound', `Not Found: ${url.pathname}`);
    const rest = seg.slice(3);
    if (rest.length === 0) {
      if (method !== 'POST') throw new GcsHttpError(405, 'methodNotAllowed', 'Method not allowed.');
      if (!q.get('project')) throw badRequest('Required parameter: project', 'required');
      const body = await readJson(req);
      if (typeof body.name !== 'string') throw badRequest('Required: bucket name', 'required');
      return sendJson(res, 200, bucketResource(store.createBucket(body.name)));
    }
    const bucket = rest[0]!;
    if (rest.length === 1) {
      if (method === 'GET') return sendJson(res, 200, bucketResource(store.bucket(bucket)));
      if (method === 'DELETE') { store.deleteBucket(bucket); res.writeHead(204).end(); return; }
    }
    if (rest[1] !== 'o') throw new GcsHttpError(404, 'notFound', `Not Found: ${url.pathname}`);
    if (rest.length === 2 && method === 'GET') {
      const page = store.list(bucket, q);
      const out: Record<string, unknown> = { kind: 'storage#objects' };
      if (page.items.length) out.items = page.items.map((o) => store.resource(o, endpoint));
      if (page.prefixes.length) out.prefixes = page.prefixes;
      if (page.nextPageToken) out.nextPageToken = page.nextPageToken;
      return sendJson(res, 200, out);
    }
    const name = rest[2];
    if (name === undefined) throw new GcsHttpError(404, 'notFound', `Not Found: ${url.pathname}`);
    if (rest.length === 3) {
      const generation = q.get('generation');
      const pre = preconditionsFrom(q);
      if (method === 'GET') {
        const obj = store.lookup(bucket, name, generation);
        store.check(obj, pre);
        if (q.get('alt') === 'media') return sendMedia(req, res, obj, q);
        return sendObject(res, obj);
      }
      if (method === 'PATCH' || method === 'PUT') {
        return sendObject(res, store.patch(bucket, name, generation, pre, await readJson(req), method === 'PUT'));
      }
      if (method === 'DELETE') { store.remove(bucket, name, generation, pre); res.writeHead(204).end(); return; }
    }
    // .../o/{src}/rewriteTo|copyTo/b/{dstBucket}/o/{dst}
    if (rest.length === 8 && method === 'POST' && (rest[3] === 'rewriteTo' || rest[3] === 'copyTo') && rest[4] === 'b' && rest[6] === 'o') {
      const obj = await copyObject(bucket, name, rest[5]!, rest[7]!, q, await readJson(req));
      if (rest[3] === 'copyTo') return sendObject(res, obj);
      const size = String(obj.size);
      return sendJson(res, 200, { kind: 'storage#rewriteResponse', totalBytesRewritten: size, objectSize: size, done: true, resource: store.resource(obj, endpoint) });
    }
    if (rest.length === 4 && rest[3] === 'compose' && method === 'POST') {
      return sendObject(res, await compose(bucket, name, q, await readJson(req)));
    }
    throw new GcsHttpError(404, 'notFound', `Not Found: ${method} ${url.pathname}`);
  }

  async function copyObject(sb: string, sn: string, db: string, dn: string, q: URLSearchParams, body: Record<string, unknown>): Promise<StoredObject> {
    const src = store.lookup(sb, sn, q.get('sourceGeneration'));
    store.check(src, preconditionsFrom(q, true));
    store.bucket(db);
    const pre = preconditionsFrom(q);
    // Fail before copying bytes; commit checks again atomically.
    store.check(store.peek(db, dn), pre);
    // A non-empty body is the destination's metadata; an empty one copies the source's.
    const meta = Object.keys(body).some((k) => ['contentType', 'metadata', 'cacheControl', 'contentDisposition', 'contentEncoding', 'contentLanguage'].includes(k))
      ? writableMeta(body) : src;
    const tmp = store.tempPath('uploads');
    const release = store.pin(src);
    try {
      await copyFile(src.path, tmp);
    } finally {
      release();
    }
    const hashes = { size: src.size, md5Hash: src.md5Hash, crc32c: src.crc32c };
    return store.commit(db, dn, tmp, hashes, meta, pre, src.componentCount);
  }

  async function compose(bucket: string, name: string, q: URLSearchParams, body: Record<string, unknown>): Promise<StoredObject> {
    const sources = body.sourceObjects;
    if (!Array.isArray(sources) || sources.length === 0 || sources.length > 32) throw badRequest('Between 1 and 32 sourceObjects are required.', 'required');
    const objs = sources.map((s: { name?: unknown; generation?: unknown; objectPreconditions?: { ifGenerationMatch?: unknown } }) => {
      if (typeof s?.name !== 'string') throw badRequest('sourceObjects[].name is required.', 'required');
      const obj = store.lookup(bucket, s.name, s.generation == null ? null : String(s.generation));
      const want = s.objectPreconditions?.ifGenerationMatch;
      if (want != null) store.check(obj, { ifGenerationMatch: Number(want) });
      return obj;
    });
    const pre = preconditionsFrom(q);
    store.check(store.peek(bucket, name), pre);
    const tmp = store.tempPath('uploads');
    const hash = new RunningHash();
    const out = createWriteStream(tmp);
    try {
      for (const obj of objs) {
        const release = store.pin(obj);
        try {
          await pipeline(createReadStream(obj.path), async function* (src: AsyncIterable<Buffer>) {
            for await (const chunk of src) { hash.update(chunk); yield chunk; }
          }, out, { end: false });
        } finally {
          release();
        }
      }
      out.end();
      await new Promise<void>((r) => out.once('close', () => r()));
      const dest = (body.destination ?? {}) as Record<string, unknown>;
      const count = objs.reduce((n, o) => n + (o.componentCount ?? 1), 0);
      return await store.commit(bucket, name, tmp, hash.result(), writableMeta(dest), pre, count);
    } finally {
      out.destroy();
      await rm(tmp, { force: true });
    }
  }

  function sendObject(res: ServerResponse, obj: StoredObject): void {
    sendJson(res, 200, store.resource(obj, endpoint));
  }

  function sendMedia(req: IncomingMessage, res: ServerResponse, obj: StoredObject, q: URLSearchParams): void {
    store.check(obj, preconditionsFrom(q));
    const hashes = [`crc32c=${obj.crc32c}`];
    if (obj.md5Hash) hashes.push(`md5=${obj.md5Hash}`);
    const headers: Record<string, string> = {
      'Content-Type': obj.contentType ?? 'application/octet-stream',
      'ETag': `"${Buffer.from(`${obj.generation}/${obj.metageneration}`).toString('base64')}"`,
      'Last-Modified': obj.updated.toUTCString(),
      'Accept-Ranges': 'bytes',
      'x-goog-generation': String(obj.generation),
      'x-goog-metageneration': String(obj.metageneration),
      'x-goog-stored-content-encoding': obj.extra.contentEncoding ?? 'identity',
      'x-goog-stored-content-length': String(obj.size),
      'x-goog-storage-class': 'STANDARD',
      'x-goog-hash': hashes.join(','),
    };
    const range = parseRange(req.headers.range, obj.size);
    if (range === 'unsatisfiable') {
      throw new GcsHttpError(416, 'requestedRangeNotSatisfiable', 'The requested range cannot be satisfied.');
    }
    let status = 200;
    if (range) {
      status = 206;
      headers['Content-Range'] = `bytes ${range.start}-${range.end}/${obj.size}`;
    }
    const release = store.pin(obj);
    const path = obj.path;
    res.once('close', release);
    // The length on disk, so a corrupted file of another length still makes a valid response.
    void stat(path).then(async (st) => {
      headers['Content-Length'] = String(range ? Math.min(range.end, st.size - 1) - range.start + 1 : st.size);
      res.writeHead(status, headers);
      await pipeline(createReadStream(path, range ? { start: range.start, end: range.end } : {}), res);
    }).catch(() => res.destroy());
  }

  function bucketResource(b: { name: string; created: Date }): Record<string, unknown> {
    return {
      kind: 'storage#bucket', id: b.name, name: b.name, selfLink: `${endpoint}/storage/v1/b/${b.name}`,
      projectNumber: '0', metageneration: '1', location: 'US', storageClass: 'STANDARD', etag: 'CAE=',
      timeCreated: b.created.toISOString(), updated: b.created.toISOString(),
    };
  }

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port ?? 0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as AddressInfo).port;
  endpoint = `http://127.0.0.1:${port}`;
  return {
    endpoint,
    port,
    requests,
    createBucket: (name) => { store.createBucket(name); },
    corrupt: (bucket, name, bytes) => store.corrupt(bucket, name, bytes),
    injectFault: (f) => { faults.push({ ...f, left: f.times ?? 1 }); },
    openSessions: () => uploads.open,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      if (!opts.dir) await rm(root, { recursive: true, force: true });
    },
  };
}

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json; charset=UTF-8', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

/** A single `bytes=a-b`, `bytes=a-` or `bytes=-n`; anything else is ignored (whole object), as HTTP allows. */
function parseRange(header: string | undefined, size: number): { start: number; end: number } | 'unsatisfiable' | undefined {
  const m = header ? /^bytes=(\d*)-(\d*)$/.exec(header.trim()) : null;
  if (!m || (m[1] === '' && m[2] === '')) return undefined;
  if (m[1] === '') {
    const n = Number(m[2]);
    if (n === 0 || size === 0) return 'unsatisfiable';
    return { start: Math.max(0, size - n), end: size - 1 };
  }
  const start = Number(m[1]);
  const end = m[2] === '' ? size - 1 : Math.min(Number(m[2]), size - 1);
  if (start >= size || end < start) return 'unsatisfiable';
  return { start, end };
}
