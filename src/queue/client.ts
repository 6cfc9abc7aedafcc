import { Queue, QueueEvents, type Job, type JobsOptions } from 'bullmq';
import type { FetchPayload, FetchResult, LogPayload, LogResult, MigratePayload, MigrateResult, RepackPayload, RepackResult, StorePayload, StoreResult, VerifyPayload, VerifyResult } from '../../jobs/index.js';
import { cancelJob, type CancelOutcome } from './cancel.js';
import { assertClusterPrefix, DEFAULT_QUEUE, describeTarget, duplicateConnection, redisConnection, waitForRedis, type RedisClient, type RedisTarget } from './connection.js';
import { DEFAULT_RETENTION, jobRetention, type Retention } from './retention.js';

/** What a producer sends for each job: the contract's payloads, before defaults are applied. */
export interface Payloads {
  store: Omit<StorePayload, 'backend'> & { backend?: string };
  'fetch-to-staging': Omit<FetchPayload, 'backend'> & { backend?: string };
  log: Omit<LogPayload, 'backend'> & { backend?: string };
  'repack-session': Omit<RepackPayload, 'backend'> & { backend?: string };
  migrate: MigratePayload;
  verify: Omit<VerifyPayload, 'backend'> & { backend?: string };
}
export interface Results {
  store: StoreResult;
  'fetch-to-staging': FetchResult;
  log: LogResult;
  'repack-session': RepackResult;
  migrate: MigrateResult;
  verify: VerifyResult;
}
export type JobName = keyof Payloads;

export interface ClientOptions {
  /** @defaultValue 'redis://127.0.0.1:6379' */
  redisUrl?: string;
  /** One Redis or a Redis Cluster's seeds; wins over `redisUrl`. */
  redis?: RedisTarget;
  /** An existing connection instead of `redis`/`redisUrl` (not closed by `close`). */
  connection?: RedisClient;
  /** @defaultValue 'stevedore' */
  queue?: string;
  /** @defaultValue 'bull'; on a Redis Cluster it must contain a hash tag, such as '{stevedore}'. */
  prefix?: string;
  /** Counts of finished jobs kept (see retention.ts). @defaultValue DEFAULT_RETENTION */
  retention?: Retention;
  /** Merged over the defaults below for every job this client adds. */
  defaultJobOptions?: JobsOptions;
}

/**
 * Several attempts with exponential backoff and jitter (2 s, 4 s, 8 s... each up to 50% shorter),
 * so replicas retrying a flaky store do not retry in step; finished jobs are kept for a while (and
 * up to the retention counts) so producers can read their results.
 */
export const DEFAULT_JOB_OPTIONS: JobsOptions = {
  attempts: 5,
  backoff: { type: 'exponential', delay: 2_000, jitter: 0.5 },
  ...jobRetention(DEFAULT_RETENTION),
};

export interface Progress {
  bytes: number;
  total?: number;
}

/** The producer side: enqueue the contract's jobs, follow them, await their results. */
/** Job states after which a wait can no longer be said to have run out first. */
const FINISHED = new Set(['completed', 'failed', 'unknown']);

export class StevedoreClient {
  readonly queue: Queue;
  private events: QueueEvents | undefined;
  private eventsReady: Promise<QueueEvents> | undefined;
  private eventsConnection: RedisClient | undefined;
  private readonly own: RedisClient | undefined;
  private readonly opts: ClientOptions;
  private readonly target: RedisTarget;

  constructor(opts: ClientOptions = {}) {
    this.opts = opts;
    this.target = opts.redis ?? { url: opts.redisUrl ?? 'redis://127.0.0.1:6379' };
    const prefix = opts.prefix ?? 'bull';
    const cluster = opts.connection ? opts.connection.isCluster : 'cluster' in this.target;
    // Refused here, not by Redis: BullMQ would otherwise retry CROSSSLOT errors forever.
    if (cluster) assertClusterPrefix(prefix);
    this.own = opts.connection ? undefined : redisConnection(this.target, 'producer');
    // The errors surface where they matter (add, ready); unheard, ioredis would print each retry.
    this.own?.on('error', () => {});
    const retention = opts.retention ? jobRetention(opts.retention) : {};
    this.queue = new Queue(opts.queue ?? DEFAULT_QUEUE, {
      connection: opts.connection ?? this.own!,
      prefix,
      defaultJobOptions: { ...DEFAULT_JOB_OPTIONS, ...retention, ...opts.defaultJobOptions },
    });
    // add() rejects while Redis is away; without a listener BullMQ would also print every error.
    this.queue.on('error', () => {});
  }

  /** Where this client connects, password hidden: for messages. */
  get where(): string {
    return this.opts.connection ? 'the given Redis connection' : describeTarget(this.target);
  }

  /**
   * Resolves once Redis answers, or fails after `timeoutMs` with a `Transient` error naming where
   * it tried: for one-shot callers (the CLI), which must not wait out an outage.
   */
  async ready(timeoutMs = 5_000): Promise<void> {
    try {
      await waitForRedis(this.opts.connection ?? this.own!, timeoutMs);
    } catch (err) {
      throw Object.assign(new Error(`Transient: Redis at ${this.where} is unreachable: ${(err as Error).message}`), { code: 'Transient' });
    }
  }

