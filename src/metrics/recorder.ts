import type { Job } from 'bullmq';
import { JOBS } from '../../jobs/index.js';
import type { Logger } from 'pino';
import type { RedisClient } from '../queue/connection.js';
import type { JobHooks } from '../queue/job-hooks.js';
import { bytesMoved } from './job-bytes.js';
import { field, METRICS, metricsKey, type CounterName, type HistogramName, type Labels } from './catalog.js';

export interface RecorderOptions {
  prefix: string;
  queue: string;
  /** How often the counts of this process are added to the Redis totals. @defaultValue 1000 */
  flushMs?: number;
  log: Logger;
}

/**
 * A worker process's counters. Workers have no HTTP port: their counts are added to one Redis hash
 * per queue (HINCRBYFLOAT, in a MULTI so a scrape never sees half a histogram), every `flushMs` and
 * at close, and `GET /metrics` on any server reads that hash: one HGETALL, whatever the number of
 * workers or jobs. Totals survive worker restarts, so counters never go backwards. A flush that
 * fails keeps its counts for the next one.
 */
/**
 * The `type` label: a job type, or `other` for any other name a producer used (such jobs fail
 * InvalidInput at once), so a producer's typos cannot grow the totals without bound.
 */
const KNOWN_TYPES: ReadonlySet<string> = new Set(Object.keys(JOBS));
const typeLabel = (name: string): string => (KNOWN_TYPES.has(name) ? name : 'other');

export class MetricsRecorder implements JobHooks {
  private pending = new Map<string, number>();
  private readonly timer: NodeJS.Timeout;
  private readonly key: string;
  private flushing: Promise<void> = Promise.resolve();

  constructor(private readonly redis: RedisClient, private readonly o: RecorderOptions) {
    this.key = metricsKey(o.prefix, o.queue);
    this.timer = setInterval(() => { void this.flush(); }, o.flushMs ?? 1_000);
    this.timer.unref();
  }

  inc(name: CounterName, labels: Labels = {}, by = 1): void {
    if (by) this.add(field(name, labels), by);
  }

  observe(name: HistogramName, labels: Labels, value: number): void {
    const le = METRICS[name].buckets.find((b) => value <= b);
    this.add(field(name, labels, le === undefined ? '+Inf' : String(le)), 1);
    this.add(field(name, labels, 'count'), 1);
    this.add(field(name, labels, 'sum'), value);
  }

  completed(job: Job, result: unknown): void {
    this.finished(job, 'completed');
    for (const b of bytesMoved(job.name, job.data, result)) this.inc('stevedore_bytes_total', { backend: b.backend, direction: b.direction }, b.bytes);
    const mismatched = job.name === 'verify' ? Number((result as { mismatched?: unknown } | null)?.mismatched) : 0;
    if (mismatched > 0) this.inc('stevedore_checksum_mismatches_total', { type: typeLabel(job.name) }, mismatched);
  }

  failed(job: Job, err: Error): void {
    this.finished(job, 'failed');
    if ((job.failedReason ?? err.message).startsWith('ChecksumMismatch')) this.inc('stevedore_checksum_mismatches_total', { type: typeLabel(job.name) });
  }

  retried(job: Job): void {
    this.inc('stevedore_job_retries_total', { type: typeLabel(job.name) });
  }

  lockLost(): void {
    this.inc('stevedore_lock_losses_total');
  }

  /** Adds what was counted since the last flush to the Redis totals; resolves once they are there (or the flush failed). */
  flush(): Promise<void> {
    this.flushing = this.flushing.then(async () => {
      if (!this.pending.size) return;
      const batch = this.pending;
      this.pending = new Map();
      const tx = this.redis.multi();
      for (const [f, by] of batch) tx.hincrbyfloat(this.key, f, by);
      try {
        const res = await tx.exec();
        if (!res || res.some(([err]) => err)) throw new Error('metrics transaction failed');
      } catch (err) {
        for (const [f, by] of batch) this.add(f, by);
        this.o.log.warn({ err: { message: (err as Error).message } }, 'metrics flush failed; kept for the next one');
      }
    });
    return this.flushing;
  }

  /** Flushes what is left; bounded, so a stop with Redis away does not hang on it (those counts are lost). */
  async close(timeoutMs = 2_000): Promise<void> {
    clearInterval(this.timer);
    let t: NodeJS.Timeout | undefined;
    await Promise.race([this.flush(), new Promise<void>((r) => { t = setTimeout(r, timeoutMs); })]);
    clearTimeout(t);
  }

  private finished(job: Job, outcome: 'completed' | 'failed'): void {
    const type = typeLabel(job.name);
    this.inc('stevedore_jobs_total', { type, outcome });
    if (job.processedOn && job.finishedOn) this.observe('stevedore_job_duration_seconds', { type, outcome }, Math.max(0, job.finishedOn - job.processedOn) / 1000);
  }

  private add(f: string, by: number): void {
    this.pending.set(f, (this.pending.get(f) ?? 0) + by);
  }
}
