import { fastifySSE as sse } from '@fastify/sse';
import type { FastifyPluginAsync, FastifyReply } from 'fastify';
import type { Logger } from 'pino';
import { EventHub } from '../events/hub.js';
import { compareStreamIds, type JobEvent } from '../events/job-events.js';
import type { RedisClient } from '../queue/connection.js';

export interface EventsPluginOptions {
  /** The public queue's name (STEVEDORE_QUEUE). */
  queue: string;
  /** BullMQ's key prefix (STEVEDORE_PREFIX). Not `prefix`: Fastify takes that as the routes' URL prefix. */
  keyPrefix: string;
  /**
   * A new Redis connection (worker role: blocking reads wait out a Redis restart). Called twice:
   * the one blocking stream reader, and one for replays and type look-ups. Both closed by the plugin.
   */
  connect: () => RedisClient;
  /** Job types `?type=` accepts; anything else is 400. Unset: any type. */
  types?: readonly string[];
  log: Logger;
  /** Comment lines keep proxies from closing an idle stream. @defaultValue 15000 */
  heartbeatMs?: number;
  /** @defaultValue 5000 */
  blockMs?: number;
  /**
   * Events queued for one client that reads too slowly: past this, its stream is closed (it
   * resumes with Last-Event-ID), so one stuck client never holds the process's memory.
   * @defaultValue 10000
   */
  maxQueuedPerClient?: number;
}

/** One connected SSE client: what it has been sent, its filter, and its queue of writes. */
class Client {
  /** The id of the last event this client was sent (or passed over): nothing at or before it goes out again. */
  sent: string;
  private chain: Promise<void> = Promise.resolve();
  private queued = 0;
  /** Live batches held back while the client's replay runs. */
  private held: JobEvent[][] | undefined = [];

  constructor(private readonly reply: FastifyReply, private readonly filter: Set<string> | undefined, start: string, private readonly max: number) {
    this.sent = start;
  }

  /** Live batches: held during replay, then sent in order. */
  live(events: JobEvent[]): void {
    if (this.held) this.held.push(events);
    else this.push(events);
  }

  /** Ends the replay: what the reader delivered meanwhile goes out, minus what the replay already sent. */
  goLive(): void {
    const held = this.held ?? [];
    this.held = undefined;
    for (const b of held) this.push(b);
  }

  push(events: JobEvent[]): void {
    for (const e of events) {
      if (compareStreamIds(e.id, this.sent) <= 0) continue;
      this.sent = e.id;
      if (this.filter && !(e.data.type && this.filter.has(e.data.type))) continue;
      this.write({ id: e.id, event: e.event, data: e.data });
    }
  }

  write(msg: { id?: string; event: string; data: unknown }): void {
    if (!this.reply.sse.isConnected) return;
    if (++this.queued > this.max) {
      this.reply.sse.close();
      return;
    }
    this.chain = this.chain.then(() => this.reply.sse.send(msg)).then(() => { this.queued--; }, () => { this.reply.sse.close(); });
  }

  /** Resolves once everything queued so far was handed to the socket. */
  drained(): Promise<void> {
    return this.chain;
  }
}

/**
 * `GET /events`: Server-Sent Events of job completions, failures and progress, read from BullMQ's
 * events stream. An event's id is its stream id, so `Last-Event-ID` (or `?lastEventId=`) resumes
 * from any replica: missed events are replayed with XRANGE, then the client goes live, each event
 * exactly once. An id the stream can no longer resume from gets `event: reset` (with the id to
 * carry on from) before going live.
 */
export const eventsPlugin: FastifyPluginAsync<EventsPluginOptions> = async (app, opts) => {
  const reader = opts.connect();
  const commands = opts.connect();
  // Reconnects are the connections' own business; the hub logs what a read could not do.
  for (const c of [reader, commands]) c.on('error', () => {});
  const base = `${opts.keyPrefix}:${opts.queue}`;
  const hub = new EventHub({ streamKey: `${base}:events`, jobKey: (id) => `${base}:${id}`, reader, commands, log: opts.log, ...(opts.blockMs ? { blockMs: opts.blockMs } : {}) });
  const clients = new Set<FastifyReply>();
  const known = opts.types ? new Set(opts.types) : undefined;

  // Encapsulated: a parent that registered @fastify/sse already lends its decorator.
  if (!app.hasReplyDecorator('sse')) await app.register(sse, { heartbeatInterval: opts.heartbeatMs ?? 15_000 });

  // Open streams would hold `close()` forever; they end first, and clients resume elsewhere.
  app.addHook('preClose', async () => {
    for (const r of clients) r.sse.close();
  });
  app.addHook('onClose', async () => {
    await hub.close();
    await commands.quit().catch(() => commands.disconnect());
  });

  app.get<{ Querystring: { type?: string | string[]; lastEventId?: string | string[] } }>('/events', { sse: { kind: 'only' } }, async (req, reply) => {
    // `?type=a,b` and `?type=a&type=b` alike.
    const types = [req.query.type ?? []].flat().flatMap((t) => t.split(',')).map((t) => t.trim()).filter(Boolean);
    const wanted = types.length ? types : undefined;
    const unknown = known && wanted?.find((t) => !known.has(t));
    if (unknown !== undefined) {
      return reply.code(400).header('content-type', 'application/json').send({ error: 'InvalidInput', message: `type: unknown job type "${unknown.slice(0, 64)}" (expected one of ${[...known!].join(', ')})` });
    }
    const header = req.headers['last-event-id'];
    const lastId = (Array.isArray(header) ? header[0] : header) ?? [req.query.lastEventId ?? []].flat()[0];
    await hub.ready();
    const client = new Client(reply, wanted ? new Set(wanted) : undefined, hub.position, opts.maxQueuedPerClient ?? 10_000);
    // Subscribed before the replay starts, so nothing between the replay's end and live is missed.
    const unsubscribe = hub.subscribe((events) => client.live(events));
    clients.add(reply);
    reply.sse.keepAlive();
    reply.sse.onClose(() => {
      unsubscribe();
      clients.delete(reply);
    });
    reply.sse.sendHeaders();
    if (lastId === undefined) {
      client.goLive();
      return;
    }
    try {
      const resume = await hub.canResume(lastId);
      if (!resume.ok) {
        // Everything up to the reader's position is passed over; the client carries on from it.
        client.sent = hub.position;
        client.write({ id: client.sent, event: 'reset', data: { reason: resume.reason, lastEventId: client.sent } });
      } else {
        client.sent = lastId;
        for await (const page of hub.replay(lastId)) {
          if (!reply.sse.isConnected) break;
          client.push(page);
          await client.drained();
        }
      }
    } catch (err) {
      // Redis failed mid-replay: the client reconnects with the last id it got, nothing is skipped.
      req.log.warn({ err }, 'event replay failed');
      reply.sse.close();
      return;
    }
    client.goLive();
  });
};
