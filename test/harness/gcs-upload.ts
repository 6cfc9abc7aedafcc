import { createWriteStream, type WriteStream } from 'node:fs';
import { rm, truncate } from 'node:fs/promises';
import type { IncomingMessage } from 'node:http';
import { once } from 'node:events';
import { randomUUID } from 'node:crypto';
import {
  badRequest, GcsHttpError, RunningHash, writableMeta, validateObjectName,
  type FakeGcsStore, type Hashes, type Preconditions, type StoredObject, type WritableMeta,
} from './gcs-store.js';

/**
 * The three ways objects.insert receives bytes (uploadType media, multipart, resumable), each
 * streaming to a file as the bytes arrive. An object becomes visible only when its upload
 * completed in full; anything short of that (a dropped connection, a missing closing boundary, a
 * final size that does not add up) leaves no trace but a resumable session's persisted bytes.
 */

/** Non-final resumable chunks are persisted in multiples of this, as real GCS does. */
export const UPLOAD_QUANTUM = 256 * 1024;

/** Appends to a file with back-pressure while hashing. */
class FileSink {
  private readonly ws: WriteStream;
  constructor(readonly path: string, readonly hash: RunningHash, append = false) {
    this.ws = createWriteStream(path, { flags: append ? 'a' : 'w' });
    this.ws.on('error', () => {});
  }
  async write(buf: Buffer): Promise<void> {
    if (buf.length === 0) return;
    this.hash.update(buf);
    if (!this.ws.write(buf)) await once(this.ws, 'drain');
  }
  async close(): Promise<void> {
    if (this.ws.closed) return;
    this.ws.end();
    await once(this.ws, 'close');
  }
}

/** Throws when the request body stops short (client aborted): Node reports it as an error. */
async function* body(req: IncomingMessage, limit?: number): AsyncGenerator<Buffer> {
  let seen = 0;
  // Not destroyed on an early exit, so the error response can still be sent (after draining).
  for await (const chunk of req.iterator({ destroyOnReturn: false }) as AsyncIterable<Buffer>) {
    if (limit !== undefined && seen + chunk.length > limit) {
      if (limit > seen) yield chunk.subarray(0, limit - seen);
      throw Object.assign(new Error('injected connection reset'), { code: 'ECONNRESET' });
    }
    seen += chunk.length;
    yield chunk;
  }
}

export async function readJson(req: IncomingMessage, max = 1 << 20): Promise<Record<string, unknown>> {
  const parts: Buffer[] = [];
  let n = 0;
  for await (const chunk of body(req)) {
    n += chunk.length;
    if (n > max) throw badRequest('Request body too large.');
    parts.push(chunk);
  }
  return parseJson(Buffer.concat(parts).toString('utf8'));
}

function parseJson(text: string): Record<string, unknown> {
  if (text.trim() === '') return {};
  try {
    const v = JSON.parse(text) as unknown;
    if (v && typeof v === 'object' && !Array.isArray(v)) return v as Record<string, unknown>;
  } catch { /* fall through */ }
  throw badRequest('Parse Error', 'parseError');
}

export interface InsertTarget {
  store: FakeGcsStore;
  bucket: string;
  query: URLSearchParams;
  pre: Preconditions;
}

/** uploadType=media: the body is the object, the name comes from the query. */
export async function mediaUpload(req: IncomingMessage, t: InsertTarget): Promise<StoredObject> {
  const name = t.query.get('name');
  if (!name) throw badRequest('Required parameter: name', 'required');
  validateObjectName(name);
  const sink = new FileSink(t.store.tempPath('uploads'), new RunningHash());
  try {
    for await (const chunk of body(req)) await sink.write(chunk);
    await sink.close();
    checkClientHashes(req, sink.hash.result());
    const meta: WritableMeta = { contentType: req.headers['content-type'], metadata: {}, extra: {} };
    return await t.store.commit(t.bucket, name, sink.path, sink.hash.result(), meta, t.pre);
  } finally {
    await sink.close();
    await rm(sink.path, { force: true });
  }
}

/**
 * uploadType=multipart: multipart/related with a JSON metadata part then the media part. The media
 * part is streamed: only the last (delimiter length - 1) bytes are held back while looking for the
 * boundary. Without the closing boundary nothing is committed.
 */
