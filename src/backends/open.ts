import { pathToFileURL } from 'node:url';
import { ErrorCode, StorageError } from '../errors.js';
import { Bucket } from '../storage/bucket.js';
import type { Driver } from '../storage/driver.js';
import type { AzureEnv } from './azure.js';
import { fsDriverFromUrl } from './fs.js';
import { MemoryDriver } from './memory.js';

export const DEFAULT_BACKENDS = 'default=file:./data/objects';

/** Credentials and settings the SDKs read from the environment, passed in by the composition root. */
export interface BackendEnv extends AzureEnv {
  /** Base for relative `file:` URLs. @defaultValue process.cwd() */
  cwd?: string;
}

/**
 * The one switch on backend kind: a URL of the contract's forms to a Bucket. The URL's path after
 * the bucket or container is a folder inside it. Cloud SDKs load only when a backend uses them
 * (together they add about a second to every start of the CLI).
 */
export async function openBackend(name: string, spec: string, env: BackendEnv = {}): Promise<Bucket> {
  const url = parseBackendUrl(spec, env.cwd ?? process.cwd());
  let driver: Driver;
  let prefix = '';
  switch (url.protocol) {
    case 'file:':
      driver = fsDriverFromUrl(url);
      break;
    case 'memory:':
      driver = new MemoryDriver();
      break;
    case 's3:':
    case 'gs:':
    case 'azblob:':
      if (!url.hostname) throw invalid(name, spec, 'missing bucket or container name');
      prefix = decodeURIComponent(url.pathname).replace(/^\/+|\/+$/g, '');
      driver = url.protocol === 's3:' ? (await import('./s3.js')).s3DriverFromUrl(url)
        : url.protocol === 'gs:' ? (await import('./gcs.js')).gcsDriverFromUrl(url)
          : (await import('./azure.js')).azureDriverFromUrl(url, env);
      break;
    default:
      throw invalid(name, spec, `unknown scheme "${url.protocol}" (use file:, s3:, gs:, azblob: or memory:)`);
  }
  return new Bucket(driver, { name, prefix });
}

/** `name=url,name=url` (STEVEDORE_BACKENDS) to named Buckets; always has `default` unless `spec` names none. */
export async function openBackends(spec: string | undefined, env: BackendEnv = {}): Promise<Map<string, Bucket>> {
  const buckets = new Map<string, Bucket>();
  for (const [name, url] of parseBackendsSpec(spec)) buckets.set(name, await openBackend(name, url, env));
  return buckets;
}

/** `name=url,name=url` to its pairs, names checked; the URLs are checked when opened. */
export function parseBackendsSpec(spec: string | undefined): Map<string, string> {
  const pairs = new Map<string, string>();
  for (const pair of (spec?.trim() || DEFAULT_BACKENDS).split(',').map((s) => s.trim()).filter(Boolean)) {
    const eq = pair.indexOf('=');
    const name = eq < 0 ? '' : pair.slice(0, eq).trim();
    if (!/^[A-Za-z0-9._-]{1,64}$/.test(name)) throw invalid(name, pair, 'expected name=url with a name of [A-Za-z0-9._-]');
    if (pairs.has(name)) throw invalid(name, pair, 'backend named twice');
    pairs.set(name, pair.slice(eq + 1).trim());
  }
  return pairs;
}

function parseBackendUrl(spec: string, cwd: string): URL {
  // `file:./relative` is not a URL WHATWG can parse relative to a directory; resolve it by hand.
  const rel = /^file:(?!\/\/)(.*)$/.exec(spec);
  if (rel) return new URL(rel[1] ?? '', pathToFileURL(`${cwd.replace(/\/+$/, '')}/`));
  try {
    return new URL(spec);
  } catch {
    throw invalid('', spec, 'not a URL');
  }
}

function invalid(name: string, spec: string, why: string): StorageError {
  // Only the scheme and host are echoed: a URL someone pasted credentials into must not reach logs.
  const shown = spec.replace(/\/\/[^@/]*@/, '//***@');
  return new StorageError(ErrorCode.InvalidInput, `backend ${name ? `"${name}" ` : ''}${shown}: ${why}`, { op: 'config' });
}
