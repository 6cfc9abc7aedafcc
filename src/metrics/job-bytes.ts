/** Bytes a completed job moved, by backend and direction, read from its payload and result. */
export interface Moved {
  backend: string;
  direction: 'read' | 'write';
  bytes: number;
}

const num = (v: unknown): number => (typeof v === 'number' && Number.isFinite(v) && v > 0 ? v : 0);
const str = (v: unknown, d: string): string => (typeof v === 'string' && v ? v : d);

/**
 * From the contract's results: a store wrote `size` bytes, a fetch read them, a repack wrote its
 * new archive, a migration read and wrote `bytes`, a verify read them. A failed job's partial
 * transfer is not counted; a repack's read of the old archive and log entries are left out.
 */
export function bytesMoved(type: string, payload: unknown, result: unknown): Moved[] {
  const p = (payload ?? {}) as Record<string, unknown>;
  const r = (result ?? {}) as Record<string, unknown>;
  const backend = str(r.backend, str(p.backend, 'default'));
  const out: Moved[] = [];
  const add = (b: string, direction: Moved['direction'], bytes: number) => { if (bytes) out.push({ backend: b, direction, bytes }); };
  switch (type) {
    case 'store': add(backend, 'write', num(r.size)); break;
    case 'fetch-to-staging': add(backend, 'read', num(r.size)); break;
    case 'repack-session': add(backend, 'write', num(r.size)); break;
    case 'migrate':
      add(str(p.from, 'default'), 'read', num(r.bytes));
      add(str(p.to, 'default'), 'write', num(r.bytes));
      break;
    case 'verify': add(backend, 'read', num(r.bytes)); break;
  }
  return out;
}
