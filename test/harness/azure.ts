import { randomUUID } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { BlobSASPermissions, BlobServiceClient, type BlobClient, type ContainerClient } from '@azure/storage-blob';
import { AzureDriver, type AzureDriverOptions } from '../../src/backends/azure.js';
import type { ConformanceTarget } from '../conformance/target.js';
import { freePort, startServerProcess, tempDir, type ServerProcess } from './process.js';

const require = createRequire(import.meta.url);
// azurite's well-known development account; not a secret.
const DEV_ACCOUNT = 'devstoreaccount1';
const DEV_KEY = 'Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==';

/**
 * Loaded in the azurite process before its blob service's entry point. An addition, no fix:
 * azurite (3.35) answers Put Block From URL 501 APINotImplemented. Here the block is read from
 * the copy source by a request to this same azurite over loopback (pinned to its own port,
 * whatever host the URL names), carrying the source's SAS, `x-ms-source-range` as Range and the
 * `x-ms-source-if-*` conditions as If-*, so azurite's own download path checks authorisation,
 * range and conditions; the bytes are then staged by azurite's own Put Block (and an account SAS
 * grants the operation as it grants Put Block, which azurite's table omits). Failures answer
 * as Azure does: 412 SourceConditionNotMet when a source condition fails, 404
 * CannotVerifyCopySource for a missing source, CannotVerifyCopySource with the source's status
 * otherwise. (Azurite's own implementation, which came later, works the same way.)
 * `blockFromUrl: false` leaves the 501 in place. And one fix: azurite refuses a Put Blob with
 * `If-None-Match: *` (BlobAlreadyExists) where a blob has staged blocks but was never committed,
 * which Azure does not count as a blob (no properties, not listed; azurite issue 400); a failed
 * splice of a blob deleted meanwhile leaves such blocks. Here an uncommitted blob record is
 * dropped before such a Put Blob (a writer staging at that instant can only make it fail). Also, `GET /__shim/stats` answers the bytes of
 * every PUT body so far (Put Blob, Put Block, Put Block List: what clients uploaded), the blocks
 * and bytes staged from URLs and those refused (412) or missing (404), and the copies that came
 * without a source If-Match; `POST /__shim/arm` sets up a race (Azurite.arm).
 */
