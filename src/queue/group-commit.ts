import { randomBytes } from 'node:crypto';
import { ErrorCode, StorageError } from '../errors.js';
import type { GroupCommit, GroupHolder, GroupMember, Lease } from '../payload.js';
import type { LockRedis, RedisLocks } from './lock.js';
import { sleep } from './lock.js';

/**
 * Group commit across worker processes, in Redis beside the lock it serves. Per group
 * (`<prefix>:<queue>:group:<name>:…`, so in the queue's cluster slot like the lock):
 *   queue      zset   member id -> score: work waiting for a holder
 *   data       hash   member id -> its work (JSON)
 *   claims     hash   member id -> token of the holder that took it
 *   sealed     hash   member id -> token: sealed into that holder's commit, it can no longer withdraw
 *   withdrawn  hash   member id -> 1: withdrew while claimed; the holder drops it at its seal
 *   outcome:<id>      string, the member's outcome, kept OUTCOME_TTL_MS
 * A member claimed by a holder that no longer has the lock (it died, or lost it) goes back to the
 * queue on its next poll, so work is never stranded with a dead holder; work done twice that way
 * is the caller's to recognise (repack-session: the job marks in the archive's metadata).
 */

/** How long an outcome waits for its job to read it (a job polls every POLL_MAX_MS at most, or is redelivered). */
const OUTCOME_TTL_MS = 15 * 60_000;
/** Bound on how long an idle group's keys stay: refreshed on every write. */
const GROUP_TTL_MS = 15 * 60_000;
const POLL_MIN_MS = 5;
const POLL_MAX_MS = 100;

/** KEYS lock queue data claims sealed withdrawn outcome; ARGV id score data ttl. */
const ENTER = `
local out = redis.call('get', KEYS[7])
if out then return {'outcome', out} end
if redis.call('zscore', KEYS[2], ARGV[1]) then return {'queued'} end
local by = redis.call('hget', KEYS[4], ARGV[1])
if by and redis.call('get', KEYS[1]) == by then return {'claimed'} end
redis.call('hdel', KEYS[4], ARGV[1])
redis.call('hdel', KEYS[5], ARGV[1])
redis.call('hdel', KEYS[6], ARGV[1])
redis.call('zadd', KEYS[2], ARGV[2], ARGV[1])
redis.call('hset', KEYS[3], ARGV[1], ARGV[3])
for i = 2, 4 do redis.call('pexpire', KEYS[i], ARGV[4]) end
return {'queued'}`;

/** KEYS lock queue data claims sealed withdrawn; ARGV token max ttl. */
const CLAIM = `
if redis.call('get', KEYS[1]) ~= ARGV[1] then return false end
local ids = redis.call('zrange', KEYS[2], 0, tonumber(ARGV[2]) - 1, 'WITHSCORES')
local out = {}
for i = 1, #ids, 2 do
  local id = ids[i]
  local data = redis.call('hget', KEYS[3], id)
  redis.call('zrem', KEYS[2], id)
  redis.call('hdel', KEYS[5], id)
  redis.call('hdel', KEYS[6], id)
  if data then
    redis.call('hset', KEYS[4], id, ARGV[1])
    table.insert(out, id)
    table.insert(out, ids[i + 1])
    table.insert(out, data)
  end
end
redis.call('pexpire', KEYS[4], ARGV[3])
return out`;

/** KEYS lock data claims sealed withdrawn; ARGV token ttl ids... */
const SEAL = `
if redis.call('get', KEYS[1]) ~= ARGV[1] then return false end
local gone = {}
for i = 3, #ARGV do
  if redis.call('hget', KEYS[5], ARGV[i]) then table.insert(gone, ARGV[i]) end
end
if #gone > 0 then
  for _, id in ipairs(gone) do
    for k = 2, 5 do redis.call('hdel', KEYS[k], id) end
  end
  return gone
end
for i = 3, #ARGV do redis.call('hset', KEYS[4], ARGV[i], ARGV[1]) end
redis.call('pexpire', KEYS[4], ARGV[2])
return {}`;

