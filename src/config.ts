import { availableParallelism, hostname } from 'node:os';
import { resolve } from 'node:path';
import { z } from 'zod';
import { DEFAULT_BACKENDS } from './backends/open.js';
import { DEFAULT_FANOUT_LIMITS } from './fanout/parent.js';
import { CLUSTER_PREFIX_REASON, hasHashTag, parseClusterSeeds, type RedisTarget } from './queue/connection.js';
import { DEFAULT_RETENTION } from './queue/retention.js';
import { DEFAULT_WEBHOOK_SCHEDULE_MS } from './webhooks/schedule.js';
import { secretKey } from './webhooks/signature.js';

/**
 * Jobs mostly wait on disks and networks; hashing is the only CPU work. Four jobs per core keeps
 * both cores busy hashing while others wait on I/O, without so many that large transfers crowd
 * each other out.
 */
export const defaultConcurrency = (): number => Math.min(16, Math.max(2, 4 * availableParallelism()));

const int = (min: number, max: number) => z.coerce.number().int().min(min).max(max);

const Seeds = z.string().optional().transform((v, ctx) => {
  if (!v?.trim()) return undefined;
  try {
    const seeds = parseClusterSeeds(v);
    if (seeds.length) return seeds;
    ctx.addIssue({ code: 'custom', message: 'must list at least one host:port' });
  } catch (err) {
    ctx.addIssue({ code: 'custom', message: `must be comma-separated host:port seeds: ${(err as Error).message}` });
  }
  return z.NEVER;
});

