import { randomBytes } from 'node:crypto';
import { ErrorCode, StorageError } from '../errors.js';
import type { GroupCommit, GroupHolder, GroupMember, Lease } from '../payload.js';
import type { LockRedis, RedisLocks } from './lock.js';
import { sleep } from './lock.js';

/**
 * Group commit across worker processes, in Redis beside the lock it serves. Per group
 * (`<prefix>:<queue>:group:<name>:…`, so in the queue's cluster slot like the lock):
 *   queue      zset   member id -> score (its arrival): every member until it is finished or gone;
 *                     the one order the group's work is taken and applied in
 *   data       hash   member id -> its work (JSON)
 *   claims     hash   member id -> token of the holder that took it
 *   sealed     hash   member id -> token: sealed into that holder's commit, it can no longer withdraw
 *   withdrawn  hash   member id -> 1: withdrew while claimed; the holder drops it
 *   alive      zset   member id -> when it last polled (Redis time, ms): a member that stops
 *                     polling (its worker died) is dropped, never applied for a job nobody waits for
 *   outcome:<id>      string, the member's outcome, kept OUTCOME_TTL_MS
 * A claim or a seal naming a token the lock no longer holds is an orphan (its holder died or lost
 * the lock): the next holder takes orphans first. A member sealed by such a holder may have been
 * committed: it is "unsure" and stays in the group until a holder settles it (the caller knows
 * how: repack-session finds the job's mark in the archive's metadata, and a batch's marks never
 * push out the previous batch's).
 */

/** How long an outcome waits for its job to read it (a job polls every POLL_MAX_MS at most, or is redelivered). */
const OUTCOME_TTL_MS = 15 * 60_000;
/** Bound on how long an idle group's keys stay: refreshed by every poll and by the holder's lock renewals. */
const GROUP_TTL_MS = 15 * 60_000;
const POLL_MIN_MS = 5;
/** Longest pause between a waiting member's polls (each is one Lua call, plus a SET NX while unclaimed). */
const POLL_MAX_MS = 250;

/** Redis time in ms, inside a script (Redis 5+ replicates scripts by effects, so TIME is allowed). */
const NOW = `local t = redis.call('time'); local now = t[1] * 1000 + math.floor(t[2] / 1000)`;

/** Every script's KEYS: lock queue data claims sealed withdrawn alive, then outcome keys. `forget` takes a member out of all. */
const FORGET = `local function forget(id)
  redis.call('zrem', KEYS[2], id)
  for k = 3, 6 do redis.call('hdel', KEYS[k], id) end
  redis.call('zrem', KEYS[7], id)
end`;

/** A member's poll. ARGV id score data ttl. */
const ENTER = `
local out = redis.call('get', KEYS[8])
if out then return {'outcome', out} end
${NOW}
redis.call('zadd', KEYS[7], now, ARGV[1])
local by = redis.call('hget', KEYS[4], ARGV[1])
local held = by and by == redis.call('get', KEYS[1])
if not redis.call('zscore', KEYS[2], ARGV[1]) then
  redis.call('hdel', KEYS[4], ARGV[1])
  redis.call('hdel', KEYS[6], ARGV[1])
  redis.call('zadd', KEYS[2], ARGV[2], ARGV[1])
  redis.call('hset', KEYS[3], ARGV[1], ARGV[3])
  held = false
end
for i = 2, 7 do redis.call('pexpire', KEYS[i], ARGV[4]) end
if held then return {'claimed'} end
return {'queued'}`;

/**
 * The holder takes work: its own member (re-queued if it is gone), orphans first, then a strict
 * prefix of the queue; members that withdrew or stopped polling are dropped. Returned in queue
 * order as id score data unsure. ARGV token max ttl liveMs selfId selfScore selfData.
 */
