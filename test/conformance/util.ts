import { createHash } from 'node:crypto';
import type { Readable } from 'node:stream';
import { expect } from 'vitest';
import { StorageError } from '../../src/errors.js';
import type { Bucket } from '../../src/storage/bucket.js';

export const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

export async function readAll(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

/** The contract code a promise rejects with (checking it leads the message), or 'resolved'. */
export async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(StorageError);
    const e = err as StorageError;
    expect(e.message.startsWith(`${e.code}: `)).toBe(true);
    return e.code;
  }
  return 'resolved';
}

export async function collectKeys(b: Bucket, prefix = '', pageSize?: number): Promise<string[]> {
  const keys: string[] = [];
  for await (const o of b.list(prefix, pageSize ? { pageSize } : {})) keys.push(o.key);
  return keys;
}