const Schema = z.object({
  redisUrl: z.string().regex(/^rediss?:\/\//, 'must be a redis:// or rediss:// URL'),
  /** Seeds of a Redis Cluster; when set, used instead of redisUrl. */
  redisClusterNodes: Seeds,
  queue: z.string().min(1).max(200),
  prefix: z.string().min(1).max(200),
  concurrency: int(1, 1024),
  backends: z.string().min(1),
  stagingDir: z.string().min(1),
  /** Largest decoded `source.base64` a store job may carry: job data lives in Redis. */
  maxInlineBytes: int(0, 64 << 20),
  /** How long SIGTERM waits for active jobs before handing them back. */
  shutdownTimeoutMs: int(0, 3_600_000),
  /** BullMQ lock; renewed at half this while a job runs. */
  lockDurationMs: int(1_000, 3_600_000),
  /** How often a worker looks for jobs whose worker died (their lock expired). */
  stalledIntervalMs: int(1_000, 3_600_000),
  /** How long a temp file or tree must stay unchanged before a sweep counts it as a killed writer's leftover. */
  sweepAfterMs: int(1_000, 30 * 86_400_000),
  /** Days a migration's record of verified copies is kept after its last write (a re-run older than that reads again). */
  migrateRecordsDays: int(1, 36_500),
  /** Recorded on each job as `processedBy`. */
  workerName: z.string().min(1).max(200),
  logLevel: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']),
  /** Finished jobs kept per queue for producers that set no removeOn* (see queue/retention.ts). */
  keepCompleted: int(0, 100_000_000),
  keepFailed: int(0, 100_000_000),
  /** migrate/verify chunks: keys and bytes per chunk, chunks in flight per parent, objects at once per chunk. */
  fanoutChunkKeys: int(1, 100_000),
  fanoutChunkBytes: int(1, Number.MAX_SAFE_INTEGER),
  fanoutWindow: int(1, 10_000),
  fanoutLanes: int(1, 256),
  /** Where every completion and failure is POSTed (Standard Webhooks); unset: no webhooks. */
  webhookUrl: z.string().optional().transform((v) => v?.trim() || undefined).refine((v) => v === undefined || /^https?:\/\/[^/]/.test(v), 'must be an http:// or https:// URL'),
  /** `whsec_` + base64; required with webhookUrl. */
  webhookSecret: z.string().optional().transform((v) => v?.trim() || undefined).superRefine((v, ctx) => {
    if (v === undefined) return;
    try { secretKey(v); } catch (err) { ctx.addIssue({ code: 'custom', message: (err as Error).message }); }
  }),
  /** Wait before each delivery attempt, ms (comma-separated); its length is the number of attempts. */
  webhookScheduleMs: z.string().transform((v, ctx) => {
    const ms = v.split(',').map((s) => s.trim()).filter(Boolean).map(Number);
    if (!ms.length || ms.some((n) => !Number.isInteger(n) || n < 0 || n > 7 * 86_400_000)) {
      ctx.addIssue({ code: 'custom', message: 'must be comma-separated waits in ms (integers, at most a week each)' });
      return z.NEVER;
    }
    return ms;
  }),
  /** One webhook POST's time limit. */
  webhookTimeoutMs: int(100, 600_000),
  /** How often finished jobs without a queued delivery are looked for, and how long after its finish a job's own worker has to queue it. */
  webhookSweepMs: int(50, 3_600_000),
  /** How often a worker adds its counters to the Redis totals `GET /metrics` reads. */
  metricsFlushMs: int(10, 600_000),
  /** The HTTP server (`stevedore server`, `npm start`). */
  httpHost: z.string().min(1),
  httpPort: int(0, 65535),
  /** Bearer token every route but GET /health requires; unset, the server listens on loopback only. */
  apiToken: z.string().min(16, 'must be at least 16 characters').optional(),
  /** Largest upload body (artifacts, session archives and files): 413 past it. */
  maxUploadBytes: int(1, Number.MAX_SAFE_INTEGER),
}).superRefine((c, ctx) => {
  if (c.webhookUrl && !c.webhookSecret) ctx.addIssue({ code: 'custom', path: ['webhookSecret'], message: 'is required when STEVEDORE_WEBHOOK_URL is set' });
  // Checked at start: on a cluster BullMQ would otherwise retry CROSSSLOT errors forever.
  if (c.redisClusterNodes && !hasHashTag(c.prefix)) {
    ctx.addIssue({ code: 'custom', path: ['prefix'], message: `"${c.prefix}" has no hash tag, and REDIS_CLUSTER_NODES is set: ${CLUSTER_PREFIX_REASON}` });
  }
});

export type Config = Readonly<z.infer<typeof Schema>>;

/** Environment to one frozen, validated Config. Throws one readable message naming every bad variable. */
export function loadConfig(env: NodeJS.ProcessEnv, cwd = process.cwd()): Config {
  const raw = {
    redisUrl: env.REDIS_URL || 'redis://127.0.0.1:6379',
    redisClusterNodes: env.REDIS_CLUSTER_NODES,
    queue: env.STEVEDORE_QUEUE || 'stevedore',
    prefix: env.STEVEDORE_PREFIX || 'bull',
    concurrency: env.STEVEDORE_CONCURRENCY || defaultConcurrency(),
    backends: env.STEVEDORE_BACKENDS || DEFAULT_BACKENDS,
    stagingDir: resolve(cwd, env.STEVEDORE_STAGING_DIR || './data/staging'),
    maxInlineBytes: env.STEVEDORE_MAX_INLINE_BYTES || 1 << 20,
    shutdownTimeoutMs: env.STEVEDORE_SHUTDOWN_TIMEOUT_MS || 30_000,
    lockDurationMs: env.STEVEDORE_LOCK_DURATION_MS || 30_000,
    stalledIntervalMs: env.STEVEDORE_STALLED_INTERVAL_MS || 30_000,
    sweepAfterMs: env.STEVEDORE_SWEEP_AFTER_MS || 3_600_000,
    migrateRecordsDays: env.STEVEDORE_MIGRATE_RECORDS_DAYS || 30,
    workerName: env.STEVEDORE_WORKER_NAME || `${hostname()}-${process.pid}`,
    logLevel: env.LOG_LEVEL || 'info',
    keepCompleted: env.STEVEDORE_KEEP_COMPLETED || DEFAULT_RETENTION.keepCompleted,
    keepFailed: env.STEVEDORE_KEEP_FAILED || DEFAULT_RETENTION.keepFailed,
    fanoutChunkKeys: env.STEVEDORE_CHUNK_KEYS || DEFAULT_FANOUT_LIMITS.chunkKeys,
    fanoutChunkBytes: env.STEVEDORE_CHUNK_BYTES || DEFAULT_FANOUT_LIMITS.chunkBytes,
    fanoutWindow: env.STEVEDORE_CHUNK_WINDOW || DEFAULT_FANOUT_LIMITS.window,
    fanoutLanes: env.STEVEDORE_CHUNK_LANES || DEFAULT_FANOUT_LIMITS.lanes,
    webhookUrl: env.STEVEDORE_WEBHOOK_URL,
    webhookSecret: env.STEVEDORE_WEBHOOK_SECRET,
    webhookScheduleMs: env.STEVEDORE_WEBHOOK_SCHEDULE_MS || DEFAULT_WEBHOOK_SCHEDULE_MS.join(','),
    webhookTimeoutMs: env.STEVEDORE_WEBHOOK_TIMEOUT_MS || 15_000,
    webhookSweepMs: env.STEVEDORE_WEBHOOK_SWEEP_MS || 5_000,
    metricsFlushMs: env.STEVEDORE_METRICS_FLUSH_MS || 1_000,
    httpHost: env.STEVEDORE_HTTP_HOST || '127.0.0.1',
    httpPort: env.STEVEDORE_HTTP_PORT || 8080,
    apiToken: env.STEVEDORE_API_TOKEN || undefined,
    maxUploadBytes: env.STEVEDORE_MAX_UPLOAD_BYTES || 10 * 1024 ** 3,
  };
  const parsed = Schema.safeParse(raw);
  if (!parsed.success) {
    const names: Record<string, string> = {
      redisUrl: 'REDIS_URL', redisClusterNodes: 'REDIS_CLUSTER_NODES', queue: 'STEVEDORE_QUEUE', prefix: 'STEVEDORE_PREFIX', concurrency: 'STEVEDORE_CONCURRENCY',
      backends: 'STEVEDORE_BACKENDS', stagingDir: 'STEVEDORE_STAGING_DIR', maxInlineBytes: 'STEVEDORE_MAX_INLINE_BYTES',
      shutdownTimeoutMs: 'STEVEDORE_SHUTDOWN_TIMEOUT_MS', lockDurationMs: 'STEVEDORE_LOCK_DURATION_MS', stalledIntervalMs: 'STEVEDORE_STALLED_INTERVAL_MS', sweepAfterMs: 'STEVEDORE_SWEEP_AFTER_MS',
      migrateRecordsDays: 'STEVEDORE_MIGRATE_RECORDS_DAYS',
      workerName: 'STEVEDORE_WORKER_NAME', logLevel: 'LOG_LEVEL', keepCompleted: 'STEVEDORE_KEEP_COMPLETED', keepFailed: 'STEVEDORE_KEEP_FAILED',
      fanoutChunkKeys: 'STEVEDORE_CHUNK_KEYS', fanoutChunkBytes: 'STEVEDORE_CHUNK_BYTES', fanoutWindow: 'STEVEDORE_CHUNK_WINDOW', fanoutLanes: 'STEVEDORE_CHUNK_LANES',
      webhookUrl: 'STEVEDORE_WEBHOOK_URL', webhookSecret: 'STEVEDORE_WEBHOOK_SECRET', webhookScheduleMs: 'STEVEDORE_WEBHOOK_SCHEDULE_MS',
      webhookTimeoutMs: 'STEVEDORE_WEBHOOK_TIMEOUT_MS', webhookSweepMs: 'STEVEDORE_WEBHOOK_SWEEP_MS', metricsFlushMs: 'STEVEDORE_METRICS_FLUSH_MS',
      httpHost: 'STEVEDORE_HTTP_HOST', httpPort: 'STEVEDORE_HTTP_PORT', apiToken: 'STEVEDORE_API_TOKEN', maxUploadBytes: 'STEVEDORE_MAX_UPLOAD_BYTES',
    };
    const lines = parsed.error.issues.map((i) => `  ${names[String(i.path[0])] ?? String(i.path[0])}: ${i.message}`);
    throw new Error(`invalid configuration:\n${lines.join('\n')}`);
  }
  return Object.freeze(parsed.data);
}

/** The Redis a process connects to: the cluster when REDIS_CLUSTER_NODES is set, else REDIS_URL. */
export function redisTarget(c: Config): RedisTarget {
  return c.redisClusterNodes ? { cluster: c.redisClusterNodes } : { url: c.redisUrl };
}