const CLAIM = `
${FORGET}
if redis.call('get', KEYS[1]) ~= ARGV[1] then return false end
local self = ARGV[5]
local out = redis.call('get', KEYS[8])
if out then return {'outcome', out} end
${NOW}
redis.call('zadd', KEYS[7], now, self)
redis.call('hdel', KEYS[6], self)
redis.call('hset', KEYS[3], self, ARGV[7])
if not redis.call('zscore', KEYS[2], self) then
  redis.call('hdel', KEYS[4], self)
  redis.call('zadd', KEYS[2], ARGV[6], self)
end
local max = tonumber(ARGV[2])
local ids = redis.call('zrange', KEYS[2], 0, -1, 'WITHSCORES')
local kind = {}
local orphans = 0
for i = 1, #ids, 2 do
  local id = ids[i]
  local by = redis.call('hget', KEYS[4], id)
  local sealed = redis.call('hget', KEYS[5], id)
  local seen = tonumber(redis.call('zscore', KEYS[7], id) or '0')
  if redis.call('hexists', KEYS[3], id) == 0 or redis.call('hexists', KEYS[6], id) == 1 or (not sealed and id ~= self and seen < now - tonumber(ARGV[4])) then
    forget(id)
    kind[id] = 'drop'
  elseif sealed or (by and by ~= ARGV[1]) then
    if orphans < max then kind[id] = 'orphan'; orphans = orphans + 1 else kind[id] = 'later' end
  end
end
local taken = orphans
for i = 1, #ids, 2 do
  if taken >= max then break end
  if kind[ids[i]] == nil then kind[ids[i]] = 'fresh'; taken = taken + 1 end
end
local got = {}
for i = 1, #ids, 2 do
  local id = ids[i]
  if kind[id] == 'orphan' or kind[id] == 'fresh' then
    redis.call('hset', KEYS[4], id, ARGV[1])
    table.insert(got, id)
    table.insert(got, ids[i + 1])
    table.insert(got, redis.call('hget', KEYS[3], id))
    table.insert(got, redis.call('hexists', KEYS[5], id) == 1 and '1' or '')
  end
end
for i = 2, 7 do redis.call('pexpire', KEYS[i], ARGV[3]) end
return {'members', got}`;

/**
 * Right before a commit: the members that can no longer come (their claim is not this holder's,
 * they withdrew, or they stopped polling; an unsure member is never judged by its polls) are
 * returned and those of this holder's claims dropped; when none, all are sealed.
 * ARGV token ttl liveMs selfId ids...
 */
const SEAL = `
${FORGET}
if redis.call('get', KEYS[1]) ~= ARGV[1] then return false end
${NOW}
local gone = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local seen = tonumber(redis.call('zscore', KEYS[7], id) or '0')
  local stale = id ~= ARGV[4] and not redis.call('hget', KEYS[5], id) and seen < now - tonumber(ARGV[3])
  if redis.call('hget', KEYS[4], id) ~= ARGV[1] or redis.call('hexists', KEYS[6], id) == 1 or stale then table.insert(gone, id) end
end
if #gone > 0 then
  for _, id in ipairs(gone) do
    if redis.call('hget', KEYS[4], id) == ARGV[1] then
      forget(id)
    end
  end
  return gone
end
for i = 5, #ARGV do redis.call('hset', KEYS[5], ARGV[i], ARGV[1]) end
redis.call('pexpire', KEYS[5], ARGV[2])
return {}`;

/** KEYS sealed; ARGV token ids... */
const UNSEAL = `
for i = 2, #ARGV do
  if redis.call('hget', KEYS[1], ARGV[i]) == ARGV[1] then redis.call('hdel', KEYS[1], ARGV[i]) end
end
return 1`;

/** A member withdrawing (its job was cancelled or stopped). ARGV id ttl. */
const WITHDRAW = `
${FORGET}
local out = redis.call('get', KEYS[8])
if out then return {'outcome', out} end
local live = redis.call('get', KEYS[1])
local sealed = redis.call('hget', KEYS[5], ARGV[1])
if sealed then
  if sealed == live then return {'sealed'} end
  return {'unsure'}
end
local by = redis.call('hget', KEYS[4], ARGV[1])
if by and by == live then
  redis.call('hset', KEYS[6], ARGV[1], '1')
  redis.call('pexpire', KEYS[6], ARGV[2])
  return {'withdrawn'}
end
forget(ARGV[1])
return {'withdrawn'}`;

/** ARGV ttl (id outcome)...; an empty outcome records none. KEYS 8... the outcomes' keys. */
const FINISH = `
${FORGET}
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  if ARGV[i + 1] ~= '' then redis.call('set', KEYS[7 + i / 2], ARGV[i + 1], 'PX', ARGV[1]) end
  forget(id)
end
return 1`;