/** KEYS sealed; ARGV token ids... */
const UNSEAL = `
for i = 2, #ARGV do
  if redis.call('hget', KEYS[1], ARGV[i]) == ARGV[1] then redis.call('hdel', KEYS[1], ARGV[i]) end
end
return 1`;

/** KEYS lock queue data claims sealed withdrawn outcome; ARGV id ttl. */
const WITHDRAW = `
local out = redis.call('get', KEYS[7])
if out then return {'outcome', out} end
if redis.call('zrem', KEYS[2], ARGV[1]) == 1 then
  redis.call('hdel', KEYS[3], ARGV[1])
  return {'withdrawn'}
end
local by = redis.call('hget', KEYS[4], ARGV[1])
if by and redis.call('get', KEYS[1]) == by then
  if redis.call('hget', KEYS[5], ARGV[1]) == by then return {'sealed'} end
  redis.call('hset', KEYS[6], ARGV[1], '1')
  redis.call('pexpire', KEYS[6], ARGV[2])
  return {'withdrawn'}
end
for k = 3, 6 do redis.call('hdel', KEYS[k], ARGV[1]) end
return {'withdrawn'}`;

/** KEYS queue data claims sealed withdrawn outcome...; ARGV ttl (id outcome)...; an empty outcome records none. */
const FINISH = `
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  if ARGV[i + 1] ~= '' then redis.call('set', KEYS[5 + i / 2], ARGV[i + 1], 'PX', ARGV[1]) end
  redis.call('zrem', KEYS[1], id)
  for k = 2, 5 do redis.call('hdel', KEYS[k], id) end
end
return 1`;

/** KEYS queue claims sealed; ARGV token ttl (id score)... (data stays in place) */
const GIVE_BACK = `
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('hget', KEYS[2], id) == ARGV[1] then
    redis.call('hdel', KEYS[2], id)
    redis.call('hdel', KEYS[3], id)
    redis.call('zadd', KEYS[1], ARGV[i + 1], id)
  end
end
redis.call('pexpire', KEYS[1], ARGV[2])
return 1`;

interface Keys {
  lock: string;
  queue: string;
  data: string;
  claims: string;
  sealed: string;
  withdrawn: string;
  outcome(id: string): string;
}

export interface GroupCommitOptions {
  prefix: string;
  queue: string;
  /** How long a member waits unclaimed for a busy lock before failing Transient. */
  waitMs: number;
  /** The lock's TTL: how long a sealed member waits for a holder that went quiet. */
  ttlMs: number;
  /** Bounds one Redis call (the locks' own bound). */
  call<T>(p: Promise<T>): Promise<T>;
}

export class RedisGroupCommit implements GroupCommit {
  constructor(private readonly redis: LockRedis, private readonly locks: RedisLocks, private readonly opts: GroupCommitOptions) {}

  private keys(lock: string, group: string): Keys {
    const base = `${this.opts.prefix}:${this.opts.queue}:group:${group}`;
    return {
      lock: this.locks.key(lock), queue: `${base}:queue`, data: `${base}:data`, claims: `${base}:claims`,
      sealed: `${base}:sealed`, withdrawn: `${base}:withdrawn`, outcome: (id) => `${base}:outcome:${id}`,
    };
  }

  private async script(src: string, keys: string[], args: Array<string | number>): Promise<unknown> {
    return this.opts.call(this.redis.eval(src, keys.length, ...keys, ...args.map(String)));
  }