export async function multipartUpload(req: IncomingMessage, t: InsertTarget): Promise<StoredObject> {
  const ct = req.headers['content-type'] ?? '';
  const m = /^multipart\/related;.*\bboundary=(?:"([^"]+)"|([^;\s]+))/i.exec(ct);
  if (!m) throw badRequest(`Invalid multipart request: content type ${JSON.stringify(ct)}`);
  const delim = Buffer.from(`\r\n--${m[1] ?? m[2]}`);
  const sink = new FileSink(t.store.tempPath('uploads'), new RunningHash());
  // A leading CRLF lets the first boundary match the same delimiter as the others.
  let pending: Buffer = Buffer.from('\r\n');
  let state = 'preamble' as 'preamble' | 'headers' | 'json' | 'media' | 'closed';
  let part = 0;
  let json = '';
  let mediaType: string | undefined;
  let partType: string | undefined;
  try {
    const step = async (final: boolean): Promise<boolean> => {
      if (state === 'headers') {
        const end = pending.indexOf('\r\n\r\n');
        if (end < 0) return false;
        const headers = pending.subarray(0, end).toString('latin1');
        partType = /^content-type:\s*(.+)$/im.exec(headers)?.[1]?.trim();
        pending = pending.subarray(end + 4);
        state = part === 0 ? 'json' : 'media';
        return true;
      }
      const at = pending.indexOf(delim);
      if (at < 0) {
        // Keep what could be the start of a delimiter split across chunks.
        const keep = final ? pending.length : Math.min(pending.length, delim.length - 1);
        const out = pending.subarray(0, pending.length - keep);
        pending = pending.subarray(pending.length - keep);
        if (state === 'json') json += out.toString('utf8');
        if (state === 'media') await sink.write(out);
        if (json.length > 1 << 20) throw badRequest('Metadata part too large.');
        return false;
      }
      if (pending.length < at + delim.length + 2) return false;
      const before = pending.subarray(0, at);
      if (state === 'json') json += before.toString('utf8');
      if (state === 'media') { await sink.write(before); mediaType = partType; }
      const tail = pending.subarray(at + delim.length, at + delim.length + 2).toString('latin1');
      pending = pending.subarray(at + delim.length + 2);
      if (state !== 'preamble') part++;
      if (tail === '--') { state = 'closed'; return false; }
      if (tail !== '\r\n') throw badRequest('Malformed multipart body.');
      if (part >= 2) throw badRequest('A multipart upload has exactly two parts.');
      state = 'headers';
      return true;
    };
    for await (const chunk of body(req)) {
      if (state === 'closed') continue;
      pending = pending.length ? Buffer.concat([pending, chunk]) : chunk;
      while (await step(false));
    }
    if (state !== 'closed' || part !== 2) throw badRequest('Multipart body ended before its closing boundary.');
    await sink.close();
    const resource = parseJson(json);
    const name = t.query.get('name') ?? (typeof resource.name === 'string' ? resource.name : null);
    if (!name) throw badRequest('Required parameter: name', 'required');
    const meta = writableMeta(resource);
    meta.contentType ??= mediaType;
    checkResourceHashes(resource, sink.hash.result());
    checkClientHashes(req, sink.hash.result());
    return await t.store.commit(t.bucket, name, sink.path, sink.hash.result(), meta, t.pre);
  } finally {
    await sink.close();
    await rm(sink.path, { force: true });
  }
}

/** Like real GCS: hashes the client states up front must match the bytes, or nothing is stored. */
function checkResourceHashes(resource: Record<string, unknown>, got: Hashes): void {
  if (typeof resource.crc32c === 'string' && resource.crc32c !== got.crc32c) {
    throw badRequest(`Provided CRC32C "${resource.crc32c}" doesn't match calculated CRC32C "${got.crc32c}".`);
  }
  if (typeof resource.md5Hash === 'string' && resource.md5Hash !== got.md5Hash) {
    throw badRequest(`Provided MD5 hash "${resource.md5Hash}" doesn't match calculated MD5 hash "${got.md5Hash}".`);
  }
}

function checkClientHashes(req: IncomingMessage, got: Hashes): void {
  const header = req.headers['x-goog-hash'];
  if (typeof header !== 'string') return;
  const stated: Record<string, unknown> = {};
  for (const pair of header.split(',')) {
    const i = pair.indexOf('=');
    const k = pair.slice(0, i).trim();
    stated[k === 'md5' ? 'md5Hash' : k] = pair.slice(i + 1).trim();
  }
  checkResourceHashes(stated, got);
}