const AZURITE_SHIM = (paths: Record<'handler' | 'context' | 'factory' | 'error' | 'store' | 'accountSas' | 'operation' | 'main', string>, port: number, blockFromUrl: boolean) => `'use strict';
const http = require('node:http');
const BlockBlobHandler = require(${JSON.stringify(paths.handler)}).default;
const BlobStorageContext = require(${JSON.stringify(paths.context)}).default;
const StorageErrorFactory = require(${JSON.stringify(paths.factory)}).default;
const StorageError = require(${JSON.stringify(paths.error)}).default;
const LokiBlobMetadataStore = require(${JSON.stringify(paths.store)}).default;
const ACCOUNT_SAS_PERMISSIONS = require(${JSON.stringify(paths.accountSas)}).default;
const Operation = require(${JSON.stringify(paths.operation)}).default;
const PORT = ${port};
const stats = { uploadedBytes: 0, copiedBlocks: 0, copiedBytes: 0, copiesRefused: 0, copiesMissing: 0, copiesUnconditional: 0 };
// The armed race: before the nth Put Block From URL whose source is hook.path, or before the
// Put Block List of hook.path, this request is made (another writer replacing or deleting it).
let hook;
async function fire(on, path) {
  if (!hook || hook.on !== on || hook.path !== path || ++hook.count !== hook.nth) return undefined;
  const { request, refuse } = hook;
  hook = undefined;
  // Or the store refuses to read the source (403/400/404 CannotVerifyCopySource: a firewalled account, an endpoint it cannot reach).
  if (refuse) return { refuse };
  const res = await fetch(request.url, { method: request.method, headers: request.headers });
  const answer = await res.text();
  if (!res.ok) console.error('azurite shim: the armed request failed', res.status, answer);
}

// A request to this azurite. Not fetch: it would inflate a blob stored with a Content-Encoding.
function self(path, method, headers) {
  return new Promise((resolve, reject) => {
    http.request({ host: '127.0.0.1', port: PORT, path, method, headers }, resolve).on('error', reject).end();
  });
}
const text = async (res) => {
  let body = '';
  res.setEncoding('utf8');
  for await (const c of res) body += c;
  return body;
};

const emit = http.Server.prototype.emit;
http.Server.prototype.emit = function (event, req, res, ...rest) {
  if (event === 'request' && req.url === '/__shim/stats') {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify(stats));
    return true;
  }
  if (event === 'request' && req.url === '/__shim/arm' && req.method === 'POST') {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (c) => { body += c; });
    req.on('end', () => { hook = { ...JSON.parse(body), count: 0 }; res.end(); });
    return true;
  }
  if (event === 'request' && req.method === 'PUT') stats.uploadedBytes += Number(req.headers['content-length'] || 0);
  return emit.call(this, event, req, res, ...rest);
};

const { createBlob } = LokiBlobMetadataStore.prototype;
LokiBlobMetadataStore.prototype.createBlob = function (context, blob, leaseAccessConditions, modifiedAccessConditions) {
  if (modifiedAccessConditions && modifiedAccessConditions.ifNoneMatch === '*') {
    const coll = this.db.getCollection(this.BLOBS_COLLECTION);
    const doc = coll.findOne({ accountName: blob.accountName, containerName: blob.containerName, name: blob.name, snapshot: blob.snapshot });
    if (doc && doc.isCommitted === false) coll.remove(doc);
  }
  return createBlob.call(this, context, blob, leaseAccessConditions, modifiedAccessConditions);
};

const blobPath = (ctx) => '/' + ctx.account + '/' + ctx.container + '/' + ctx.blob;
const { commitBlockList } = BlockBlobHandler.prototype;
BlockBlobHandler.prototype.commitBlockList = async function (blocks, options, context) {
  await fire('commit', blobPath(new BlobStorageContext(context)));
  return commitBlockList.call(this, blocks, options, context);
};

// azurite's account SAS table lacks the operation (a SAS request for it fails 500): the permissions of Put Block.
if (${blockFromUrl}) ACCOUNT_SAS_PERMISSIONS.set(Operation.BlockBlob_StageBlockFromURL, ACCOUNT_SAS_PERMISSIONS.get(Operation.BlockBlob_StageBlock));
if (${blockFromUrl}) BlockBlobHandler.prototype.stageBlockFromURL = async function (blockId, contentLength, sourceUrl, options, context) {
  let url;
  try {
    url = new URL(sourceUrl);
  } catch {
    throw StorageErrorFactory.getInvalidHeaderValue(context.contextId, { HeaderName: 'x-ms-copy-source', HeaderValue: sourceUrl });
  }
  if (url.port !== String(PORT) || !['127.0.0.1', 'localhost'].includes(url.hostname)) {
    throw StorageErrorFactory.getCannotVerifyCopySource(context.contextId, 404, 'The specified resource does not exist');
  }
  const armed = await fire('copy', decodeURIComponent(url.pathname));
  if (armed) throw StorageErrorFactory.getCannotVerifyCopySource(context.contextId, armed.refuse, 'This request is not authorized to perform this operation.');
  const cond = options.sourceModifiedAccessConditions || {};
  if (!cond.sourceIfMatch) stats.copiesUnconditional++;
  const headers = { 'x-ms-version': context.request.getHeader('x-ms-version') || '2025-01-05' };
  if (options.sourceRange) headers.range = options.sourceRange;
  if (cond.sourceIfMatch) headers['if-match'] = cond.sourceIfMatch;
  if (cond.sourceIfNoneMatch) headers['if-none-match'] = cond.sourceIfNoneMatch;
  if (cond.sourceIfModifiedSince) headers['if-modified-since'] = new Date(cond.sourceIfModifiedSince).toUTCString();
  if (cond.sourceIfUnmodifiedSince) headers['if-unmodified-since'] = new Date(cond.sourceIfUnmodifiedSince).toUTCString();
  if (options.copySourceAuthorization) headers.authorization = options.copySourceAuthorization;
  const source = url.pathname + url.search;
  const res = await self(source, 'GET', headers);
  if (res.statusCode !== 200 && res.statusCode !== 206) {
    const body = await text(res);
    // azurite answers a condition on a missing blob 412; Azure, 404 first.
    const gone = res.statusCode === 412 && (await self(source, 'HEAD', { 'x-ms-version': headers['x-ms-version'] }).then((r) => { r.resume(); return r.statusCode; })) === 404;
    if (res.statusCode === 412 && !gone) {
      stats.copiesRefused++;
      throw new StorageError(412, 'SourceConditionNotMet', 'The source condition specified using HTTP conditional header(s) is not met.', context.contextId);
    }
    if (res.statusCode === 404 || gone) {
      stats.copiesMissing++;
      throw StorageErrorFactory.getCannotVerifyCopySource(context.contextId, 404, 'The specified resource does not exist');
    }
    const message = /<Message>([^<]*)/.exec(body);
    throw StorageErrorFactory.getCannotVerifyCopySource(context.contextId, res.statusCode, message ? message[1].split('\\n')[0] : 'Could not verify the copy source within the specified time.');
  }
  const length = Number(res.headers['content-length']);
  const staged = await this.stageBlock(blockId, length, res, options, context);
  stats.copiedBlocks++;
  stats.copiedBytes += length;
  return staged;
};

require(${JSON.stringify(paths.main)});
`;

