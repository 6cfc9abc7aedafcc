import { Transform, type Readable, type TransformCallback } from 'node:stream';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { ByteRange } from '../storage/driver.js';
import { HttpError } from './errors.js';

/**
 * Holds the latest chunk back until the next one arrives, and the last one until the source ended
 * cleanly. Placed after a verifying stream, whose digest check fails at its end: the client then
 * never receives the full Content-Length, so a bad object shows as a broken transfer, never as a
 * clean end on bad bytes (RELIABILITY #28).
 */
export class HoldLast extends Transform {
  private held: Buffer | undefined;

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    const out = this.held;
    this.held = chunk;
    cb(null, out);
  }

  override _flush(cb: TransformCallback): void {
    cb(null, this.held);
  }
}

/** `Range: bytes=a-b | a- | -n` of an object of `size` bytes; one range only (a multipart answer is not offered). */
export function parseRange(header: string | undefined, size: number): ByteRange | undefined {
  if (header === undefined) return undefined;
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  // Anything else (several ranges, other units) is served whole, as RFC 9110 lets a server do.
  if (!m || (m[1] === '' && m[2] === '')) return undefined;
  const unsatisfiable = () => new HttpError(416, 'InvalidInput', `InvalidInput: range ${header} is outside the object (size ${size})`, { 'content-range': `bytes */${size}` });
  if (m[1] === '') {
    const n = Number(m[2]);
    if (n === 0 || size === 0) throw unsatisfiable();
    return { start: Math.max(0, size - n), end: size - 1 };
  }
  const start = Number(m[1]);
  const end = m[2] === '' ? size - 1 : Math.min(Number(m[2]), size - 1);
  if (!Number.isSafeInteger(start) || start >= size || end < start) throw unsatisfiable();
  return { start, end };
}

export interface Representation {
  size: number;
  /** Strong validator: the sha256 where known. */
  etag: string | undefined;
  contentType: string;
  modified?: Date | undefined;
}

/** Quoted, as RFC 9110 writes entity tags. */
export const quoteEtag = (tag: string): string => `"${tag}"`;

/** If-None-Match against the ETag: true when the client's copy is current (answer 304). */
export function notModified(req: FastifyRequest, etag: string | undefined): boolean {
  const inm = req.headers['if-none-match'];
  if (!inm || etag === undefined) return false;
  return inm.split(',').map((s) => s.trim().replace(/^W\//, '')).some((t) => t === '*' || t === quoteEtag(etag));
}

/** The headers of a whole or ranged answer. */
export function setHeaders(reply: FastifyReply, r: Representation, range: ByteRange | undefined): void {
  void reply.header('accept-ranges', 'bytes').header('content-type', r.contentType);
  if (r.etag !== undefined) void reply.header('etag', quoteEtag(r.etag));
  if (r.modified) void reply.header('last-modified', r.modified.toUTCString());
  if (range) {
    const end = range.end ?? r.size - 1;
    void reply.code(206).header('content-range', `bytes ${range.start}-${end}/${r.size}`).header('content-length', String(end - range.start + 1));
  } else {
    void reply.header('content-length', String(r.size));
  }
}

/** Sends a verifying stream with its last chunk held back (see HoldLast); a range is sent as stored. */
export function sendVerified(reply: FastifyReply, stream: Readable, ranged: boolean): FastifyReply {
  if (ranged) return reply.send(stream);
  const held = new HoldLast();
  stream.on('error', (err) => held.destroy(err));
  return reply.send(stream.pipe(held));
}