interface Session {
  id: string;
  bucket: string;
  name: string;
  meta: WritableMeta;
  pre: Preconditions;
  declared: number | undefined;
  path: string;
  /** Hash over the persisted bytes (always the whole file). */
  hash: RunningHash;
  done: StoredObject | undefined;
  /** Serialises requests on one session (a status query must see an aborted chunk settled). */
  queue: Promise<unknown>;
}

export type ChunkOutcome = { status: 200; object: StoredObject } | { status: 308; persisted: number };

/** Resumable upload sessions: creation, chunks, status queries, cancellation. */
export class ResumableUploads {
  private readonly sessions = new Map<string, Session>();

  constructor(private readonly store: FakeGcsStore) {}

  get open(): number {
    return [...this.sessions.values()].filter((s) => !s.done).length;
  }

  /** POST ...?uploadType=resumable: checks preconditions now (and again at commit). */
  async create(req: IncomingMessage, t: InsertTarget): Promise<string> {
    const resource = await readJson(req);
    const name = t.query.get('name') ?? (typeof resource.name === 'string' ? resource.name : null);
    if (!name) throw badRequest('Required parameter: name', 'required');
    validateObjectName(name);
    t.store.check(t.store.peek(t.bucket, name), t.pre);
    const meta = writableMeta(resource);
    const xType = req.headers['x-upload-content-type'];
    if (meta.contentType === undefined && typeof xType === 'string') meta.contentType = xType;
    const xLen = req.headers['x-upload-content-length'];
    if (xLen !== undefined && !/^\d+$/.test(String(xLen))) throw badRequest('Invalid X-Upload-Content-Length.');
    const id = randomUUID().replace(/-/g, '');
    const path = this.store.tempPath('uploads');
    await new FileSink(path, new RunningHash()).close();
    this.sessions.set(id, {
      id, bucket: t.bucket, name, meta, pre: t.pre, path, hash: new RunningHash(), done: undefined,
      declared: xLen === undefined ? undefined : Number(xLen), queue: Promise.resolve(),
    });
    return id;
  }

  session(id: string | null): Session {
    const s = id ? this.sessions.get(id) : undefined;
    if (!s) throw new GcsHttpError(404, 'notFound', 'No such upload session.');
    return s;
  }

  async cancel(id: string | null): Promise<void> {
    const s = this.session(id);
    this.sessions.delete(s.id);
    await rm(s.path, { force: true });
  }

  /** PUT on the session URI; `resetAfter` (test hook) drops the connection after that many bytes. */
  put(id: string | null, req: IncomingMessage, resetAfter?: number): Promise<ChunkOutcome> {
    const s = this.session(id);
    const run = s.queue.then(() => this.chunk(s, req, resetAfter));
    s.queue = run.catch(() => {});
    return run;
  }

