import { StorageError, ErrorCode } from '../errors.js';

export const MAX_KEY_BYTES = 1024;

// C0 controls, DEL and C1 controls: invisible in logs and listings, refused by some stores.
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;

/** Throws InvalidInput unless `key` satisfies the contract's key rules (checked before any I/O). */
export function validateKey(key: unknown, op = 'key'): string {
  const fail = (why: string): never => {
    throw new StorageError(ErrorCode.InvalidInput, `invalid key: ${why}`, {
      op,
      key: typeof key === 'string' ? key.slice(0, 200) : undefined,
    });
  };
  if (typeof key !== 'string') return fail('not a string');
  if (key.length === 0) return fail('empty');
  if (!key.isWellFormed()) return fail('not valid UTF-8 (lone surrogate)');
  if (Buffer.byteLength(key, 'utf8') > MAX_KEY_BYTES) return fail(`longer than ${MAX_KEY_BYTES} bytes`);
  if (CONTROL.test(key)) return fail('contains NUL or a control character');
  if (key.startsWith('/')) return fail('starts with "/"');
  for (const seg of key.split('/')) {
    if (seg === '') return fail('empty path segment');
    if (seg === '.' || seg === '..') return fail(`"${seg}" segment`);
  }
  return key;
}

/**
 * A listing prefix: like a key but may be empty and may end with `/`. Validated the same way so a
 * prefix can never reach outside a backend's root either.
 */
export function validatePrefix(prefix: unknown): string {
  if (prefix === undefined || prefix === '') return '';
  if (typeof prefix !== 'string') throw new StorageError(ErrorCode.InvalidInput, 'invalid prefix: not a string', { op: 'list' });
  validateKey(prefix.endsWith('/') ? `${prefix}x` : prefix, 'list');
  return prefix;
}

const META_NAME = /^[a-z][a-z0-9_]{0,62}$/;
const META_VALUE = /^[\u0020-\u007e]*$/;
const MAX_META_BYTES = 2048;
const CONTENT_TYPE = /^[A-Za-z0-9!#$&^_.+-]+\/[A-Za-z0-9!#$&^_.+-]+(\s*;[\u0020-\u007e]*)?$/;

/**
 * User metadata must survive every backend unchanged: Azure wants C#-identifier names, S3 folds
 * names to lower case and sends values as HTTP headers, and S3 caps the whole set at 2 KB.
 */
export function validateMetadata(meta: unknown, reserved: string): Record<string, string> {
  if (meta === undefined) return {};
  const fail = (why: string): never => {
    throw new StorageError(ErrorCode.InvalidInput, `invalid metadata: ${why}`, { op: 'put' });
  };
  if (typeof meta !== 'object' || meta === null || Array.isArray(meta)) return fail('not an object');
  const out: Record<string, string> = Object.create(null) as Record<string, string>;
  let bytes = 0;
  for (const [name, value] of Object.entries(meta)) {
    if (!META_NAME.test(name)) return fail(`name ${JSON.stringify(name)} must match ${META_NAME}`);
    if (name === reserved) return fail(`name "${reserved}" is reserved`);
    if (typeof value !== 'string' || !META_VALUE.test(value)) return fail(`value of "${name}" must be printable ASCII`);
    bytes += name.length + value.length;
    out[name] = value;
  }
  if (bytes > MAX_META_BYTES) return fail(`larger than ${MAX_META_BYTES} bytes`);
  return { ...out };
}

export function validateContentType(ct: unknown): string | undefined {
  if (ct === undefined) return undefined;
  if (typeof ct !== 'string' || ct.length > 255 || !CONTENT_TYPE.test(ct)) {
    throw new StorageError(ErrorCode.InvalidInput, `invalid contentType ${JSON.stringify(String(ct).slice(0, 100))}`, { op: 'put' });
  }
  return ct;
}

const SHA256_HEX = /^[0-9a-fA-F]{64}$/;

export function validateSha256(sha: unknown): string | undefined {
  if (sha === undefined) return undefined;
  if (typeof sha !== 'string' || !SHA256_HEX.test(sha)) {
    throw new StorageError(ErrorCode.InvalidInput, 'invalid sha256: expected 64 hex digits', { op: 'put' });
  }
  return sha.toLowerCase();
}
