import { createServer, type IncomingHttpHeaders } from 'node:http';
import type { AddressInfo } from 'node:net';

export interface Received {
  at: number;
  headers: IncomingHttpHeaders;
  body: string;
  /** What the receiver answered. */
  status?: number;
}

export interface Receiver {
  url: string;
  received: Received[];
  /** How to answer the next request: status and headers; default 204. */
  answer: (r: Received, n: number) => { status: number; headers?: Record<string, string>; delayMs?: number };
  /** Resolves once `match` holds for what was received so far. */
  until(match: (r: Received[]) => boolean, timeoutMs?: number): Promise<Received[]>;
  close(): Promise<void>;
}

/** A webhook endpoint on loopback that records every request and answers as told. */
export async function startReceiver(): Promise<Receiver> {
  const waiters = new Set<() => void>();
  const r: Receiver = {
    url: '', received: [], answer: () => ({ status: 204 }),
    until(match, timeoutMs = 30_000) {
      if (match(r.received)) return Promise.resolve(r.received);
      return new Promise((ok, fail) => {
        const timer = setTimeout(() => { waiters.delete(check); fail(new Error(`receiver: no match within ${timeoutMs} ms; got ${r.received.length} requests`)); }, timeoutMs);
        const check = () => { if (match(r.received)) { clearTimeout(timer); waiters.delete(check); ok(r.received); } };
        waiters.add(check);
      });
    },
    close: () => new Promise((ok) => { server.closeAllConnections(); server.close(() => ok()); }),
  };
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const got: Received = { at: Date.now(), headers: req.headers, body: Buffer.concat(chunks).toString() };
      r.received.push(got);
      const a = r.answer(got, r.received.length);
      got.status = a.status;
      const send = () => {
        if (res.destroyed) return;
        res.writeHead(a.status, a.headers).end();
        for (const w of waiters) w();
      };
      if (a.delayMs) setTimeout(send, a.delayMs);
      else send();
      for (const w of waiters) w();
    });
  });
  await new Promise<void>((ok) => server.listen(0, '127.0.0.1', ok));
  r.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/hooks?token=abc`;
  return r;
}