  /** Enqueues one job; pass `jobId` to make enqueueing idempotent. Resolves to the job id. */
  async add<N extends JobName>(name: N, payload: Payloads[N], opts: JobsOptions = {}): Promise<string> {
    const job = await this.queue.add(name, payload, opts);
    return job.id!;
  }

  store(p: Payloads['store'], opts?: JobsOptions): Promise<string> { return this.add('store', p, opts); }
  fetchToStaging(p: Payloads['fetch-to-staging'], opts?: JobsOptions): Promise<string> { return this.add('fetch-to-staging', p, opts); }
  log(p: Payloads['log'], opts?: JobsOptions): Promise<string> { return this.add('log', p, opts); }
  repackSession(p: Payloads['repack-session'], opts?: JobsOptions): Promise<string> { return this.add('repack-session', p, opts); }
  /** A migration's progress is its counters (`scanned, copied, skipped, failed, bytes, ...`, plus `listed`), moving as chunks finish. */
  migrate(p: Payloads['migrate'], opts?: JobsOptions): Promise<string> { return this.add('migrate', p, opts); }
  verify(p: Payloads['verify'], opts?: JobsOptions): Promise<string> { return this.add('verify', p, opts); }

  /**
   * Resolves with the job's result, or rejects with an Error whose message is the failed reason
   * (`<Code>: ...`) and whose `code` property is the contract code.
   */
  async result<N extends JobName>(jobId: string, opts: { timeoutMs?: number; onProgress?: (p: Progress) => void } = {}): Promise<Results[N]> {
    const events = await this.queueEvents();
    const job = await this.queue.getJob(jobId);
    if (!job) throw Object.assign(new Error(`NotFound: job ${jobId} does not exist (or was removed)`), { code: 'NotFound' });
    const onProgress = ({ jobId: id, data }: { jobId: string; data: unknown }) => {
      if (id === jobId && typeof data === 'object' && data !== null) opts.onProgress?.(data as Progress);
    };
    if (opts.onProgress) events.on('progress', onProgress);
    try {
      return (await job.waitUntilFinished(events, opts.timeoutMs)) as Results[N];
    } catch (err) {
      const reason = err instanceof Error ? err.message : String(err);
      // The wait ran out, not the job: it may still be running (`pending`, no contract code). A job
      // that finished and was removed (removeOnFail) reads `unknown` and keeps its own reason.
      if (opts.timeoutMs !== undefined && !FINISHED.has(await job.getState())) {
        throw Object.assign(new Error(`job ${jobId} did not finish within ${opts.timeoutMs} ms; it may still be running`), { code: 'Unknown', pending: true });
      }
      const code = /^(\w+):/.exec(reason)?.[1] ?? 'Unknown';
      throw Object.assign(new Error(reason), { code });
    } finally {
      if (opts.onProgress) events.off('progress', onProgress);
    }
  }

  /** Enqueue and await in one call. */
  async run<N extends JobName>(name: N, payload: Payloads[N], opts: JobsOptions & { timeoutMs?: number; onProgress?: (p: Progress) => void; onAdded?: (id: string) => void } = {}): Promise<Results[N]> {
    const { timeoutMs, onProgress, onAdded, ...jobOpts } = opts;
    // Subscribe before adding, so a job that finishes at once is not missed.
    await this.queueEvents();
    const id = await this.add(name, payload, jobOpts);
    onAdded?.(id);
    return this.result<N>(id, { timeoutMs, onProgress });
  }

  /**
   * Cancels a job wherever it is: a waiting (or delayed) one is removed, a running one is stopped
   * by its worker (its signal aborts; it fails `Cancelled`, never retried; nothing half-written
   * becomes visible) and a migration's chunks stop with it.
   */
  cancel(jobId: string): Promise<CancelOutcome> {
    return cancelJob(this.queue, this.opts.connection ?? this.own!, jobId);
  }

  getJob(jobId: string): Promise<Job | undefined> {
    return this.queue.getJob(jobId);
  }

  async close(): Promise<void> {
    // A connection that never got through would keep reconnecting, and BullMQ's close waits for
    // its connection to be ready first: drop it at once.
    if (this.own && this.own.status !== 'ready') this.own.disconnect();
    if (this.eventsConnection && this.eventsConnection.status !== 'ready') this.eventsConnection.disconnect();
    await this.events?.close();
    await this.eventsConnection?.quit().catch(() => {});
    await this.queue.close();
    await this.own?.quit().catch(() => {});
  }

  private queueEvents(): Promise<QueueEvents> {
    this.eventsReady ??= (async () => {
      // QueueEvents blocks on its connection, so it gets one of its own.
      const connection = this.opts.connection ? duplicateConnection(this.opts.connection) : redisConnection(this.target, 'worker');
      connection.on('error', () => {});
      this.eventsConnection = connection;
      // QueueEvents reads from '$' only once its first XREAD reaches Redis, after waitUntilReady()
      // has resolved; a job finishing in between would never be reported and result() would wait
      // out its timeout. Read on from the stream's newest entry as of now instead.
      const [newest] = await connection.xrevrange(this.queue.toKey('events'), '+', '-', 'COUNT', 1);
      const events = new QueueEvents(this.queue.name, { connection, prefix: this.queue.opts.prefix, lastEventId: newest?.[0] ?? '0-0' });
      events.on('error', () => {});
      this.events = events;
      await events.waitUntilReady();
      return events;
    })();
    return this.eventsReady;
  }
}