  private async chunk(s: Session, req: IncomingMessage, resetAfter?: number): Promise<ChunkOutcome> {
    const range = parseContentRange(req.headers['content-range']);
    const persisted = s.hash.size;
    if (s.done) {
      for await (const _ of body(req)) { /* drain */ }
      return { status: 200, object: s.done };
    }
    if (range.kind === 'query') {
      for await (const _ of body(req)) { /* a status query carries no bytes */ }
      if (range.total !== undefined && range.total === persisted) return this.finish(s, req);
      if (range.total !== undefined && range.total < persisted) throw badRequest('Final size is below the bytes already persisted.');
      return { status: 308, persisted };
    }
    if (range.start > persisted) {
      throw badRequest(`Invalid request: chunk starts at ${range.start}, but only ${persisted} bytes were persisted.`);
    }
    const length = req.headers['content-length'];
    if (range.end !== undefined && length !== undefined && Number(length) !== range.end - range.start + 1) {
      throw badRequest(`Content-Range ${req.headers['content-range']} does not match Content-Length ${length}.`);
    }
    if (range.total !== undefined && range.end !== undefined && range.end + 1 > range.total) {
      throw badRequest('Content-Range end is beyond the stated total size.');
    }
    // Bytes before `persisted` were already stored (a retried chunk overlaps): skip them.
    let skip = persisted - range.start;
    let received = range.start;
    const sink = new FileSink(s.path, s.hash, true);
    let checkpoint = { size: persisted, hash: s.hash.fork() };
    let error: unknown;
    try {
      for await (let chunk of body(req, resetAfter)) {
        received += chunk.length;
        if (skip > 0) {
          const n = Math.min(skip, chunk.length);
          skip -= n;
          chunk = chunk.subarray(n);
        }
        while (chunk.length > 0) {
          // Split at quantum boundaries so a checkpoint exists at every persistable size.
          const room = UPLOAD_QUANTUM - (sink.hash.size % UPLOAD_QUANTUM);
          const piece = chunk.subarray(0, room);
          chunk = chunk.subarray(piece.length);
          await sink.write(piece);
          if (sink.hash.size % UPLOAD_QUANTUM === 0) checkpoint = { size: sink.hash.size, hash: sink.hash.fork() };
        }
      }
    } catch (err) {
      error = err;
    }
    await sink.close();
    const streaming = range.end === undefined;
    const final = !error && range.total !== undefined && received === range.total;
    if (!error && range.end !== undefined && received !== range.end + 1) {
      error = badRequest(`Received ${received - range.start} bytes, Content-Range says ${range.end - range.start + 1}.`);
    }
    if (!error && range.total !== undefined && received > range.total) error = badRequest('More bytes than the stated total size.');
    if (!error && !final && !streaming && range.end! + 1 - range.start < UPLOAD_QUANTUM) {
      error = badRequest(`Invalid request. The number of bytes uploaded is required to be equal or greater than ${UPLOAD_QUANTUM}, except for the final request (it's recommended to be the exact multiple of ${UPLOAD_QUANTUM}). The received request contained ${received - range.start} bytes.`);
    }
    // `bytes a-*/*` says "the rest of the object is in this request": it completes on a clean end.
    if (final || (!error && streaming && range.total === undefined)) return this.finish(s, req);
    // Anything short of completion keeps only whole quanta, like GCS does.
    if (s.hash.size !== checkpoint.size) {
      await truncate(s.path, checkpoint.size);
      s.hash = checkpoint.hash;
    }
    if (error) throw error;
    return { status: 308, persisted: s.hash.size };
  }

  private async finish(s: Session, req: IncomingMessage): Promise<ChunkOutcome> {
    const got = s.hash.result();
    if (s.declared !== undefined && s.declared !== got.size) {
      await this.cancel(s.id);
      throw badRequest(`Upload size ${got.size} does not match X-Upload-Content-Length ${s.declared}.`);
    }
    try {
      checkClientHashes(req, got);
      // Commit moves the session file away; the session keeps answering with the object.
      s.done = await this.store.commit(s.bucket, s.name, s.path, got, s.meta, s.pre);
    } catch (err) {
      this.sessions.delete(s.id);
      await rm(s.path, { force: true });
      throw err;
    }
    return { status: 200, object: s.done };
  }
}

type ContentRange =
  | { kind: 'query'; total: number | undefined }
  | { kind: 'bytes'; start: number; end: number | undefined; total: number | undefined };

// Content-Range forms: `bytes */T` (status query, or an empty final request), `bytes a-b/T` (a
// chunk), `bytes a-*/T` (the rest of the object streams in this request); T is a size or `*`.
export function parseContentRange(header: string | undefined): ContentRange {
  const bad = () => badRequest(`Invalid Content-Range: ${JSON.stringify(header)}`);
  if (header === undefined) return { kind: 'bytes', start: 0, end: undefined, total: undefined };
  const m = /^bytes (?:\*|(\d+)-(\d+|\*|-1))\/(\d+|\*)$/.exec(header.trim());
  if (!m) throw bad();
  const total = m[3] === '*' ? undefined : Number(m[3]);
  if (m[1] === undefined) return { kind: 'query', total };
  const start = Number(m[1]);
  // The client writes `a-(a-1)/a` for an empty final chunk (e.g. `0--1/0` for an empty object).
  const end = m[2] === '*' ? undefined : m[2] === '-1' ? -1 : Number(m[2]);
  if (end !== undefined && end < start - 1) throw bad();
  if (end === start - 1 && total !== start) throw bad();
  return { kind: 'bytes', start, end, total };
}
