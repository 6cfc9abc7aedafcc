import { createHash, randomUUID, type Hash } from 'node:crypto';
import { mkdir, rename, rm, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

/**
 * The storage model behind the fake GCS server: buckets and object metadata in memory, object
 * bytes in files under a temp directory (never in memory), generations, preconditions, listing.
 */

/** An error the server answers with GCS's JSON error body. */
export class GcsHttpError extends Error {
  constructor(readonly status: number, readonly reason: string, message: string) {
    super(message);
  }
}

export const notFound = (what: string) => new GcsHttpError(404, 'notFound', `No such object: ${what}`);
export const badRequest = (message: string, reason = 'invalid') => new GcsHttpError(400, reason, message);
const conditionNotMet = () =>
  new GcsHttpError(412, 'conditionNotMet', 'At least one of the pre-conditions you specified did not hold.');

// Castagnoli polynomial, reflected. Written by hand because the server must not share the
// client's implementation: a bug there would otherwise validate itself.
const CRC32C_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/** CRC32C of `buf`, continuing from `crc` (the value over the bytes before it). */
export function crc32c(buf: Uint8Array, crc = 0): number {
  let c = ~crc >>> 0;
  for (let i = 0; i < buf.length; i++) c = CRC32C_TABLE[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return ~c >>> 0;
}

/** GCS's wire form of a CRC32C: the big-endian 4 bytes, base64. */
export function crc32cBase64(crc: number): string {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(crc >>> 0);
  return b.toString('base64');
}

export interface Hashes {
  size: number;
  md5Hash: string;
  crc32c: string;
}

/** md5 + crc32c + size over bytes appended in order; `fork` snapshots it (resumable checkpoints). */
export class RunningHash {
  constructor(private md5: Hash = createHash('md5'), private crc = 0, public size = 0) {}
  update(buf: Uint8Array): void {
    this.md5.update(buf);
    this.crc = crc32c(buf, this.crc);
    this.size += buf.length;
  }
  fork(): RunningHash {
    return new RunningHash(this.md5.copy(), this.crc, this.size);
  }
  result(): Hashes {
    return { size: this.size, md5Hash: this.md5.copy().digest('base64'), crc32c: crc32cBase64(this.crc) };
  }
}

export interface Preconditions {
  ifGenerationMatch?: number;
  ifGenerationNotMatch?: number;
  ifMetagenerationMatch?: number;
  ifMetagenerationNotMatch?: number;
}

const PRECONDITIONS = ['ifGenerationMatch', 'ifGenerationNotMatch', 'ifMetagenerationMatch', 'ifMetagenerationNotMatch'] as const;

/** Preconditions from query parameters; `source` reads the `ifSource...` forms of rewrite/copy. */
export function preconditionsFrom(q: URLSearchParams, source = false): Preconditions {
  const out: Preconditions = {};
  for (const name of PRECONDITIONS) {
    const param = source ? name.replace(/^if/, 'ifSource') : name;
    const raw = q.get(param);
    if (raw === null) continue;
    if (!/^\d+$/.test(raw)) throw badRequest(`Invalid value for ${param}: ${raw}`);
    out[name] = Number(raw);
  }
  return out;
}

/** Object metadata the client may set (insert body, patch, rewrite destination). */
export interface WritableMeta {
  contentType?: string | undefined;
  metadata: Record<string, string>;
  /** cacheControl, contentDisposition, contentEncoding, contentLanguage: kept and echoed. */
  extra: Record<string, string>;
}

const EXTRA_FIELDS = ['cacheControl', 'contentDisposition', 'contentEncoding', 'contentLanguage'] as const;

/** Reads object metadata from a JSON resource; `base` is what a patch starts from. */
export function writableMeta(body: Record<string, unknown>, base?: WritableMeta): WritableMeta {
  const out: WritableMeta = base
    ? { contentType: base.contentType, metadata: { ...base.metadata }, extra: { ...base.extra } }
    : { metadata: {}, extra: {} };
  if ('contentType' in body) out.contentType = body.contentType == null ? undefined : String(body.contentType);
  for (const f of EXTRA_FIELDS) {
    if (!(f in body)) continue;
    if (body[f] == null) delete out.extra[f];
    else out.extra[f] = String(body[f]);
  }
  if (body.metadata === null) out.metadata = {};
  else if (body.metadata !== undefined) {
    if (typeof body.metadata !== 'object' || Array.isArray(body.metadata)) throw badRequest('metadata must be an object');
    // Patch semantics: a null value removes the key.
    for (const [k, v] of Object.entries(body.metadata as Record<string, unknown>)) {
      if (v === null) delete out.metadata[k];
      else out.metadata[k] = typeof v === 'string' ? v : JSON.stringify(v);
    }
  }
  return out;
}

export interface StoredObject extends WritableMeta, Hashes {
  bucket: string;
  name: string;
  generation: number;
  metageneration: number;
  path: string;
  timeCreated: Date;
  updated: Date;
  /** Composite objects carry no md5Hash, like real GCS. */
  componentCount?: number | undefined;
  /** Reads opened or about to open the file: replaced files are unlinked only once this drops to 0. */
  readers: number;
  dead: boolean;
}

interface BucketRecord {
  name: string;
  created: Date;
  objects: Map<string, StoredObject>;
}

export function validateObjectName(name: string): void {
  const bytes = Buffer.byteLength(name);
  if (bytes === 0 || bytes > 1024) throw badRequest('The object name must be 1-1024 bytes of UTF-8.', 'invalid');
  if (/[\r\n]/.test(name) || name === '.' || name === '..') throw badRequest(`Invalid object name: ${JSON.stringify(name)}`);
}

export class FakeGcsStore {
  private readonly buckets = new Map<string, BucketRecord>();
  private lastGeneration = 0;

  constructor(readonly root: string) {}

  async init(): Promise<void> {
    await mkdir(join(this.root, 'objects'), { recursive: true });
    await mkdir(join(this.root, 'uploads'), { recursive: true });
  }

  createBucket(name: string): BucketRecord {
    if (!/^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$/.test(name)) throw badRequest(`Invalid bucket name: '${name}'`);
    if (this.buckets.has(name)) {
      throw new GcsHttpError(409, 'conflict', 'Your previous request to create the named bucket succeeded and you already own it.');
    }
    const rec = { name, created: new Date(), objects: new Map<string, StoredObject>() };
    this.buckets.set(name, rec);
    return rec;
  }

  bucket(name: string): BucketRecord {
    const b = this.buckets.get(name);
    if (!b) throw new GcsHttpError(404, 'notFound', 'The specified bucket does not exist.');
    return b;
  }

  deleteBucket(name: string): void {
    if (this.bucket(name).objects.size > 0) throw new GcsHttpError(409, 'conflict', 'The bucket you tried to delete is not empty.');
    this.buckets.delete(name);
  }

  /** Microsecond timestamps like real generations, strictly increasing, safe as JS numbers. */
  nextGeneration(): number {
    this.lastGeneration = Math.max(this.lastGeneration + 1, Date.now() * 1000);
    return this.lastGeneration;
  }

  tempPath(kind: 'objects' | 'uploads' = 'objects'): string {
    return join(this.root, kind, randomUUID());
  }

  /** The live object, or 404; a `generation` other than the live one is 404 too (no versioning). */
  lookup(bucket: string, name: string, generation?: string | null): StoredObject {
    const obj = this.bucket(bucket).objects.get(name);
    if (!obj || (generation != null && generation !== String(obj.generation))) {
      throw notFound(`${bucket}/${name}${generation != null ? `#${generation}` : ''}`);
    }
    return obj;
  }

  peek(bucket: string, name: string): StoredObject | undefined {
    return this.bucket(bucket).objects.get(name);
  }

  /** Throws 412 unless `pre` holds against `obj` (undefined = no live object). */
  check(obj: StoredObject | undefined, pre: Preconditions): void {
    const gen = obj?.generation ?? 0;
    if (pre.ifGenerationMatch !== undefined && pre.ifGenerationMatch !== gen) throw conditionNotMet();
    if (pre.ifGenerationNotMatch !== undefined && (!obj || pre.ifGenerationNotMatch === gen)) throw conditionNotMet();
    if (pre.ifMetagenerationMatch !== undefined && (!obj || pre.ifMetagenerationMatch !== obj.metageneration)) throw conditionNotMet();
    if (pre.ifMetagenerationNotMatch !== undefined && (!obj || pre.ifMetagenerationNotMatch === obj.metageneration)) throw conditionNotMet();
  }

  /**
   * Makes the bytes in `tmpPath` the live object, atomically with respect to preconditions: the
   * file is moved first, then the check and the swap happen with no await between them.
   */
  async commit(bucket: string, name: string, tmpPath: string, hashes: Hashes, meta: WritableMeta, pre: Preconditions,
    composite?: number): Promise<StoredObject> {
    validateObjectName(name);
    this.bucket(bucket);
    const path = this.tempPath('objects');
    await rename(tmpPath, path);
    const b = this.buckets.get(bucket);
    try {
      if (!b) throw new GcsHttpError(404, 'notFound', 'The specified bucket does not exist.');
      this.check(b.objects.get(name), pre);
    } catch (err) {
      await rm(path, { force: true });
      throw err;
    }
    const now = new Date();
    const obj: StoredObject = {
      bucket, name, path, generation: this.nextGeneration(), metageneration: 1, timeCreated: now, updated: now,
      ...hashes, md5Hash: composite === undefined ? hashes.md5Hash : '', componentCount: composite,
      contentType: meta.contentType, metadata: { ...meta.metadata }, extra: { ...meta.extra }, readers: 0, dead: false,
    };
    this.retire(b.objects.get(name));
    b.objects.set(name, obj);
    return obj;
  }

  remove(bucket: string, name: string, generation: string | null, pre: Preconditions): void {
    const obj = this.lookup(bucket, name, generation);
    this.check(obj, pre);
    this.bucket(bucket).objects.delete(name);
    this.retire(obj);
  }

  patch(bucket: string, name: string, generation: string | null, pre: Preconditions, body: Record<string, unknown>, replace: boolean): StoredObject {
    const obj = this.lookup(bucket, name, generation);
    this.check(obj, pre);
    const meta = writableMeta(body, replace ? undefined : obj);
    Object.assign(obj, meta, { metageneration: obj.metageneration + 1, updated: new Date() });
    return obj;
  }

  /** Pins the object's file for a read that opens it later; `release` when the read is done. */
  pin(obj: StoredObject): () => void {
    obj.readers++;
    let done = false;
    return () => {
      if (done) return;
      done = true;
      obj.readers--;
      if (obj.dead && obj.readers === 0) void unlink(obj.path).catch(() => {});
    };
  }

  /** Test hook: replaces the stored bytes, keeping size, hashes and generation (bit rot). */
  async corrupt(bucket: string, name: string, bytes: Uint8Array): Promise<void> {
    const obj = this.lookup(bucket, name);
    const path = this.tempPath('objects');
    await writeFile(path, bytes);
    const old = { ...obj };
    obj.path = path;
    this.retire(old);
  }

  private retire(obj: StoredObject | undefined): void {
    if (!obj) return;
    obj.dead = true;
    if (obj.readers === 0) void unlink(obj.path).catch(() => {});
  }

  resource(obj: StoredObject, endpoint: string): Record<string, unknown> {
    const enc = encodeURIComponent(obj.name);
    const res: Record<string, unknown> = {
      kind: 'storage#object',
      id: `${obj.bucket}/${obj.name}/${obj.generation}`,
      selfLink: `${endpoint}/storage/v1/b/${obj.bucket}/o/${enc}`,
      mediaLink: `${endpoint}/download/storage/v1/b/${obj.bucket}/o/${enc}?generation=${obj.generation}&alt=media`,
      name: obj.name,
      bucket: obj.bucket,
      generation: String(obj.generation),
      metageneration: String(obj.metageneration),
      contentType: obj.contentType,
      storageClass: 'STANDARD',
      size: String(obj.size),
      crc32c: obj.crc32c,
      etag: Buffer.from(`${obj.generation}/${obj.metageneration}`).toString('base64'),
      timeCreated: obj.timeCreated.toISOString(),
      updated: obj.updated.toISOString(),
      timeStorageClassUpdated: obj.timeCreated.toISOString(),
      ...obj.extra,
    };
    if (obj.md5Hash) res.md5Hash = obj.md5Hash;
    if (obj.componentCount !== undefined) res.componentCount = obj.componentCount;
    if (Object.keys(obj.metadata).length > 0) res.metadata = { ...obj.metadata };
    return res;
  }

  /** objects.list: UTF-8 byte order, delimiter prefixes, offsets, and an opaque page token. */
  list(bucket: string, q: URLSearchParams): { items: StoredObject[]; prefixes: string[]; nextPageToken?: string } {
    const b = this.bucket(bucket);
    const prefix = q.get('prefix') ?? '';
    const delimiter = q.get('delimiter') ?? '';
    const trailing = q.get('includeTrailingDelimiter') === 'true';
    const startOffset = q.get('startOffset');
    const endOffset = q.get('endOffset');
    const maxRaw = q.get('maxResults');
    if (maxRaw !== null && !/^\d+$/.test(maxRaw)) throw badRequest(`Invalid value for maxResults: ${maxRaw}`);
    const max = Math.min(maxRaw === null || maxRaw === '0' ? 1000 : Number(maxRaw), 1000);
    const token = decodeToken(q.get('pageToken'));
    const cmp = (a: string, c: string) => Buffer.compare(Buffer.from(a), Buffer.from(c));
    const names = [...b.objects.keys()].filter((n) => n.startsWith(prefix)).sort(cmp);
    const items: StoredObject[] = [];
    const prefixes: string[] = [];
    let last: { after: string; skip?: string } | undefined;
    for (const name of names) {
      if (startOffset !== null && cmp(name, startOffset) < 0) continue;
      if (endOffset !== null && cmp(name, endOffset) >= 0) continue;
      if (token && (cmp(name, token.after) <= 0 || (token.skip !== undefined && name.startsWith(token.skip)))) continue;
      if (last?.skip !== undefined && name.startsWith(last.skip)) continue;
      if (items.length + prefixes.length >= max) {
        return { items, prefixes, nextPageToken: encodeToken(last!) };
      }
      const cut = delimiter ? name.indexOf(delimiter, prefix.length) : -1;
      if (cut >= 0) {
        const p = name.slice(0, cut + delimiter.length);
        prefixes.push(p);
        last = { after: name, skip: p };
        // With includeTrailingDelimiter an object named exactly like the prefix is listed too.
        if (trailing && name === p) items.push(b.objects.get(name)!);
      } else {
        items.push(b.objects.get(name)!);
        last = { after: name };
      }
    }
    return { items, prefixes };
  }
}

function encodeToken(t: { after: string; skip?: string }): string {
  return Buffer.from(JSON.stringify(t)).toString('base64url');
}

function decodeToken(raw: string | null): { after: string; skip?: string } | undefined {
  if (!raw) return undefined;
  try {
    const t = JSON.parse(Buffer.from(raw, 'base64url').toString()) as { after?: unknown; skip?: unknown };
    if (typeof t.after === 'string' && (t.skip === undefined || typeof t.skip === 'string')) {
      return t.skip === undefined ? { after: t.after } : { after: t.after, skip: t.skip };
    }
  } catch { /* fall through */ }
  throw badRequest('Invalid page token.', 'invalidParameter');
}
