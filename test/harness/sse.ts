import { request, type IncomingMessage } from 'node:http';

export interface SseEvent {
  id?: string;
  event: string;
  data: string;
}

export interface SseClient {
  status: number;
  headers: IncomingMessage['headers'];
  /** Every event so far, parsed. */
  events: SseEvent[];
  /** Comment lines (`: ...`) so far: heartbeats. */
  comments: string[];
  /** Resolves once `match` holds for the events so far (checked on each new event). */
  until(match: (events: SseEvent[]) => boolean, timeoutMs?: number): Promise<SseEvent[]>;
  /** Resolves when the server ended the stream. */
  ended: Promise<void>;
  close(): void;
}

/** A minimal EventSource over a real socket: parses `id`, `event`, `data` and comment lines as the SSE spec does. */
export function openSse(url: string, headers: Record<string, string> = {}): Promise<SseClient> {
  return new Promise((resolve, reject) => {
    const req = request(url, { headers: { accept: 'text/event-stream', ...headers } }, (res) => {
      const events: SseEvent[] = [];
      const comments: string[] = [];
      const waiters = new Set<() => void>();
      let buf = '';
      let cur: { id?: string; event?: string; data: string[] } = { data: [] };
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => {
        buf += chunk;
        let nl: number;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl).replace(/\r$/, '');
          buf = buf.slice(nl + 1);
          if (line === '') {
            if (cur.data.length || cur.event) events.push({ ...(cur.id !== undefined ? { id: cur.id } : {}), event: cur.event ?? 'message', data: cur.data.join('\n') });
            cur = { data: [] };
            for (const w of waiters) w();
            continue;
          }
          if (line.startsWith(':')) { comments.push(line.slice(1).trim()); continue; }
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
          if (field === 'id') cur.id = value;
          else if (field === 'event') cur.event = value;
          else if (field === 'data') cur.data.push(value);
        }
      });
      const ended = new Promise<void>((r) => { res.once('close', () => { for (const w of waiters) w(); r(); }); });
      resolve({
        status: res.statusCode ?? 0, headers: res.headers, events, comments, ended,
        until(match, timeoutMs = 20_000) {
          if (match(events)) return Promise.resolve(events);
          return new Promise((ok, fail) => {
            const timer = setTimeout(() => { waiters.delete(check); fail(new Error(`SSE: no match within ${timeoutMs} ms; got ${JSON.stringify(events)}`)); }, timeoutMs);
            const check = () => {
              if (match(events)) { clearTimeout(timer); waiters.delete(check); ok(events); }
              else if (res.closed) { clearTimeout(timer); waiters.delete(check); fail(new Error(`SSE: stream ended; got ${JSON.stringify(events)}`)); }
            };
            waiters.add(check);
          });
        },
        close: () => { req.destroy(); },
      });
    });
    req.on('error', reject);
    req.end();
  });
}
