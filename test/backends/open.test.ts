import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { FsDriver } from '../../src/backends/fs.js';
import { openBackend, openBackends } from '../../src/backends/open.js';
import { ErrorCode, StorageError } from '../../src/errors.js';

const codeOf = (p: Promise<unknown>): Promise<string> => p.then(() => 'ok', (err: unknown) => (err as StorageError).code);

describe('opening backends from STEVEDORE_BACKENDS', () => {
  it('defaults to a filesystem backend named default under ./data/objects', async () => {
    const buckets = await openBackends(undefined, { cwd: '/srv/app' });
    expect([...buckets.keys()]).toEqual(['default']);
    const b = buckets.get('default')!;
    expect(b.driver).toBeInstanceOf(FsDriver);
    expect((b.driver as FsDriver).root).toBe('/srv/app/data/objects');
  });

  it('resolves file:./relative against the working directory and file:///abs as is', async () => {
    expect(((await openBackend('x', 'file:./a b/c', { cwd: '/w' })).driver as FsDriver).root).toBe(join('/w', 'a b/c'));
    expect(((await openBackend('x', 'file:///var/lib/objects')).driver as FsDriver).root).toBe('/var/lib/objects');
  });

  it('reads several name=url pairs, with the URL path as a folder in the bucket', async () => {
    const buckets = await openBackends(
      'default=file:///data, art=s3://bucket/some/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1&forcePathStyle=true, logs=memory:',
      { cwd: '/' },
    );
    expect([...buckets.keys()]).toEqual(['default', 'art', 'logs']);
    expect(buckets.get('art')!.prefix).toBe('some/prefix/');
    expect(buckets.get('art')!.driver.kind).toBe('s3');
    expect(buckets.get('logs')!.driver.kind).toBe('memory');
  });

  it('refuses unknown schemes, duplicate names and malformed pairs with InvalidInput', async () => {
    expect(await codeOf(openBackends('a=ftp://x/y'))).toBe(ErrorCode.InvalidInput);
    expect(await codeOf(openBackends('a=memory:,a=memory:'))).toBe(ErrorCode.InvalidInput);
    expect(await codeOf(openBackends('just-a-url'))).toBe(ErrorCode.InvalidInput);
    expect(await codeOf(openBackends('a=s3:///no-bucket'))).toBe(ErrorCode.InvalidInput);
  });

  it('never echoes credentials pasted into a URL', async () => {
    const message = await openBackends('a=ftp://user:hunter2@host/x').then(() => '', (err: unknown) => (err as Error).message);
    expect(message).toMatch(/^InvalidInput: /);
    expect(message).not.toContain('hunter2');
  });
});
