import { describe, expect, it } from 'vitest';
import { defaultConcurrency, loadConfig } from '../src/config.js';

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
});
