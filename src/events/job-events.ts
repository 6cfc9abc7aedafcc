import type { RedisClient } from '../queue/connection.js';

/** The contract's event kinds on `GET /events` (and what webhooks report, minus progress). */
export type JobEventKind = 'completed' | 'failed' | 'progress';
const KINDS = new Set<string>(['completed', 'failed', 'progress']);

/** One BullMQ events-stream entry that the contract reports, with the job's type looked up. */
export interface JobEvent {
  /** The stream id: what `Last-Event-ID` resumes from. */
  id: string;
  event: JobEventKind;
  data: { jobId: string; type: string | null; result?: unknown; failedReason?: string; progress?: unknown };
}

/** A raw XRANGE / XREAD entry: [id, [field, value, field, value...]]. */
export type StreamEntry = [id: string, fields: string[]];

/** Orders two stream ids (`<ms>-<seq>`) numerically; ids are compared as BigInts so no precision is lost. */
export function compareStreamIds(a: string, b: string): number {
  const [am = '0', as = '0'] = a.split('-');
  const [bm = '0', bs = '0'] = b.split('-');
  const d = BigInt(am) - BigInt(bm) || BigInt(as) - BigInt(bs);
  return d < 0n ? -1 : d > 0n ? 1 : 0;
}

export const STREAM_ID = /^\d{1,20}-\d{1,20}$/;

function parseJson(s: string | undefined): unknown {
  if (s === undefined) return undefined;
  try {
    return JSON.parse(s) as unknown;
  } catch {
    return s;
  }
}

/**
 * BullMQ's events carry the job id, not its name (its type): the name is read from the job's hash
 * once per job and kept in a small LRU, shared by every client of this process. A job already
 * removed (a producer's `removeOnComplete: true`) has no hash left: its type is then `null`.
 */
export class JobTypes {
  private readonly cache = new Map<string, string | null>();
  constructor(private readonly redis: RedisClient, private readonly jobKey: (id: string) => string, private readonly max = 10_000) {}

  /** Types of these job ids, one pipelined round trip for the ones not cached. */
  async lookup(ids: Iterable<string>): Promise<Map<string, string | null>> {
    const out = new Map<string, string | null>();
    const missing: string[] = [];
    for (const id of ids) {
      if (out.has(id)) continue;
      const hit = this.cache.get(id);
      if (hit !== undefined) out.set(id, hit);
      else if (!missing.includes(id)) missing.push(id);
    }
    if (missing.length) {
      const pipe = this.redis.pipeline();
      for (const id of missing) pipe.hget(this.jobKey(id), 'name');
      const replies = (await pipe.exec()) ?? [];
      missing.forEach((id, i) => {
        const [err, name] = replies[i] ?? [null, null];
        const type = err ? null : (name as string | null);
        out.set(id, type);
        // A missing hash is not cached: the event may be read before the job is (never, for BullMQ's
        // own order, but a replica's view may lag); a found name never changes.
        if (type !== null) this.remember(id, type);
      });
    }
    return out;
  }

  private remember(id: string, type: string): void {
    if (this.cache.size >= this.max) this.cache.delete(this.cache.keys().next().value!);
    this.cache.set(id, type);
  }
}

/** The contract's events among raw entries, in stream order, each with its job's type. */
export async function toJobEvents(entries: StreamEntry[], types: JobTypes): Promise<JobEvent[]> {
  const picked: Array<{ id: string; f: Record<string, string> }> = [];
  for (const [id, fields] of entries) {
    const f: Record<string, string> = {};
    for (let i = 0; i + 1 < fields.length; i += 2) f[fields[i]!] = fields[i + 1]!;
    if (f.event && KINDS.has(f.event) && f.jobId) picked.push({ id, f });
  }
  if (!picked.length) return [];
  const names = await types.lookup(picked.map((p) => p.f.jobId!));
  return picked.map(({ id, f }) => {
    const base = { jobId: f.jobId!, type: names.get(f.jobId!) ?? null };
    const event = f.event as JobEventKind;
    const data = event === 'completed' ? { ...base, result: parseJson(f.returnvalue) }
      : event === 'failed' ? { ...base, failedReason: f.failedReason ?? '' }
        : { ...base, progress: parseJson(f.data) };
    return { id, event, data };
  });
}
