import { Job, Queue } from 'bullmq';
import type { Logger } from 'pino';
import type { RedisClient } from '../queue/connection.js';
import { RedisLocks } from '../queue/lock.js';
import { webhookId, webhookQueueName, type WebhookPublisher } from './publisher.js';

export interface SweepOptions {
  queue: string;
  prefix: string;
  /** How often a sweep runs (one process at a time). @defaultValue 5000 */
  intervalMs?: number;
  /** A job is swept only once it finished this long ago: its own worker's hook queues it first, and clocks may differ by this much. @defaultValue 5000 */
  graceMs?: number;
  log: Logger;
}

const KINDS = ['completed', 'failed'] as const;
/** Finished jobs looked at per round trip. */
const BATCH = 500;

/** Where the sweep has got to per outcome (finish times, ms): after the webhook queue's name and a `:`, which no job id may contain. */
const cursorKey = (prefix: string, queue: string): string => `${prefix}:${webhookQueueName(queue)}:swept`;
/** The lock one sweeper holds while it sweeps (`<prefix>:<queue>:lock:webhooks:sweep`; session locks are `session:<id>`). */
const SWEEP_LOCK = 'webhooks:sweep';

/**
 * The other way a job's end reaches its webhook. The worker that finished a job queues its
 * delivery from BullMQ's `completed`/`failed` event, after Redis recorded the outcome: a process
 * killed in between would lose it. So one process at a time (a Redis lock, RedisLocks) walks the public
 * queue's finished sets by finish time, from where the last sweep stopped up to `graceMs` ago, and
 * queues the delivery of every job that has none (its delivery job, named by the webhook-id, does
 * not exist). A delivery queued twice is one job (BullMQ refuses a second job of that id), so the
 * sweep and a late hook never both deliver. The cursor starts where the first sweep ever ran.
 */
export class WebhookSweeper {
  private readonly intervalMs: number;
  private readonly graceMs: number;
  private readonly locks: RedisLocks;
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<unknown> = Promise.resolve();
  private closed = false;
  /** The public queue, whose finished jobs are read. */
  private readonly jobs: Queue;

  constructor(private readonly redis: RedisClient, private readonly publisher: WebhookPublisher, private readonly o: SweepOptions) {
    this.intervalMs = o.intervalMs ?? 5_000;
    this.graceMs = o.graceMs ?? 5_000;
    this.jobs = new Queue(o.queue, { connection: redis, prefix: o.prefix });
    this.locks = new RedisLocks(redis, { prefix: o.prefix, queue: o.queue });
    this.jobs.on('error', () => {});
  }

  start(): this {
    const tick = (): void => {
      if (this.closed) return;
      this.running = this.sweep().catch((err: unknown) => this.o.log.warn({ err }, 'webhook sweep failed; the next one retries'))
        .finally(() => { if (!this.closed) this.timer = setTimeout(tick, this.intervalMs).unref(); });
    };
    this.timer = setTimeout(tick, this.intervalMs).unref();
    return this;
  }

  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.timer);
    await this.running;
    await this.jobs.close();
  }

  /** One sweep, if no other process holds its lock: the deliveries it queued. */
  async sweep(now = Date.now()): Promise<number> {
    const { prefix, queue } = this.o;
    const got = await this.locks.tryAcquire(SWEEP_LOCK);
    if (!got) return 0;
    try {
      const upTo = now - this.graceMs;
      const cursors = await this.redis.hmget(cursorKey(prefix, queue), ...KINDS);
      let queued = 0;
      const next: Record<string, string> = {};
      for (const [i, kind] of KINDS.entries()) {
        const from = cursors[i] ? Number(cursors[i]) : undefined;
        if (from !== undefined) queued += await this.sweepKind(kind, from, upTo);
        // Never backwards (this process's clock may be behind the last sweeper's).
        next[kind] = String(Math.max(from ?? upTo, upTo));
      }
      // A lock lost meanwhile (another sweeper may have moved the cursor): leave the cursor to it.
      if (!got.lease.signal.aborted) await this.redis.hset(cursorKey(prefix, queue), next);
      return queued;
    } finally {
      await got.lease.release();
    }
  }

  /** The jobs of one finished set with finish times in (from, upTo], in batches; the deliveries queued. */
  private async sweepKind(kind: typeof KINDS[number], from: number, upTo: number): Promise<number> {
    const { prefix, queue } = this.o;
    const set = `${prefix}:${queue}:${kind}`;
    let queued = 0;
    // Paged by finish time, not by rank: a trim of the set meanwhile must not shift a job past a page.
    let lo = `(${from}`;
    let limit = BATCH;
    let seen = new Set<string>();
    for (;;) {
      const flat = await this.redis.zrangebyscore(set, lo, upTo, 'WITHSCORES', 'LIMIT', 0, limit);
      const page: { id: string; score: number }[] = [];
      for (let j = 0; j < flat.length; j += 2) page.push({ id: flat[j]!, score: Number(flat[j + 1]) });
      const ids = page.filter((p) => !seen.has(p.id)).map((p) => p.id);
      queued += await this.queueMissing(kind, ids);
      if (page.length < limit) return queued;
      const last = page.at(-1)!.score;
      if (page[0]!.score === last) {
        // A full page of one finish time: take more of it.
        limit *= 2;
        seen = new Set(page.map((p) => p.id));
      } else {
        lo = String(last);
        limit = BATCH;
        seen = new Set(page.filter((p) => p.score === last).map((p) => p.id));
      }
    }
  }

  /** Queues the delivery of each of these finished jobs that has none yet; how many it queued. */
  private async queueMissing(kind: typeof KINDS[number], ids: string[]): Promise<number> {
    const { prefix, queue } = this.o;
    const deliveries = this.publisher.queue.name;
    const stamps = await Promise.all(ids.map((id) => this.redis.hmget(`${prefix}:${queue}:${id}`, 'timestamp', 'finishedOn')));
    const wanted = ids.map((id, j) => {
      const [timestamp, finishedOn] = stamps[j]!;
      if (!timestamp) return undefined; // removed meanwhile
      return { id, hook: webhookId(queue, { id, timestamp: Number(timestamp), finishedOn: finishedOn ? Number(finishedOn) : undefined }, kind) };
    });
    const present = await Promise.all(wanted.map((w) => (w ? this.redis.exists(`${prefix}:${deliveries}:${w.hook}`) : 1)));
    let queued = 0;
    for (const [j, w] of wanted.entries()) {
      if (!w || present[j]) continue;
      const job = await Job.fromId(this.jobs, w.id);
      if (!job) continue;
      if (kind === 'completed') await this.publisher.completed(job, job.returnvalue);
      else await this.publisher.failed(job, new Error(job.failedReason));
      queued++;
      this.o.log.info({ jobId: w.id, webhookId: w.hook, kind }, 'webhook queued by the sweep: the job\'s own worker did not');
    }
    return queued;
  }
}
