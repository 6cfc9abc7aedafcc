import { ErrorCode, StorageError } from '../errors.js';

/**
 * Shared checks for a cloud backend URL (`s3://`, `gs://`, `azblob://`): the scheme, a bucket or
 * container name, no credentials, and typed query parameters. Every failure is InvalidInput naming
 * the URL's scheme and host only, never the rest (which could hold a pasted secret).
 */
export function backendUrl(url: URL, scheme: string, credentialsFrom: string) {
  const bad = (why: string) => new StorageError(ErrorCode.InvalidInput, `${scheme}//${url.hostname}: ${why}`, { op: 'config' });
  if (url.protocol !== scheme) throw bad(`not a ${scheme} URL (${url.protocol})`);
  if (!url.hostname) throw bad('missing bucket or container name');
  if (url.username || url.password) throw bad(`credentials do not belong in the URL; use ${credentialsFrom}`);
  return {
    bad,
    int(name: string, v: string, min: number): number {
      const n = Number(v);
      if (!Number.isSafeInteger(n) || n < min) throw bad(`${name} must be an integer >= ${min}`);
      return n;
    },
    bool(name: string, v: string): boolean {
      if (v === 'true' || v === '1') return true;
      if (v === 'false' || v === '0') return false;
      throw bad(`${name} must be true or false`);
    },
    oneOf<T extends string>(name: string, v: string, allowed: readonly T[]): T {
      if (!(allowed as readonly string[]).includes(v)) throw bad(`${name} must be one of ${allowed.join(', ')}`);
      return v as T;
    },
    unknown(name: string): never {
      throw bad(`unknown parameter "${name}"`);
    },
  };
}
