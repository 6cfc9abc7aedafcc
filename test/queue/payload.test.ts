import { describe, expect, it } from 'vitest';
import { LogPayload } from '../../jobs/log.js';
import { StorePayload } from '../../jobs/store.js';
import { parsePayload } from '../../src/payload.js';

describe('payload names that pollute prototypes (RELIABILITY #11)', () => {
  it.each([
    ['__proto__ in store metadata', StorePayload, '{"key":"k","source":{"base64":""},"metadata":{"__proto__":"x"}}', 'metadata.__proto__'],
    ['constructor.prototype deep in log metadata', LogPayload, '{"site":"s","build":"b","action":"a","status":"ok","metadata":{"a":{"constructor":{"prototype":{"x":1}}}}}', 'metadata.a.constructor'],
    ['prototype in a list in log metadata', LogPayload, '{"site":"s","build":"b","action":"a","status":"ok","metadata":{"l":[{"prototype":1}]}}', 'metadata.l.0.prototype'],
  ])('refuses %s as InvalidInput naming the path', (_what, schema, json, path) => {
    expect(() => parsePayload(schema, JSON.parse(json))).toThrow(new RegExp(`^InvalidInput: ${path.replace(/\./g, '\\.')}: `));
    expect(({} as Record<string, unknown>).x).toBeUndefined();
  });

  it('passes ordinary nested metadata through', () => {
    expect(parsePayload(LogPayload, { site: 's', build: 'b', action: 'a', status: 'ok', metadata: { a: { b: [1, { c: 'd' }] } } }).metadata).toEqual({ a: { b: [1, { c: 'd' }] } });
  });
});
