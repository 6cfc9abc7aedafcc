import { randomUUID } from 'node:crypto';
import { BlobSASPermissions, StorageSharedKeyCredential, type BlockBlobClient } from '@azure/storage-blob';
import type { DriverSpliceOptions, ObjectInfo, SplicePiece } from '../storage/driver.js';
import { SHA256_META } from '../storage/driver.js';
import { inLanes } from '../storage/lanes.js';

/** Azure commits at most this many blocks into one blob. */
export const MAX_BLOCKS = 50_000;
/**
 * Each block of a splice is at most this: Put Block From URL takes up to 100 MiB a block on
 * service versions before 2019-12-12 (4000 MiB since), and a long copied run then goes as
 * several blocks copied at once rather than one long request.
 */
export const MAX_BLOCK = 100 * 1024 * 1024;
/** How long the source URL's SAS is valid: the splice's requests are all made well within it. */
const SAS_LIFETIME_MS = 60 * 60 * 1000;

const pieceLength = (p: SplicePiece): number => ('copy' in p ? p.copy.length : p.bytes.length);

/**
 * The blocks of a splice: each piece as is, or cut into near-equal blocks of at most `maxBlock`.
 * Azure blocks have no minimum size, so a copied range of any length is copied, never sent.
 * Undefined past Azure's 50,000 blocks (the object is then written whole).
 */
export function planBlocks(pieces: readonly SplicePiece[], maxBlock = MAX_BLOCK): SplicePiece[] | undefined {
  const blocks: SplicePiece[] = [];
  for (const p of pieces) {
    const length = pieceLength(p);
    const count = Math.ceil(length / maxBlock);
    for (let i = 0, at = 0; i < count; i++) {
      const n = Math.floor(length / count) + (i < length % count ? 1 : 0);
      blocks.push('copy' in p ? { copy: { offset: p.copy.offset + at, length: n } } : { bytes: p.bytes.subarray(at, at + n) });
      at += n;
    }
    if (blocks.length > MAX_BLOCKS) return undefined;
  }
  return blocks;
}

/**
 * Whether the service can be let read a blob of this client's as a copy source: with an account
 * key (which signs a SAS) or a SAS connection string (whose token the blob's URL carries). A
 * token credential could (`x-ms-copy-source-authorization`), but the driver takes none.
 */
export function canAuthoriseSource(blob: BlockBlobClient): boolean {
  return blob.credential instanceof StorageSharedKeyCredential || new URL(blob.url).searchParams.has('sig');
}

/**
 * The URL by which the service reads `blob` as a copy source (see canAuthoriseSource): a
 * read-only SAS signed with the account key for an hour, or the blob's URL with its SAS.
 */
async function sourceUrl(blob: BlockBlobClient): Promise<string> {
  if (!(blob.credential instanceof StorageSharedKeyCredential)) return blob.url;
  return blob.generateSasUrl({ permissions: BlobSASPermissions.parse('r'), expiresOn: new Date(Date.now() + SAS_LIFETIME_MS) });
}

/**
 * The SDK's `stageBlockFromURL` drops source conditions (12.32 passes no `x-ms-source-if-match`),
 * while the protocol layer it calls, the operations generated from the REST spec, takes them:
 * the splice calls that layer. Undefined if a later SDK no longer has it where 12.32 does, which
 * turns splicing off rather than copying unconditionally.
 */
interface StageFromUrl {
  stageBlockFromURL(blockId: string, contentLength: number, sourceUrl: string, options: {
    sourceRange: string;
    sourceModifiedAccessConditions: { sourceIfMatch: string };
    abortSignal: AbortSignal | undefined;
  }): Promise<unknown>;
}
export function stageFromUrl(blob: BlockBlobClient): StageFromUrl | undefined {
  const layer = (blob as unknown as { blockBlobContext?: Partial<StageFromUrl> }).blockBlobContext;
  return typeof layer?.stageBlockFromURL === 'function' ? (layer as StageFromUrl) : undefined;
}

/** The store answered that it has no Put Block From URL (azurite: 501 APINotImplemented). */
export function notImplemented(err: unknown): boolean {
  const e = err as { name?: unknown; code?: unknown; statusCode?: unknown; details?: { errorCode?: unknown } } | null;
  if (e?.name !== 'RestError') return false;
  const code = e.details?.errorCode ?? e.code;
  return e.statusCode === 501 || code === 'NotImplemented' || code === 'APINotImplemented';
}

