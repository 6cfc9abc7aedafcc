/**
 * Every metric the workers count, in one place: the worker side adds to them, `GET /metrics`
 * renders them. Base units (seconds, bytes), counters end in `_total`.
 */
export interface CounterDef { kind: 'counter'; help: string; labels: readonly string[] }
export interface HistogramDef { kind: 'histogram'; help: string; labels: readonly string[]; buckets: readonly number[] }
export type MetricDef = CounterDef | HistogramDef;

/** Jobs last from a millisecond (a log entry) to an hour (a large migration). */
export const DURATION_BUCKETS: readonly number[] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600];

export const METRICS = {
  stevedore_jobs_total: { kind: 'counter', help: 'Jobs finished, by type and outcome (completed, or failed for good)', labels: ['type', 'outcome'] },
  stevedore_job_duration_seconds: { kind: 'histogram', help: 'Run time of the final attempt of each finished job, by type and outcome', labels: ['type', 'outcome'], buckets: DURATION_BUCKETS },
  stevedore_job_retries_total: { kind: 'counter', help: 'Failed attempts that will be retried, by job type', labels: ['type'] },
  stevedore_bytes_total: { kind: 'counter', help: 'Bytes moved by completed jobs, by backend and direction (read from or written to the backend)', labels: ['backend', 'direction'] },
  stevedore_checksum_mismatches_total: { kind: 'counter', help: 'Checksum mismatches found: jobs failed with ChecksumMismatch and objects a verify job found mismatched, by job type', labels: ['type'] },
  stevedore_lock_losses_total: { kind: 'counter', help: 'Job runs stopped because their lock could not be renewed (another worker may have taken the job)', labels: [] },
  stevedore_webhook_deliveries_total: { kind: 'counter', help: 'Webhook delivery attempts, by outcome (delivered, failed, disabled, skipped)', labels: ['outcome'] },
} as const satisfies Record<string, MetricDef>;

export type MetricName = keyof typeof METRICS;
export type CounterName = { [K in MetricName]: (typeof METRICS)[K]['kind'] extends 'counter' ? K : never }[MetricName];
export type HistogramName = { [K in MetricName]: (typeof METRICS)[K]['kind'] extends 'histogram' ? K : never }[MetricName];
export type Labels = Record<string, string>;

/**
 * Where the totals live: one Redis hash per queue, field = a sample (metric, labels, part), value
 * = its total. After the queue name and a `:`, which no BullMQ job id may contain, so no job's key
 * can be this one. Its size follows the label values (types, backends, outcomes), never the jobs.
 */
export const metricsKey = (prefix: string, queue: string): string => `${prefix}:${queue}:stevedore:metrics`;

/** A hash field: `[name, labels, part]`, part `''` for a counter, `count`, `sum` or a bucket bound `le`. */
export const field = (name: MetricName, labels: Labels, part = ''): string => JSON.stringify([name, labels, part]);
