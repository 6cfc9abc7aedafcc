import type { Logger } from 'pino';
import type { RedisClient } from '../queue/connection.js';
import { compareStreamIds, JobTypes, STREAM_ID, toJobEvents, type JobEvent, type StreamEntry } from './job-events.js';

export interface EventHubOptions {
  /** BullMQ's events stream: `<prefix>:<queue>:events`. */
  streamKey: string;
  /** A job's hash key from its id: `<prefix>:<queue>:<id>`. */
  jobKey: (id: string) => string;
  /** The one blocking connection of this hub (XREAD BLOCK); closed by `close`. */
  reader: RedisClient;
  /** For XRANGE, XINFO and the type look-ups; not closed by `close`. */
  commands: RedisClient;
  log: Logger;
  /** How long one XREAD blocks; bounds how long `close` waits. @defaultValue 5000 */
  blockMs?: number;
  /** Entries per XREAD / XRANGE page. @defaultValue 500 */
  pageSize?: number;
}

export type Subscriber = (events: JobEvent[]) => void;

/** Where a resuming client stands: replay from its id, or it is too old (or foreign) to resume. */
export type Resume = { ok: true } | { ok: false; reason: string };

/**
 * One reader of BullMQ's events stream per process, fanning each batch out to every subscriber
 * (SSE clients), so a thousand clients cost Redis one blocking connection, not a thousand. The
 * reader starts with the first subscriber and runs until `close`.
 */
export class EventHub {
  private readonly subscribers = new Set<Subscriber>();
  private readonly types: JobTypes;
  private started: Promise<void> | undefined;
  private closed = false;
  private loop: Promise<void> | undefined;
  /** The id after which the reader reads next: every batch it hands out is newer than this. */
  private cursor = '0-0';

  constructor(private readonly o: EventHubOptions) {
    this.types = new JobTypes(o.commands, o.jobKey);
  }

  /** The newest id the reader has handed out (or started from): a live-only client starts here. */
  get position(): string {
    return this.cursor;
  }

  /** Starts the reader if it is not running; resolves once its starting position is known. */
  ready(): Promise<void> {
    this.started ??= (async () => {
      const info = await this.streamInfo();
      this.cursor = info?.lastGenerated ?? '0-0';
      this.loop = this.read();
    })();
    // A start that failed (Redis away) is tried again by the next client, not remembered.
    this.started.catch(() => { this.started = undefined; });
    return this.started;
  }

  /** Adds a subscriber; the returned function removes it. Batches reach it in stream order. */
  subscribe(fn: Subscriber): () => void {
    this.subscribers.add(fn);
    return () => { this.subscribers.delete(fn); };
  }

  /**
   * Whether a client that last saw `lastId` can resume without a gap. Streams are trimmed oldest
   * first, so nothing after `lastId` is gone while the entry `lastId` itself is still there (Redis
   * 7.0's `max-deleted-entry-id` does not count trimming, so it cannot say). Not resumable: a
   * malformed id, one newer than anything this stream made (another Redis, or a flushed one), or
   * an entry already trimmed.
   */
  async canResume(lastId: string): Promise<Resume> {
    if (!STREAM_ID.test(lastId)) return { ok: false, reason: `"${lastId.slice(0, 64)}" is not an event id` };
    const info = await this.streamInfo();
    if (!info) return lastId === '0-0' ? { ok: true } : { ok: false, reason: 'the events stream no longer exists' };
    if (compareStreamIds(lastId, info.lastGenerated) > 0) return { ok: false, reason: 'the id is newer than any event of this stream' };
    if (lastId === '0-0') return info.trimmed ? { ok: false, reason: 'the oldest events were trimmed from the stream' } : { ok: true };
    const [kept] = await this.o.commands.xrange(this.o.streamKey, lastId, lastId, 'COUNT', 1);
    return kept ? { ok: true } : { ok: false, reason: 'the event was trimmed from the stream: events after it may be lost' };
  }

  /** The contract's events after `afterId` up to the stream's end now, page by page. */
  async *replay(afterId: string): AsyncGenerator<JobEvent[]> {
    const size = this.o.pageSize ?? 500;
    let from = afterId;
    for (;;) {
      const entries = (await this.o.commands.xrange(this.o.streamKey, `(${from}`, '+', 'COUNT', size)) as StreamEntry[];
      if (!entries.length) return;
      from = entries.at(-1)![0];
      const events = await toJobEvents(entries, this.types);
      if (events.length) yield events;
      if (entries.length < size) return;
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    this.subscribers.clear();
    // Interrupts the XREAD BLOCK at once instead of waiting it out.
    this.o.reader.disconnect();
    await this.loop;
  }

  private async read(): Promise<void> {
    const block = this.o.blockMs ?? 5_000;
    const size = this.o.pageSize ?? 500;
    while (!this.closed) {
      try {
        const res = (await this.o.reader.xread('COUNT', size, 'BLOCK', block, 'STREAMS', this.o.streamKey, this.cursor)) as Array<[string, StreamEntry[]]> | null;
        const entries = res?.[0]?.[1];
        if (!entries?.length) continue;
        const events = await toJobEvents(entries, this.types);
        this.cursor = entries.at(-1)![0];
        if (!events.length) continue;
        for (const s of this.subscribers) {
          try {
            s(events);
          } catch (err) {
            this.o.log.warn({ err }, 'event subscriber failed');
          }
        }
      } catch (err) {
        if (this.closed) return;
        // Redis away: the connection reconnects by itself; read again from the same cursor.
        this.o.log.warn({ err: { message: (err as Error).message } }, 'events stream read failed; retrying');
        await new Promise((r) => setTimeout(r, 500));
      }
    }
  }

  private async streamInfo(): Promise<{ lastGenerated: string; trimmed: boolean } | undefined> {
    let raw: unknown[];
    try {
      raw = (await this.o.commands.call('XINFO', 'STREAM', this.o.streamKey)) as unknown[];
    } catch (err) {
      if (/no such key/i.test((err as Error).message)) return undefined;
      throw err;
    }
    const f = new Map<string, unknown>();
    for (let i = 0; i + 1 < raw.length; i += 2) f.set(String(raw[i]), raw[i + 1]);
    const added = f.get('entries-added');
    // Redis < 7 has no entries-added: assume trimmed, so a resume from 0-0 resets rather than silently misses.
    return { lastGenerated: String(f.get('last-generated-id') ?? '0-0'), trimmed: added === undefined || Number(added) !== Number(f.get('length')) };
  }
}
