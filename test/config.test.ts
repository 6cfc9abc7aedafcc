import { describe, expect, it } from 'vitest';
import { defaultConcurrency, loadConfig, redisTarget } from '../src/config.js';

describe('configuration from the environment', () => {
  it('has the contract defaults', () => {
    const c = loadConfig({}, '/srv');
    expect(c).toMatchObject({
      redisUrl: 'redis://127.0.0.1:6379', queue: 'stevedore', prefix: 'bull',
      backends: 'default=file:./data/objects', stagingDir: '/srv/data/staging', concurrency: defaultConcurrency(),
    });
    expect(Object.isFrozen(c)).toBe(true);
  });

  it('reads every variable', () => {
    const c = loadConfig({ REDIS_URL: 'redis://:pw@h:1', STEVEDORE_QUEUE: 'q', STEVEDORE_PREFIX: '{stevedore}', STEVEDORE_CONCURRENCY: '3', STEVEDORE_STAGING_DIR: 'st' }, '/w');
    expect(c).toMatchObject({ redisUrl: 'redis://:pw@h:1', queue: 'q', prefix: '{stevedore}', concurrency: 3, stagingDir: '/w/st' });
  });

  it('names every bad variable in one readable message', () => {
    expect(() => loadConfig({ REDIS_URL: 'http://x', STEVEDORE_CONCURRENCY: 'lots' })).toThrow(/REDIS_URL: .*\n\s+STEVEDORE_CONCURRENCY: /);
  });

  it('keeps 10,000 completed and 10,000 failed jobs unless told otherwise', () => {
    expect(loadConfig({})).toMatchObject({ keepCompleted: 10_000, keepFailed: 10_000 });
    expect(loadConfig({ STEVEDORE_KEEP_COMPLETED: '5', STEVEDORE_KEEP_FAILED: '0' })).toMatchObject({ keepCompleted: 5, keepFailed: 0 });
    expect(() => loadConfig({ STEVEDORE_KEEP_COMPLETED: '-1', STEVEDORE_KEEP_FAILED: 'x' })).toThrow(/STEVEDORE_KEEP_COMPLETED: .*\n\s+STEVEDORE_KEEP_FAILED: /);
  });

  it('keeps migration records 30 days unless told otherwise, and refuses a count of days that is not 1 to 36500', () => {
    expect(loadConfig({}).migrateRecordsDays).toBe(30);
    expect(loadConfig({ STEVEDORE_MIGRATE_RECORDS_DAYS: '7' }).migrateRecordsDays).toBe(7);
    for (const bad of ['0', 'x', '36501', '1.5']) {
      expect(() => loadConfig({ STEVEDORE_MIGRATE_RECORDS_DAYS: bad }), bad).toThrow(/invalid configuration:\n\s+STEVEDORE_MIGRATE_RECORDS_DAYS: /);
    }
  });

  it('connects to a Redis Cluster through REDIS_CLUSTER_NODES instead of REDIS_URL', () => {
    const c = loadConfig({ REDIS_URL: 'redis://ignored:1', REDIS_CLUSTER_NODES: '10.0.0.1:7000, redis://:pw@10.0.0.2:7001,rediss://h3', STEVEDORE_PREFIX: '{stevedore}' });
    expect(redisTarget(c)).toEqual({ cluster: [
      { host: '10.0.0.1', port: 7000 }, { host: '10.0.0.2', port: 7001, password: 'pw' }, { host: 'h3', port: 6379, tls: true },
    ] });
    expect(redisTarget(loadConfig({ REDIS_URL: 'redis://h:1' }))).toEqual({ url: 'redis://h:1' });
    expect(() => loadConfig({ REDIS_CLUSTER_NODES: 'a:b', STEVEDORE_PREFIX: '{s}' })).toThrow(/REDIS_CLUSTER_NODES: must be comma-separated host:port/);
  });

  it('refuses a prefix without a hash tag on a cluster, saying why', () => {
    for (const prefix of ['bull', '{}x', '{open', 'x}{']) {
      expect(() => loadConfig({ REDIS_CLUSTER_NODES: '127.0.0.1:7000', STEVEDORE_PREFIX: prefix })).toThrow(/STEVEDORE_PREFIX: .*has no hash tag.*CROSSSLOT/);
    }
    expect(() => loadConfig({ REDIS_CLUSTER_NODES: '127.0.0.1:7000' })).toThrow(/STEVEDORE_PREFIX: "bull" has no hash tag/);
    for (const prefix of ['{stevedore}', 'pre{x}', '{a}:b']) expect(loadConfig({ REDIS_CLUSTER_NODES: '127.0.0.1:7000', STEVEDORE_PREFIX: prefix }).prefix).toBe(prefix);
    // Without a cluster any prefix goes.
    expect(loadConfig({ STEVEDORE_PREFIX: 'bull' }).prefix).toBe('bull');
  });
});