/**
 * A Put Block From URL refused for a reason of the store's, not of the source's: a client error
 * other than a failed source condition (412) or throttling (429), such as 403 or 404
 * CannotVerifyCopySource from a store that cannot read its own blob through the URL (a firewalled
 * account, an endpoint it cannot reach), while the blob is still there at the version the copy
 * named (a HEAD with If-Match). Such a store will refuse every splice: the edit is written whole.
 * A source that is gone or changed stays the caller's PreconditionFailed.
 */
async function cannotCopy(blob: BlockBlobClient, err: unknown, ifMatch: string): Promise<boolean> {
  const status = (err as { statusCode?: unknown } | null)?.statusCode;
  if (typeof status !== 'number' || status < 400 || status >= 500 || status === 412 || status === 429) return false;
  return blob.getProperties({ conditions: { ifMatch } }).then(() => true, () => false);
}

/**
 * Replaces `blob` by a block list: `blocks` (planBlocks) of copied ranges staged by Put Block
 * From URL from the blob itself (`x-ms-source-range`, `x-ms-source-if-match` on the version
 * replaced, through a read-only SAS: sourceUrl), those of new bytes by Put Block, a few at once; then Put
 * Block List with the caller's digest in the metadata and `If-Match` on that version, which Azure
 * enforces atomically. A source replaced meanwhile fails a copy (412 SourceConditionNotMet) or the
 * commit (412 ConditionNotMet), a deleted one a copy (404 CannotVerifyCopySource): never a mix of
 * two versions. Nothing to abort: blocks staged by a failed or refused splice stay uncommitted
 * until the blob's next commit discards them, or Azure's garbage collection after 7 days. Block
 * ids are a random prefix and the index, of the SDK's own id length (every block of a blob must
 * have ids of one length, and an interrupted upload may have left some). Undefined, nothing
 * committed, when the store has no Put Block From URL or cannot read the blob through it (cannotCopy).
 */
export async function spliceBlob(key: string, blob: BlockBlobClient, stage: StageFromUrl, blocks: readonly SplicePiece[], concurrency: number, opts: DriverSpliceOptions): Promise<ObjectInfo | undefined> {
  const signal = opts.signal;
  const source = await sourceUrl(blob);
  const prefix = randomUUID();
  // The SDK's generateBlockID: 48 characters (a UUID and the index), 64 once base64-encoded.
  const ids = blocks.map((_, i) => Buffer.from(prefix + String(i).padStart(12, '0')).toString('base64'));
  let next = 0;
  const copyFailures = new Set<unknown>();
  try {
    await inLanes(concurrency, async () => {
      if (next === blocks.length) return undefined;
      const i = next++;
      const b = blocks[i]!;
      if ('bytes' in b) return async () => { await blob.stageBlock(ids[i]!, b.bytes, b.bytes.length, { abortSignal: signal }); };
      return async () => {
        await stage.stageBlockFromURL(ids[i]!, 0, source, {
          sourceRange: `bytes=${b.copy.offset}-${b.copy.offset + b.copy.length - 1}`,
          sourceModifiedAccessConditions: { sourceIfMatch: opts.ifMatch },
          abortSignal: signal,
        }).catch((err: unknown) => { copyFailures.add(err); throw err; });
      };
    });
  } catch (err) {
    if (notImplemented(err)) return undefined;
    if (copyFailures.has(err) && await cannotCopy(blob, err, opts.ifMatch)) {
      opts.warn?.('the store refused to read the blob through Put Block From URL: edits are written whole from now on', err);
      return undefined;
    }
    throw err;
  }
  // A job that lost its lock meanwhile must not commit.
  signal?.throwIfAborted();
  const res = await blob.commitBlockList(ids, {
    metadata: { ...opts.metadata, [SHA256_META]: opts.sha256 },
    blobHTTPHeaders: opts.contentType === undefined ? {} : { blobContentType: opts.contentType },
    conditions: { ifMatch: opts.ifMatch },
    abortSignal: signal,
  });
  return {
    key, size: opts.size, sha256: opts.sha256, etag: res.etag, contentType: opts.contentType, metadata: { ...opts.metadata }, modified: res.lastModified ?? new Date(),
  };
}