/** Members go back to waiting (they stay in the queue, in place); one that withdrew goes. ARGV token ids... */
const GIVE_BACK = `
${FORGET}
for i = 2, #ARGV do
  local id = ARGV[i]
  if redis.call('hget', KEYS[4], id) == ARGV[1] then
    if redis.call('hexists', KEYS[6], id) == 1 then
      forget(id)
    else
      redis.call('hdel', KEYS[4], id)
    end
  end
end
return 1`;

/** Members sealed by a holder that no longer has the lock (it died or lost it: they may be committed). KEYS as every script's. */
const SEALED_ORPHANS = `
local live = redis.call('get', KEYS[1])
local out = {}
local all = redis.call('hgetall', KEYS[5])
for i = 1, #all, 2 do if all[i + 1] ~= live then table.insert(out, all[i]) end end
return out`;

interface Keys {
  /** lock queue data claims sealed withdrawn alive: every script's first keys. */
  all: string[];
  outcome(id: string): string;
}

export interface GroupCommitOptions {
  prefix: string;
  queue: string;
  /** How long a member waits unclaimed for a busy lock before failing Transient. */
  waitMs: number;
  /** The lock's TTL: also how long a member may go without polling before it counts as gone. */
  ttlMs: number;
  /** Bounds one Redis call (the locks' own bound). */
  call<T>(p: Promise<T>): Promise<T>;
}

type State = [string, string?] | undefined;

export class RedisGroupCommit implements GroupCommit {
  constructor(private readonly redis: LockRedis, private readonly locks: RedisLocks, readonly opts: GroupCommitOptions) {}

  private keys(lock: string, group: string): Keys {
    const base = `${this.opts.prefix}:${this.opts.queue}:group:${group}`;
    return {
      all: [this.locks.key(lock), ...['queue', 'data', 'claims', 'sealed', 'withdrawn', 'alive'].map((s) => `${base}:${s}`)],
      outcome: (id) => `${base}:outcome:${id}`,
    };
  }

  /** @internal for Holder */
  run(src: string, keys: string[], args: Array<string | number>): Promise<unknown> {
    return this.opts.call(this.redis.eval(src, keys.length, ...keys, ...args.map(String)));
  }

  async join(lock: string, group: string, member: GroupMember, signal: AbortSignal): Promise<{ outcome: string } | { holder: GroupHolder }> {
    const k = this.keys(lock, group);
    const keys = [...k.all, k.outcome(member.id)];
    const token = randomBytes(16).toString('hex');
    let deadline = Date.now() + this.opts.waitMs;
    for (let delay = POLL_MIN_MS; ; delay = Math.min(delay * 2, POLL_MAX_MS)) {
      if (signal.aborted) {
        const ended = await this.withdraw(keys, member.id);
        if (ended) return ended;
        throw new StorageError(ErrorCode.Transient, `waiting for lock ${lock} aborted`, { op: 'lock', cause: signal.reason });
      }
      // A Redis call that fails counts as "still waiting": the deadline bounds it.
      const state = await this.run(ENTER, keys, [member.id, member.score, member.data, GROUP_TTL_MS]).catch(() => undefined) as State;
      if (state?.[0] === 'outcome') return { outcome: state[1]! };
      if (state?.[0] === 'claimed') deadline = Date.now() + this.opts.waitMs;
      if (state?.[0] === 'queued') {
        // While it holds the lock, its renewals keep the group's keys too (a batch may outlast their TTL).
        const got = await this.locks.tryAcquire(lock, token, { keys: k.all.slice(1), ttlMs: GROUP_TTL_MS });
        if (got) return { holder: new Holder(this, k, lock, member, got.lease, got.token) };
      }
      if (Date.now() > deadline) {
        const ended = await this.withdraw(keys, member.id);
        if (ended) return ended;
        throw new StorageError(ErrorCode.Transient, `lock ${lock} still busy after ${this.opts.waitMs} ms`, { op: 'lock' });
      }
      await sleep(POLL_MIN_MS + Math.random() * delay, signal);
    }
  }

  async forget(lock: string, group: string, id: string, outcome = ''): Promise<void> {
    const k = this.keys(lock, group);
    await this.run(FINISH, [...k.all, k.outcome(id)], [OUTCOME_TTL_MS, id, outcome]);
  }

