import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { loadConfig } from '../../src/config.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const read = (f: string) => readFileSync(`${ROOT}/${f}`, 'utf8');

interface Service {
  image?: string;
  command?: string[] | string;
  entrypoint?: string[];
  environment?: Record<string, string | null>;
  ports?: Array<string | { target: number }>;
  volumes?: string[];
  depends_on?: Record<string, { condition: string }>;
  healthcheck?: { test?: string[]; disable?: boolean };
  deploy?: { replicas?: number };
}

/**
 * `docker-compose config` (Debian's docker-compose; no engine needed) validates the file against
 * the compose schema and resolves anchors and variables; Python's yaml turns its output into JSON.
 */
function composeConfig(env: Record<string, string>): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync('docker-compose', ['-f', 'docker-compose.yaml', 'config'], { cwd: ROOT, env: { PATH: process.env.PATH, HOME: process.env.HOME, ...env }, encoding: 'utf8' });
  if (r.error) throw new Error(`docker-compose could not run (apt-get install docker-compose): ${r.error.message}`);
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}
function resolved(): Record<string, Service> {
  const out = composeConfig({ STEVEDORE_API_TOKEN: 'compose-test-token-0123456789' });
  expect(out.status, out.stderr).toBe(0);
  const json = execFileSync('python3', ['-c', 'import sys, json, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))'], { input: out.stdout, encoding: 'utf8' });
  return (JSON.parse(json) as { services: Record<string, Service> }).services;
}
const words = (s: Service) => [...(s.entrypoint ?? []), ...(Array.isArray(s.command) ? s.command : [s.command ?? ''])].join(' ');
/** Port numbers a service listens on inside the network: its published ports' targets and the ports its command names. */
function ports(s: Service): Set<number> {
  const out = new Set<number>();
  for (const p of s.ports ?? []) out.add(typeof p === 'string' ? Number(/(\d+)(\/\w+)?$/.exec(p)![1]) : p.target);
  return out;
}

