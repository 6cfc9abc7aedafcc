/**
 * The Standard Webhooks retry schedule: the first attempt at once, then 5 s, 5 min, 30 min, 2 h,
 * 5 h, 10 h and 10 h after the previous one (about 28 hours in all). Entry `n` is the wait before
 * attempt `n + 1`.
 */
export const DEFAULT_WEBHOOK_SCHEDULE_MS: readonly number[] = Object.freeze([0, 5_000, 300_000, 1_800_000, 7_200_000, 18_000_000, 36_000_000, 36_000_000]);

/** The longest `retry-after` honoured: a receiver cannot park a delivery for longer than a day. */
const MAX_RETRY_AFTER_MS = 86_400_000;

/**
 * `retry-after` in ms: delta-seconds or an HTTP date; undefined when absent or unreadable. Capped
 * at a day.
 */
export function parseRetryAfter(value: string | null, now = Date.now()): number | undefined {
  if (!value) return undefined;
  const v = value.trim();
  const ms = /^\d+$/.test(v) ? Number(v) * 1000 : Date.parse(v) - now;
  if (!Number.isFinite(ms)) return undefined;
  return Math.min(MAX_RETRY_AFTER_MS, Math.max(0, ms));
}

/**
 * The wait before the next attempt, after `attemptsMade` attempts: the schedule's, or the
 * receiver's `retry-after` when that asks for longer (a receiver may slow deliveries down, never
 * speed them up past the schedule).
 */
export function nextDelay(schedule: readonly number[], attemptsMade: number, retryAfterMs?: number): number {
  const scheduled = schedule[Math.min(attemptsMade, schedule.length - 1)] ?? 0;
  return Math.max(scheduled, retryAfterMs ?? 0);
}