  async join(lock: string, group: string, member: GroupMember, signal: AbortSignal): Promise<{ outcome: string } | { holder: GroupHolder }> {
    const k = this.keys(lock, group);
    const all = [k.lock, k.queue, k.data, k.claims, k.sealed, k.withdrawn, k.outcome(member.id)];
    const token = randomBytes(16).toString('hex');
    let deadline = Date.now() + this.opts.waitMs;
    for (let delay = POLL_MIN_MS; ; delay = Math.min(delay * 2, POLL_MAX_MS)) {
      if (signal.aborted) {
        const ended = await this.withdraw(all, member.id);
        if (ended) return ended;
        throw new StorageError(ErrorCode.Transient, `waiting for lock ${lock} aborted`, { op: 'lock', cause: signal.reason });
      }
      // A Redis call that fails counts as "still waiting": the deadline bounds it.
      const state = await this.script(ENTER, all, [member.id, member.score, member.data, GROUP_TTL_MS]).catch(() => undefined) as [string, string?] | undefined;
      if (state?.[0] === 'outcome') return { outcome: state[1]! };
      if (state?.[0] === 'claimed') deadline = Date.now() + this.opts.waitMs;
      if (state?.[0] === 'queued') {
        const got = await this.locks.tryAcquire(lock, token);
        if (got) return { holder: new Holder(this, k, got.lease, got.token) };
      }
      if (Date.now() > deadline) {
        const ended = await this.withdraw(all, member.id);
        if (ended) return ended;
        throw new StorageError(ErrorCode.Transient, `lock ${lock} still busy after ${this.opts.waitMs} ms`, { op: 'lock' });
      }
      await sleep(POLL_MIN_MS + Math.random() * delay, signal);
    }
  }

  /**
   * Takes the member out of the queue; one sealed into a commit waits for its outcome (bounded:
   * a holder that went quiet for a lock TTL has lost its lock, and the member is free again).
   */
  private async withdraw(all: string[], id: string): Promise<{ outcome: string } | undefined> {
    const deadline = Date.now() + this.opts.waitMs + this.opts.ttlMs;
    for (;;) {
      const state = await this.script(WITHDRAW, all, [id, GROUP_TTL_MS]).catch(() => undefined) as [string, string?] | undefined;
      if (state?.[0] === 'outcome') return { outcome: state[1]! };
      if (state?.[0] === 'withdrawn' || Date.now() > deadline) return undefined;
      await new Promise((r) => setTimeout(r, POLL_MAX_MS));
    }
  }

  /** @internal for Holder */
  run(src: string, keys: string[], args: Array<string | number>): Promise<unknown> {
    return this.script(src, keys, args);
  }
}

class Holder implements GroupHolder {
  constructor(private readonly g: RedisGroupCommit, private readonly k: Keys, readonly lease: Lease, private readonly token: string) {}

  async claim(max: number): Promise<GroupMember[]> {
    const k = this.k;
    const got = await this.g.run(CLAIM, [k.lock, k.queue, k.data, k.claims, k.sealed, k.withdrawn], [this.token, max, GROUP_TTL_MS]) as string[] | null;
    if (!got) throw this.lost();
    const out: GroupMember[] = [];
    for (let i = 0; i < got.length; i += 3) out.push({ id: got[i]!, score: Number(got[i + 1]), data: got[i + 2]! });
    return out;
  }

  async seal(ids: readonly string[]): Promise<string[]> {
    const k = this.k;
    const gone = await this.g.run(SEAL, [k.lock, k.data, k.claims, k.sealed, k.withdrawn], [this.token, GROUP_TTL_MS, ...ids]) as string[] | null;
    if (!gone) throw this.lost();
    return gone;
  }

  async unseal(ids: readonly string[]): Promise<void> {
    if (ids.length) await this.g.run(UNSEAL, [this.k.sealed], [this.token, ...ids]);
  }

  async finish(outcomes: ReadonlyMap<string, string>): Promise<void> {
    if (outcomes.size === 0) return;
    const k = this.k;
    const ids = [...outcomes.keys()];
    await this.g.run(FINISH, [k.queue, k.data, k.claims, k.sealed, k.withdrawn, ...ids.map(k.outcome)], [OUTCOME_TTL_MS, ...ids.flatMap((id) => [id, outcomes.get(id)!])]);
  }

  async giveBack(members: readonly GroupMember[]): Promise<void> {
    if (members.length === 0) return;
    const k = this.k;
    await this.g.run(GIVE_BACK, [k.queue, k.claims, k.sealed], [this.token, GROUP_TTL_MS, ...members.flatMap((m) => [m.id, m.score])]);
  }

  private lost(): StorageError {
    return this.lease.signal.aborted && this.lease.signal.reason instanceof StorageError
      ? this.lease.signal.reason
      : new StorageError(ErrorCode.Transient, 'the group\'s lock is no longer held by this job', { op: 'lock' });
  }
}
