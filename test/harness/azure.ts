import { randomUUID } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { BlobServiceClient, type ContainerClient } from '@azure/storage-blob';
import { AzureDriver, type AzureDriverOptions } from '../../src/backends/azure.js';
import type { ConformanceTarget } from '../conformance/target.js';
import { freePort, startServerProcess, tempDir, type ServerProcess } from './process.js';

const AZURITE_BLOB = fileURLToPath(new URL('../../node_modules/.bin/azurite-blob', import.meta.url));
// azurite's well-known development account; not a secret.
const DEV_ACCOUNT = 'devstoreaccount1';
const DEV_KEY = 'Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==';

export interface Azurite {
  endpoint: string;
  connectionString: string;
  service: BlobServiceClient;
  server: ServerProcess;
  /** A new, empty container. */
  container(): Promise<ContainerClient>;
  stop(): Promise<void>;
}

/** Starts azurite's blob service as a child process on a free loopback port, storing in a temp dir. */
export async function startAzurite(): Promise<Azurite> {
  const port = await freePort();
  const dir = await tempDir('stevedore-azurite-');
  let server: ServerProcess;
  try {
    server = await startServerProcess({
      command: AZURITE_BLOB,
      args: ['--blobHost', '127.0.0.1', '--blobPort', String(port), '--location', dir.path, '--skipApiVersionCheck', '--disableTelemetry', '--silent'],
      port,
    });
  } catch (err) {
    await dir.remove();
    throw err;
  }
  const endpoint = `http://127.0.0.1:${port}/${DEV_ACCOUNT}`;
  const connectionString = `DefaultEndpointsProtocol=http;AccountName=${DEV_ACCOUNT};AccountKey=${DEV_KEY};BlobEndpoint=${endpoint};`;
  // Harness calls fail fast: a retry loop here would only hide an emulator that is gone.
  const service = BlobServiceClient.fromConnectionString(connectionString, { retryOptions: { maxTries: 1 } });
  return {
    endpoint,
    connectionString,
    service,
    server,
    async container() {
      const c = service.getContainerClient(`t-${randomUUID()}`);
      await c.create();
      return c;
    },
    async stop() {
      await server.stop();
      await dir.remove();
    },
  };
}

export interface AzureTarget extends ConformanceTarget {
  /** The emulator behind the target, started on first use. */
  azurite(): Promise<Azurite>;
  /** A driver on a new, empty container of the same emulator. */
  newDriver(opts?: Partial<AzureDriverOptions>): Promise<AzureDriver>;
}

/**
 * The Azure conformance target. Small blocks (4 MiB unless told) make the suite's larger-than-threshold
 * objects span several blocks. Azurite starts on first use, so a failure to start fails the tests
 * that need it (never a skip).
 */
export function azureConformanceTarget(opts: { blockSize?: number } = {}): AzureTarget {
  const blockSize = opts.blockSize ?? 4 * 1024 * 1024;
  let started: Promise<Azurite> | undefined;
  let shared: Promise<ContainerClient> | undefined;
  const azurite = () => (started ??= startAzurite());
  // One container for every driver() and corrupt(): the suite gives each test its own key prefix.
  const container = () => (shared ??= azurite().then((az) => az.container()));
  const newDriver = async (extra: Partial<AzureDriverOptions> = {}) => {
    const az = await azurite();
    const name = extra.container ?? (await az.container()).containerName;
    return new AzureDriver({ connectionString: az.connectionString, blockSize, maxTries: 2, retryDelayInMs: 100, ...extra, container: name });
  };
  return {
    name: 'azblob',
    multipartThreshold: blockSize,
    azurite,
    newDriver,
    async driver() {
      return newDriver({ container: (await container()).containerName });
    },
    async corrupt(storeKey, bytes) {
      const blob = (await container()).getBlockBlobClient(storeKey);
      const props = await blob.getProperties();
      // Rewriting through a raw client keeps the old digest while the bytes change, as bit rot would.
      await blob.upload(bytes, bytes.length, {
        metadata: props.metadata,
        blobHTTPHeaders: props.contentType === undefined ? {} : { blobContentType: props.contentType },
      });
    },
    async teardown() {
      const s = started;
      started = undefined;
      shared = undefined;
      // A start that failed has already failed the tests; it must not also hide their errors here.
      await s?.then((az) => az.stop(), () => {});
    },
  };
}