  async sealedOrphans(lock: string, group: string): Promise<string[]> {
    return await this.run(SEALED_ORPHANS, this.keys(lock, group).all, []) as string[];
  }

  /**
   * Takes the member out of the group. One sealed into the commit of a live holder waits for its
   * outcome as long as that holder keeps the lock (its renewals are the liveness); one sealed by a
   * holder that went away may have been committed, so it stays for the next holder to settle and
   * the job fails Transient (retried, it finds its outcome or its edit).
   */
  private async withdraw(keys: string[], id: string): Promise<{ outcome: string } | undefined> {
    // Bounds only a Redis that does not answer.
    let deadline = Date.now() + this.opts.waitMs + this.opts.ttlMs;
    for (;;) {
      const state = await this.run(WITHDRAW, keys, [id, GROUP_TTL_MS]).catch(() => undefined) as State;
      if (state?.[0] === 'outcome') return { outcome: state[1]! };
      if (state?.[0] === 'withdrawn') return undefined;
      if (state?.[0] === 'unsure') throw new SealedUnsure();
      if (state?.[0] === 'sealed') deadline = Date.now() + this.opts.waitMs + this.opts.ttlMs;
      else if (Date.now() > deadline) return undefined;
      await new Promise((r) => setTimeout(r, POLL_MAX_MS));
    }
  }
}

/**
 * A withdrawing member sealed by a holder that went away: it may have been committed. The job
 * must not end as cancelled while a later holder could still apply it: it settles itself under
 * the lock (GroupCommit.forget) or stays Transient.
 */
export class SealedUnsure extends StorageError {
  constructor() {
    super(ErrorCode.Transient, 'the holder that sealed this job into its commit went away: whether it committed is settled by the next holder', { op: 'lock' });
  }
}

class Holder implements GroupHolder {
  constructor(private readonly g: RedisGroupCommit, private readonly k: Keys, private readonly lock: string, private readonly self: GroupMember, readonly lease: Lease, private readonly token: string) {}

  async claim(max: number): Promise<{ outcome: string } | { members: GroupMember[] }> {
    const s = this.self;
    const got = await this.g.run(CLAIM, [...this.k.all, this.k.outcome(s.id)], [this.token, max, GROUP_TTL_MS, this.g.opts.ttlMs, s.id, s.score, s.data]) as [string, string | string[]] | null;
    if (!got) throw this.lost();
    if (got[0] === 'outcome') return { outcome: got[1] as string };
    const list = got[1] as string[];
    const members: GroupMember[] = [];
    for (let i = 0; i < list.length; i += 4) members.push({ id: list[i]!, score: Number(list[i + 1]), data: list[i + 2]!, ...(list[i + 3] ? { unsure: true } : {}) });
    return { members };
  }

  async seal(ids: readonly string[]): Promise<string[]> {
    const gone = await this.g.run(SEAL, this.k.all, [this.token, GROUP_TTL_MS, this.g.opts.ttlMs, this.self.id, ...ids]) as string[] | null;
    if (!gone) throw this.lost();
    return gone;
  }

  async unseal(ids: readonly string[]): Promise<void> {
    if (ids.length) await this.g.run(UNSEAL, [this.k.all[4]!], [this.token, ...ids]);
  }

  async finish(outcomes: ReadonlyMap<string, string>): Promise<void> {
    if (outcomes.size === 0) return;
    const ids = [...outcomes.keys()];
    await this.g.run(FINISH, [...this.k.all, ...ids.map(this.k.outcome)], [OUTCOME_TTL_MS, ...ids.flatMap((id) => [id, outcomes.get(id)!])]);
  }

  async giveBack(ids: readonly string[]): Promise<void> {
    if (ids.length) await this.g.run(GIVE_BACK, this.k.all, [this.token, ...ids]);
  }

  /** The lock found another token: what the lease reports once its renewal sees that too. */
  private lost(): StorageError {
    return this.lease.signal.aborted && this.lease.signal.reason instanceof StorageError
      ? this.lease.signal.reason
      : new StorageError(ErrorCode.Transient, `lock ${JSON.stringify(this.lock)} lost: another holder has it`);
  }
}
