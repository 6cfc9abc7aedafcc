import { createHash, randomFillSync } from 'node:crypto';
import { request, type IncomingHttpHeaders } from 'node:http';
import { Readable } from 'node:stream';

/** `size` random bytes as a stream, hashed as they are made; `sha256()` once it has been read. */
export function randomBody(size: number, chunk = 1 << 20): { stream: Readable; sha256(): string } {
  const hash = createHash('sha256');
  let digest: string | undefined;
  const stream = Readable.from((function* () {
    for (let left = size; left > 0;) {
      const part = randomFillSync(Buffer.alloc(Math.min(left, chunk)));
      hash.update(part);
      left -= part.length;
      yield part;
    }
    digest = hash.digest('hex');
  })());
  return { stream, sha256: () => digest ?? (digest = hash.digest('hex')) };
}

export interface Sent {
  status: number;
  headers: IncomingHttpHeaders;
  body: string;
}

/** A request over a real socket with a streamed body. */
export function send(url: string, method: string, body: Readable | Buffer | undefined, headers: Record<string, string> = {}): Promise<Sent> {
  return new Promise((resolve, reject) => {
    // The path goes out as written: a URL object would resolve dot segments (`%2E%2E` too).
    const m = /^http:\/\/([^/:]+):(\d+)(\/.*)$/.exec(url)!;
    const req = request({ host: m[1], port: Number(m[2]), path: m[3], method, headers }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => { text += c; });
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: text }));
      res.on('error', reject);
    });
    req.on('error', reject);
    if (body instanceof Readable) body.pipe(req);
    else req.end(body);
  });
}

export interface Received {
  status: number;
  headers: IncomingHttpHeaders;
  size: number;
  sha256: string;
  /** Set when the transfer broke (the body ended short of Content-Length, or the socket was reset). */
  broken?: string;
}

/** A GET over a real socket, hashing the body without holding it. */
export function fetchDigest(url: string, headers: Record<string, string> = {}): Promise<Received> {
  return new Promise((resolve, reject) => {
    const req = request(url, { headers }, (res) => {
      const hash = createHash('sha256');
      let size = 0;
      let settled = false;
      const done = (broken?: string) => !settled && (settled = true) && resolve({ status: res.statusCode!, headers: res.headers, size, sha256: hash.digest('hex'), ...(broken ? { broken } : {}) });
      res.on('data', (c: Buffer) => { hash.update(c); size += c.length; });
      res.on('end', () => {
        const announced = res.headers['content-length'];
        done(announced !== undefined && Number(announced) !== size ? `ended at ${size} of ${announced} bytes` : undefined);
      });
      res.on('aborted', () => done('aborted'));
      res.on('error', (err) => { if (!res.complete) done(err.message); });
    });
    req.on('error', reject);
    req.end();
  });
}