describe('deployment', () => {
  const services = resolved();

  it('validates with docker-compose, and refuses to start the server without a token', () => {
    const out = composeConfig({});
    expect(out.status).not.toBe(0);
    expect(out.stderr).toMatch(/STEVEDORE_API_TOKEN/);
  });

  it('runs Redis with AOF and noeviction, MinIO from quay.io with a bucket, Azurite, fake-gcs-server for resumable uploads', () => {
    expect(words(services.redis!)).toMatch(/--appendonly yes/);
    expect(words(services.redis!)).toMatch(/--maxmemory-policy noeviction/);
    expect(services.minio!.image).toMatch(/^quay\.io\/minio\/minio/);
    expect(words(services['minio-init']!)).toMatch(/mc mb --ignore-existing local\/stevedore/);
    expect(services['minio-init']!.depends_on?.minio?.condition).toBe('service_healthy');
    expect(services.azurite!.image).toMatch(/azurite/);
    expect(words(services.gcs!)).toMatch(/-scheme http/);
    expect(words(services.gcs!)).toMatch(/-external-url http:\/\/gcs:4443/);
    for (const name of ['redis', 'minio', 'azurite', 'gcs']) expect(services[name]!.healthcheck?.test?.length, name).toBeGreaterThan(0);
  });

  it('runs the server and three worker replicas from one image, sharing the /data volume, after their dependencies are ready', () => {
    const { server, worker } = services;
    expect(server!.image).toBe('stevedore');
    expect(worker!.image).toBe('stevedore');
    expect(words(server!)).toBe('server');
    expect(words(worker!)).toBe('worker');
    expect(worker!.deploy?.replicas).toBe(3);
    // `disable: true`, as docker-compose resolves it: the image's /health check does not apply to a worker.
    expect(worker!.healthcheck?.test).toEqual(['NONE']);
    for (const s of [server!, worker!]) {
      expect(s.volumes).toContain('data:/data:rw');
      expect(s.depends_on).toMatchObject({
        redis: { condition: 'service_healthy' },
        'minio-init': { condition: 'service_completed_successfully' },
        'gcs-init': { condition: 'service_completed_successfully' },
        'azurite-init': { condition: 'service_completed_successfully' },
      });
    }
    expect(server!.environment?.STEVEDORE_HTTP_HOST).toBe('0.0.0.0');
  });

  it('sets only variables the configuration reads, and they load', () => {
    const read = new Set([...readFileSync(`${ROOT}/src/config.ts`, 'utf8').matchAll(/env\.([A-Z][A-Z0-9_]+)/g)].map((m) => m[1]!));
    // The SDKs' own credentials (CONTRACT: Backends).
    const sdk = /^(AWS_|AZURE_STORAGE_|GOOGLE_APPLICATION_CREDENTIALS$)/;
    for (const name of ['server', 'worker']) {
      const env = services[name]!.environment ?? {};
      for (const k of Object.keys(env)) expect(read.has(k) || sdk.test(k), `${name}: ${k}`).toBe(true);
      const config = loadConfig(Object.fromEntries(Object.entries(env).map(([k, v]) => [k, v ?? ''])), '/app');
      expect(config.redisUrl).toBe('redis://redis:6379');
      expect(config.stagingDir).toBe('/data/staging');
    }
  });

  it('names all four stores, each URL pointing at its service, bucket or container created by its init container', () => {
    const env = services.worker!.environment!;
    const backends = new Map(env.STEVEDORE_BACKENDS!.split(/,(?=[A-Za-z0-9._-]+=)/).map((pair) => {
      const eq = pair.indexOf('=');
      return [pair.slice(0, eq), new URL(pair.slice(eq + 1))] as const;
    }));
    expect([...backends.keys()].sort()).toEqual(['azure', 'default', 'gcs', 's3']);
    expect([...backends.values()].map((u) => u.protocol).sort()).toEqual(['azblob:', 'file:', 'gs:', 's3:']);
    const expectations: Record<string, { service: string; port: number; init: string }> = {
      's3:': { service: 'minio', port: 9000, init: 'minio-init' },
      'gs:': { service: 'gcs', port: 4443, init: 'gcs-init' },
      'azblob:': { service: 'azurite', port: 10000, init: 'azurite-init' },
    };
    for (const u of backends.values()) {
      if (u.protocol === 'file:') {
        expect(u.pathname.startsWith('/data/')).toBe(true);
        continue;
      }
      const want = expectations[u.protocol]!;
      const endpoint = new URL(u.searchParams.get('endpoint')!);
      expect(endpoint.hostname, u.href).toBe(want.service);
      expect(Number(endpoint.port), u.href).toBe(want.port);
      expect(ports(services[want.service]!).has(want.port), u.href).toBe(true);
      // The bucket or container (the URL's host) is what the init container creates.
      expect(words(services[want.init]!)).toContain(u.hostname);
    }
    expect(env.AZURE_STORAGE_CONNECTION_STRING).toContain('BlobEndpoint=http://azurite:10000/devstoreaccount1');
    expect(services['azurite-init']!.environment?.AZURE_STORAGE_CONNECTION_STRING).toBe(env.AZURE_STORAGE_CONNECTION_STRING);
  });

  it('documents every variable the configuration reads in the README\'s configuration table', () => {
    const readme = read('README.md');
    const vars = new Set([...readFileSync(`${ROOT}/src/config.ts`, 'utf8').matchAll(/env\.([A-Z][A-Z0-9_]+)/g)].map((m) => m[1]!));
    expect(vars.size).toBeGreaterThan(20);
    for (const v of vars) expect(readme, v).toContain(`| \`${v}\` |`);
  });

  it('lists in the README every service of the compose file, and only those', () => {
    const readme = read('README.md');
    const section = readme.slice(readme.indexOf('## Deployment'), readme.indexOf('\n## ', readme.indexOf('## Deployment') + 3));
    const named = new Set([...section.matchAll(/^\| `([a-z0-9-]+)` \|/gm)].map((m) => m[1]!));
    expect(named).toEqual(new Set(Object.keys(services)));
  });

  it('builds a Node 22 slim, non-root image with production dependencies and a /health check', () => {
    const df = read('Dockerfile');
    const froms = [...df.matchAll(/^FROM (\S+)/gm)].map((m) => m[1]!);
    expect(froms.length).toBeGreaterThanOrEqual(2);
    for (const f of froms) expect(f).toMatch(/^node:22-[a-z]+-slim$/);
    expect(df).toMatch(/npm prune --omit=dev/);
    expect(df).toMatch(/^USER node$/m);
    expect(df).toMatch(/^HEALTHCHECK .*\n?.*\/health/m);
    expect(df).toMatch(/^ENTRYPOINT \["node", (?:"--[a-z-]+=\d+", )*"dist\/src\/bin\/stevedore\.js"\]$/m);
  });
});