/** The shim's counts (see AZURITE_SHIM). */
export interface AzuriteStats {
  uploadedBytes: number;
  copiedBlocks: number;
  copiedBytes: number;
  copiesRefused: number;
  copiesMissing: number;
  copiesUnconditional: number;
}

export interface Azurite {
  endpoint: string;
  connectionString: string;
  service: BlobServiceClient;
  server: ServerProcess;
  /** A new, empty container. */
  container(): Promise<ContainerClient>;
  /** Bytes uploaded, blocks and bytes copied from URLs, and copies refused, missing or unconditional, so far (all containers). */
  stats(): Promise<AzuriteStats>;
  /**
   * Arms a race, fired once: `blob` is replaced by a copy of `from`, or else deleted, just before
   * the `nth` Put Block From URL whose source it is is served (`on: 'copy'`), or just before its
   * `nth` Put Block List (`on: 'commit'`). With `refuse` (`on: 'copy'`), that copy is answered
   * CannotVerifyCopySource with this status instead, the blob left alone (a store that cannot read
   * its source).
   */
  arm(race: { blob: BlobClient; from?: BlobClient; on: 'copy' | 'commit'; nth?: number; refuse?: number }): Promise<void>;
  stop(): Promise<void>;
}

const azuriteFile = (path: string): string => require.resolve(`azurite/dist/src/blob/${path}`);

/**
 * Starts azurite's blob service as a child process on a free loopback port, storing in a temp
 * dir, with the suite's shim (above). With `blockFromUrl: false` it answers Put Block From URL
 * 501 APINotImplemented, as plain azurite does.
 */
export async function startAzurite(opts: { blockFromUrl?: boolean } = {}): Promise<Azurite> {
  const port = await freePort();
  const dir = await tempDir('stevedore-azurite-');
  let server: ServerProcess;
  try {
    const shim = join(dir.path, 'azurite-shim.cjs');
    await writeFile(shim, AZURITE_SHIM({
      handler: azuriteFile('handlers/BlockBlobHandler.js'), context: azuriteFile('context/BlobStorageContext.js'),
      factory: azuriteFile('errors/StorageErrorFactory.js'), error: azuriteFile('errors/StorageError.js'), store: azuriteFile('persistence/LokiBlobMetadataStore.js'),
      accountSas: azuriteFile('authentication/OperationAccountSASPermission.js'), operation: azuriteFile('generated/artifacts/operation.js'), main: azuriteFile('main.js'),
    }, port, opts.blockFromUrl ?? true));
    server = await startServerProcess({
      command: process.execPath,
      args: [shim, '--blobHost', '127.0.0.1', '--blobPort', String(port), '--location', join(dir.path, 'data'), '--skipApiVersionCheck', '--disableTelemetry', '--silent'],
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
  const sas = (blob: BlobClient, permissions: string) => blob.generateSasUrl({ permissions: BlobSASPermissions.parse(permissions), expiresOn: new Date(Date.now() + 3_600_000) });
  return {
    endpoint,
    connectionString,
    service,
    server,
    async stats() {
      const res = await fetch(`http://127.0.0.1:${port}/__shim/stats`);
      return (await res.json()) as AzuriteStats;
    },
    async arm(race) {
      const url = await sas(race.blob, race.from ? 'rw' : 'd');
      // Copy Blob From URL (synchronous) from `from`, or Delete Blob; both signed by a SAS.
      const request = race.from
        ? { method: 'PUT', url, headers: { 'x-ms-version': '2025-01-05', 'x-ms-copy-source': await sas(race.from, 'r'), 'x-ms-requires-sync': 'true' } }
        : { method: 'DELETE', url, headers: { 'x-ms-version': '2025-01-05' } };
      const path = `/${race.blob.accountName}/${race.blob.containerName}/${race.blob.name}`;
      const res = await fetch(`http://127.0.0.1:${port}/__shim/arm`, { method: 'POST', body: JSON.stringify({ path, on: race.on, nth: race.nth ?? 1, request, refuse: race.refuse }) });
      if (!res.ok) throw new Error(`arming the shim failed: ${res.status}`);
    },
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
    // The suite's shim adds the server-side copy the emulator lacks.
    splices: true,
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
