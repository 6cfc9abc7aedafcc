import { createHmac } from 'node:crypto';

/** Standard Webhooks secrets are `whsec_` + base64 of 24 to 64 random bytes. */
const SECRET = /^whsec_([A-Za-z0-9+/]+={0,2})$/;

/** The HMAC key of a `whsec_` secret; throws a message that never repeats the secret. */
export function secretKey(secret: string): Buffer {
  const m = SECRET.exec(secret);
  if (!m) throw new Error('must be "whsec_" followed by base64');
  const key = Buffer.from(m[1]!, 'base64');
  if (key.length < 24 || key.length > 64) throw new Error(`must decode to 24-64 bytes (got ${key.length})`);
  return key;
}

/** `webhook-signature`: `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">` (Standard Webhooks). */
export function sign(key: Buffer, id: string, timestampSec: number, body: string): string {
  return `v1,${createHmac('sha256', key).update(`${id}.${timestampSec}.${body}`).digest('base64')}`;
}
