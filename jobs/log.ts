import { z } from 'zod';
import { ErrorCode, StorageError } from '../src/errors.js';
import { BackendName, SiteId, type JobDeps } from '../src/payload.js';

const Word = z.string().min(1).max(128).regex(/^[\u0020-\u007e]+$/, 'must be printable ASCII');

export const LogPayload = z.strictObject({
  backend: BackendName,
  site: SiteId,
  build: SiteId,
  action: Word,
  status: Word,
  metadata: z.record(z.string(), z.unknown()).optional(),
  /** ISO 8601 or epoch milliseconds; defaults to when the job was enqueued, so a retry writes the same entry. */
  timestamp: z.union([z.string(), z.number()]).optional(),
});
export type LogPayload = z.infer<typeof LogPayload>;

export interface LogResult {
  key: string;
  timestamp: string;
}

/** The seed format: the one JSON object a log entry holds. */
export interface LogEntry {
  timestamp: string;
  build_id: string;
  site_id: string;
  action: string;
  status: string;
  metadata: Record<string, unknown>;
}

/** Longest JSON entry: log entries are small records, not log files. */
const MAX_ENTRY_BYTES = 256 * 1024;

/**
 * Writes one log entry as a single atomic object. Keys start with a fixed-width UTC ISO timestamp,
 * so they sort chronologically in every backend's listing order.
 */
export async function log(p: LogPayload, d: JobDeps): Promise<LogResult> {
  const timestamp = normalizeTimestamp(p.timestamp ?? d.enqueuedAt);
  const key = logKey(p.site, timestamp, p.build);
  const entry: LogEntry = { timestamp, build_id: p.build, site_id: p.site, action: p.action, status: p.status, metadata: p.metadata ?? {} };
  const bytes = Buffer.from(`${JSON.stringify(entry)}\n`);
  if (bytes.length > MAX_ENTRY_BYTES) {
    throw new StorageError(ErrorCode.InvalidInput, `metadata: entry of ${bytes.length} bytes is over ${MAX_ENTRY_BYTES}`, { op: 'log', key });
  }
  await d.bucket(p.backend).put(key, bytes, { contentType: 'application/json', signal: d.signal });
  d.log.info({ key }, 'logged');
  return { key, timestamp };
}

export function logKey(site: string, timestamp: string, build: string): string {
  return `sites/${site}/logs/${timestamp}-${build}.json`;
}

/** Fixed-width `YYYY-MM-DDTHH:mm:ss.sssZ`; years outside 0000-9999 would break the sort and are refused. */
export function normalizeTimestamp(t: string | number): string {
  const date = new Date(t);
  const year = date.getUTCFullYear();
  if (Number.isNaN(date.getTime()) || year < 1970 || year > 9999) {
    throw new StorageError(ErrorCode.InvalidInput, `timestamp: ${JSON.stringify(t)} is not a date between 1970 and 9999`, { op: 'log' });
  }
  return date.toISOString();
}
