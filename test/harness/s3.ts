import { randomUUID } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { CreateBucketCommand, HeadObjectCommand, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { S3Driver, type S3DriverOptions } from '../../src/backends/s3.js';
import type { ConformanceTarget } from '../conformance/target.js';
import { freePort, startServerProcess, tempDir, type ServerProcess } from './process.js';

/** s3rver's fixed development credentials; not a secret. */
export const S3RVER_CREDENTIALS = { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' } as const;

const require = createRequire(import.meta.url);

/**
 * Fixes for s3rver bugs that would otherwise make the suite test the emulator instead of the driver,
 * loaded in the s3rver process before its CLI. Each makes s3rver do what S3 documents:
 * - listings: s3rver walks its tree in readdir order and pages by comparing JS strings, so pages
 *   are unsorted and can skip or repeat keys; S3 lists in UTF-8 byte order.
 * - writes: s3rver streams a PutObject straight into the object's file and answers before the file
 *   is flushed, so racing writers interleave bytes and pair one writer's bytes with another's
 *   metadata; S3 makes each write visible whole. Writes here go to a temp file renamed into place,
 *   one at a time per key.
 * - ranges: s3rver reads the range's end as `end || Infinity`, so `bytes=0-0` returns the whole
 *   object, and a range of an empty object announces a byte it never sends; S3 answers 416 there.
 * - UploadPartCopy: s3rver answers NotImplemented. Here a part is copied from the source's range,
 *   refused with 412 when x-amz-copy-source-if-match no longer matches the source, as S3 does.
 *   `uploadPartCopy: false` leaves s3rver's NotImplemented, for the fallbacks that meet it.
 * And additions, no fixes: `GET /__shim/stats` answers the request bodies uploaded so far
 * (PutObject and UploadPart, by their declared length) and the parts copied (and refused), so
 * tests and the bench can count what a worker sent; `GET /__shim/arm` sets up a race another
 * writer would cause, at a request chosen by the test (S3rver.arm).
 */
const S3RVER_SHIM = (storePath: string, binPath: string, objectCtrlPath: string, errorPath: string, uploadPartCopy: boolean) => `'use strict';
const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const { Transform } = require('node:stream');
const { pipeline } = require('node:stream/promises');
const Store = require(${JSON.stringify(storePath)});
const { listObjects, getObject, copyObject, deleteObject } = Store.prototype;

Store.prototype.listObjects = async function (bucket, options) {
  const { startAfter = '', maxKeys = Infinity } = options;
  const all = await listObjects.call(this, bucket, { ...options, startAfter: '', maxKeys: Infinity });
  const after = Buffer.from(startAfter);
  const objects = all.objects
    .filter((o) => Buffer.compare(Buffer.from(o.key), after) > 0)
    .sort((a, b) => Buffer.compare(Buffer.from(a.key), Buffer.from(b.key)));
  return { ...all, objects: objects.slice(0, maxKeys), isTruncated: objects.length > maxKeys };
};

const locks = new Map();
function oneAtATime(id, fn) {
  const run = (locks.get(id) || Promise.resolve()).then(fn);
  const tail = run.catch(() => {});
  locks.set(id, tail);
  tail.then(() => { if (locks.get(id) === tail) locks.delete(id); });
  return run;
}

Store.prototype.putObject = function (object) {
  return oneAtATime(object.bucket + '/' + object.key, async () => {
    const target = this.getResourcePath(object.bucket, object.key, 'object');
    await fs.promises.mkdir(path.dirname(target), { recursive: true });
    const tmp = target + '.tmp-' + crypto.randomUUID();
    const md5 = crypto.createHash('md5');
    let size = 0;
    const count = new Transform({ transform(c, _e, cb) { md5.update(c); size += c.length; cb(null, c); } });
    try {
      await pipeline(Buffer.isBuffer(object.content) ? [object.content] : object.content, count, fs.createWriteStream(tmp));
      await fs.promises.rename(tmp, target);
    } catch (err) {
      await fs.promises.rm(tmp, { force: true });
      throw err;
    }
    const digest = md5.digest('hex');
    await this.putMetadata(object.bucket, object.key, object.metadata, digest);
    return { size, md5: digest };
  });
};

Store.prototype.copyObject = function (srcBucket, srcKey, bucket, key, ...rest) {
  return oneAtATime(bucket + '/' + key, () => copyObject.call(this, srcBucket, srcKey, bucket, key, ...rest));
};
Store.prototype.deleteObject = function (bucket, key) {
  return oneAtATime(bucket + '/' + key, () => deleteObject.call(this, bucket, key));
};

Store.prototype.getObject = async function (bucket, key, options) {
  const object = await getObject.call(this, bucket, key, options);
  if (!object || !object.range) return object;
  if (object.size === 0) {
    if (object.content) object.content.destroy();
    object.content = null;
  } else if (options.end === 0 && object.content) {
    object.content.destroy();
    object.range.end = 0;
    object.content = fs.createReadStream(this.getResourcePath(bucket, key, 'object'), { start: 0, end: 0 });
  }
  return object;
};

// s3rver's router refuses a part upload carrying x-amz-copy-source before any controller runs;
// the header is renamed on arrival so the request reaches uploadPart below.
const http = require('node:http');
const emit = http.Server.prototype.emit;
const stats = { uploadedBytes: 0, copiedParts: 0, copiesRefused: 0, copiesMissing: 0 };
// The armed race (GET /__shim/arm): see S3rver.arm.
let hook;
async function fire(ctx) {
  const h = hook;
  hook = undefined;
  if (h.rot !== undefined) {
    // Bit rot: one byte flipped in place, the stored ETag and metadata kept.
    const fd = await fs.promises.open(ctx.store.getResourcePath(h.bucket, h.key, 'object'), 'r+');
    const b = Buffer.alloc(1);
    await fd.read(b, 0, 1, h.rot);
    b[0] ^= 0xff;
    await fd.write(b, 0, 1, h.rot);
    await fd.close();
  } else if (h.from) await ctx.store.copyObject(h.bucket, h.from, h.bucket, h.key);
  else await ctx.store.deleteObject(h.bucket, h.key);
}
http.Server.prototype.emit = function (event, req, ...rest) {
  if (event === 'request' && req.url === '/__shim/stats') {
    rest[0].setHeader('content-type', 'application/json');
    rest[0].end(JSON.stringify(stats));
    return true;
  }
  if (event === 'request' && req.url.startsWith('/__shim/arm?')) {
    const q = new URL(req.url, 'http://shim').searchParams;
    hook = { bucket: q.get('bucket'), key: q.get('key'), from: q.get('from'), rot: q.has('rot') ? Number(q.get('rot')) : undefined, on: q.get('on'), nth: Number(q.get('nth')), copies: 0 };
    rest[0].end();
    return true;
  }
  if (event === 'request' && req.method === 'PUT') {
    if (req.headers['x-amz-copy-source']) stats.copiedParts += /[?&]uploadId=/.test(req.url) ? 1 : 0;
    else stats.uploadedBytes += Number(req.headers['x-amz-decoded-content-length'] || req.headers['content-length'] || 0);
  }
  if (${uploadPartCopy} && event === 'request' && req.headers['x-amz-copy-source'] && /[?&]uploadId=/.test(req.url)) {
    req.headers['x-shim-copy-source'] = req.headers['x-amz-copy-source'];
    delete req.headers['x-amz-copy-source'];
  }
  return emit.call(this, event, req, ...rest);
};
const objectCtrl = require(${JSON.stringify(objectCtrlPath)});
const S3Error = require(${JSON.stringify(errorPath)});
const { uploadPart } = objectCtrl;
objectCtrl.uploadPart = async function (ctx) {
  const header = ctx.headers['x-shim-copy-source'];
  if (!header) return uploadPart.call(this, ctx);
  const source = decodeURIComponent(header).replace(/^\\//, '');
  const [srcBucket, ...rest] = source.split('/');
  const srcKey = rest.join('/');
  const range = /^bytes=(\\d+)-(\\d+)$/.exec(ctx.headers['x-amz-copy-source-range'] || '');
  if (hook && hook.bucket === srcBucket && hook.key === srcKey && ++hook.copies === hook.nth && hook.on === 'copy') await fire(ctx);
  const object = await ctx.store.getObject(srcBucket, srcKey, range ? { start: Number(range[1]), end: Number(range[2]) } : undefined);
  if (!object) {
    stats.copiesMissing++;
    throw new S3Error('NoSuchKey', 'The specified key does not exist.', { Key: srcKey });
  }
  const ifMatch = ctx.headers['x-amz-copy-source-if-match'];
  if (ifMatch && ifMatch.replace(/"/g, '') !== String(object.metadata.etag).replace(/"/g, '')) {
    if (object.content) object.content.destroy();
    stats.copiesRefused++;
    throw new S3Error('PreconditionFailed', 'At least one of the pre-conditions you specified did not hold', { Condition: 'x-amz-copy-source-If-Match' });
  }
  const { md5 } = await ctx.store.putPart(ctx.params.bucket, ctx.query.uploadId, ctx.query.partNumber, object.content);
  ctx.body = { CopyPartResult: { LastModified: new Date().toISOString(), ETag: JSON.stringify(md5) } };
};

const { initiateMultipartUpload } = objectCtrl;
objectCtrl.initiateMultipartUpload = async function (ctx) {
  if (hook && hook.on === 'create' && hook.bucket === ctx.params.bucket && hook.key === ctx.params.key) await fire(ctx);
  return initiateMultipartUpload.call(this, ctx);
};
const { getObject: getObjectCtrl } = objectCtrl;
objectCtrl.getObject = async function (ctx) {
  if (hook && hook.on === 'head' && ctx.method === 'HEAD' && hook.bucket === ctx.params.bucket && hook.key === ctx.params.key && hook.copies >= hook.nth) await fire(ctx);
  return getObjectCtrl.call(this, ctx);
};

require(${JSON.stringify(binPath)});
`;

export interface S3rver {
  /** `http://127.0.0.1:<port>`, for path-style requests. */
  endpoint: string;
  /**
   * Request bodies uploaded so far (PutObject and UploadPart, all buckets), UploadPartCopy
   * requests, and those of them refused for a changed (412) or missing (404) source.
   */
  stats(): Promise<{ uploadedBytes: number; copiedParts: number; copiesRefused: number; copiesMissing: number }>;
  /**
   * Arms a race, fired once: `key` is replaced by a copy of `from`, or has its byte at `rot`
   * flipped in place (ETag kept), or else is deleted, just before the `nth` UploadPartCopy from
   * it is served (`on: 'copy'`), just before the first HEAD of it once `nth` such copies were
   * served (`on: 'head'`: the stat before a complete), or as a multipart upload to it starts
   * (`on: 'create'`).
   */
  arm(race: { bucket: string; key: string; from?: string; rot?: number; on: 'copy' | 'head' | 'create'; nth?: number }): Promise<void>;
  server: ServerProcess;
  /** A raw client on the server, for setup behind the driver's back. */
  client: S3Client;
  /** Where s3rver keeps its files (`<bucket>/<key>._S3rver_object`), for bit rot planted behind its back. */
  dataDir: string;
  /** Driver options for this server (credentials passed explicitly, never via process.env). */
  driverOptions(bucket: string): S3DriverOptions;
  /** A new, empty bucket; returns its name. */
  bucket(): Promise<string>;
  stop(): Promise<void>;
}

/**
 * Starts s3rver as a child process on a free loopback port, storing in a temp dir. With
 * `uploadPartCopy: false` it answers UploadPartCopy NotImplemented, as plain s3rver does.
 */
export async function startS3rver(opts: { uploadPartCopy?: boolean } = {}): Promise<S3rver> {
  const port = await freePort();
  const dir = await tempDir('stevedore-s3rver-');
  let server: ServerProcess;
  try {
    const shim = join(dir.path, 's3rver-fixed.cjs');
    await writeFile(shim, S3RVER_SHIM(
      require.resolve('s3rver/lib/stores/filesystem.js'), require.resolve('s3rver/bin/s3rver.js'),
      require.resolve('s3rver/lib/controllers/object.js'), require.resolve('s3rver/lib/models/error.js'), opts.uploadPartCopy ?? true,
    ));
    await mkdir(join(dir.path, 'data'));
    server = await startServerProcess({
      command: process.execPath,
      args: [shim, '-d', join(dir.path, 'data'), '-a', '127.0.0.1', '-p', String(port), '--silent', '--no-vhost-buckets'],
      port,
      // s3rver's continuation tokens use DES, which OpenSSL 3 keeps in its legacy provider.
      env: { NODE_OPTIONS: '--openssl-legacy-provider' },
    });
  } catch (err) {
    await dir.remove();
    throw err;
  }
  const endpoint = `http://127.0.0.1:${port}`;
  const driverOptions = (bucket: string): S3DriverOptions => ({
    bucket, endpoint, region: 'us-east-1', forcePathStyle: true, credentials: S3RVER_CREDENTIALS,
    // s3rver ignores If-None-Match on writes, so the Bucket must check first. Checksums stay at the
    // SDK's default, as in production: s3rver would store aws-chunked framing as content, but the
    // driver sends every part as a Buffer, whose checksum travels in a header.
    conditionalWrites: false,
  });
  const client = new S3Client({
    endpoint, region: 'us-east-1', forcePathStyle: true, credentials: S3RVER_CREDENTIALS, maxAttempts: 1,
    requestChecksumCalculation: 'WHEN_REQUIRED', responseChecksumValidation: 'WHEN_REQUIRED',
  });
  return {
    endpoint,
    async stats() {
      const res = await fetch(`${endpoint}/__shim/stats`);
      return (await res.json()) as { uploadedBytes: number; copiedParts: number; copiesRefused: number; copiesMissing: number };
    },
    async arm(race) {
      const q = new URLSearchParams({
        bucket: race.bucket, key: race.key, on: race.on, nth: String(race.nth ?? 0), ...(race.from ? { from: race.from } : {}), ...(race.rot !== undefined ? { rot: String(race.rot) } : {}),
      });
      const res = await fetch(`${endpoint}/__shim/arm?${q}`);
      if (!res.ok) throw new Error(`arming the shim failed: ${res.status}`);
    },
    server,
    client,
    dataDir: join(dir.path, 'data'),
    driverOptions,
    async bucket() {
      const name = `t-${randomUUID()}`;
      await client.send(new CreateBucketCommand({ Bucket: name }));
      return name;
    },
    async stop() {
      client.destroy();
      await server.stop();
      await dir.remove();
    },
  };
}

export interface S3Target extends ConformanceTarget {
  /** The emulator behind the target, started on first use. */
  s3rver(): Promise<S3rver>;
  /** A driver on a new, empty bucket of the same emulator. */
  newDriver(opts?: Partial<S3DriverOptions>): Promise<S3Driver>;
}

/**
 * The S3 conformance target. Parts of S3's minimum 5 MiB make the suite's larger-than-threshold
 * objects go multipart. s3rver starts on first use, so a failure to start fails the tests that
 * need it (never a skip).
 */
export function s3ConformanceTarget(opts: { partSize?: number } = {}): S3Target {
  const partSize = opts.partSize ?? 5 * 1024 * 1024;
  let started: Promise<S3rver> | undefined;
  let shared: Promise<string> | undefined;
  const s3rver = () => (started ??= startS3rver());
  // One bucket for every driver() and corrupt(): the suite gives each test its own key prefix.
  const sharedBucket = () => (shared ??= s3rver().then((s) => s.bucket()));
  const drivers = new Set<S3Driver>();
  const newDriver = async (extra: Partial<S3DriverOptions> = {}) => {
    const s = await s3rver();
    const bucket = extra.bucket ?? (await s.bucket());
    // A single PutObject only up to a part, so objects over the threshold go multipart.
    const d = new S3Driver({ ...s.driverOptions(bucket), partSize, singlePutSize: partSize, maxAttempts: 2, ...extra, bucket });
    drivers.add(d);
    return d;
  };
  return {
    name: 's3',
    // The suite's shim adds the server-side copy the emulator lacks.
    splices: true,
    multipartThreshold: partSize,
    // s3rver names files `<segment>._S3rver_metadata.json` and `<segment>._S3rver_object`, and the
    // shim above writes them first as `<that>.tmp-<uuid>`: about 63 of the file system's 255 bytes.
    emulatorSegmentLimit: 190,
    s3rver,
    newDriver,
    async driver() {
      return newDriver({ bucket: await sharedBucket() });
    },
    async corrupt(storeKey, bytes) {
      const s = await s3rver();
      const Bucket = await sharedBucket();
      const head = await s.client.send(new HeadObjectCommand({ Bucket, Key: storeKey }));
      // Rewriting through a raw client keeps the old digest while the bytes change, as bit rot would.
      await s.client.send(new PutObjectCommand({ Bucket, Key: storeKey, Body: bytes, Metadata: head.Metadata, ContentType: head.ContentType }));
    },
    async teardown() {
      const s = started;
      started = undefined;
      shared = undefined;
      await Promise.all([...drivers].map((d) => d.close()));
      drivers.clear();
      // A start that failed has already failed the tests; it must not also hide their errors here.
      await s?.then((x) => x.stop(), () => {});
    },
  };
}
