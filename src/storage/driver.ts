import type { Readable } from 'node:stream';
import type { ErrorCode } from '../errors.js';
import type { OpenFile } from './body.js';

/** What a backend knows about one stored object. */
export interface ObjectInfo {
  key: string;
  size: number;
  /** SHA-256 (hex) recorded when the object was written; undefined for objects written by other tools. */
  sha256: string | undefined;
  /** Backend version tag: S3/Azure ETag, GCS generation, filesystem mtime+size+inode. */
  etag: string | undefined;
  contentType: string | undefined;
  /** User metadata (lower-case names); never includes the reserved `sha256`. */
  metadata: Record<string, string>;
  modified: Date;
}

/**
 * The bytes a driver must store, already wrapped by the Bucket: it hashes what flows and, when an
 * expected digest is known, fails at the end (before the driver can commit) if the bytes do not
 * match. A driver must therefore never make an object visible unless the bytes ended without
 * error. It takes them one of two ways, never both: `stream`, or `read` into its own buffers.
 */
export interface PutBody {
  /** The bytes as a stream; errors at its end with ChecksumMismatch on a mismatch. */
  readonly stream: Readable;
  /**
   * Pulls the next bytes into `buf` and resolves with their count; 0 once every byte has been
   * read and matched, or rejects with ChecksumMismatch. Calls must not overlap. Lets a driver reuse
   * a few buffers instead of receiving a fresh one per chunk.
   */
  read(buf: Buffer): Promise<number>;
  /**
   * The digest, when known before the first byte (given by the caller, or the source was hashed
   * first). Always set for drivers whose `metadataAtEnd` is false.
   */
  sha256: string | undefined;
  /** Exact size in bytes when known in advance (lets SDKs pick single-shot uploads). */
  size: number | undefined;
  /** Digest and size of what flowed. Valid only once `stream` has ended; throws before. */
  digest(): { sha256: string; size: number };
}

export interface DriverPutOptions {
  contentType: string | undefined;
  /** Validated user metadata; the driver stores `sha256` beside it under the reserved name. */
  metadata: Record<string, string>;
  /** Fail with PreconditionFailed if the key already exists (atomically where the store can). */
  ifAbsent: boolean;
  /**
   * Replace only the version whose `etag` is this (S3 `If-Match`, GCS `ifGenerationMatch`, Azure
   * `If-Match`, the filesystem by its own means): PreconditionFailed when the object moved on or is
   * gone. Atomic where `atomicIfMatch` is true; otherwise the Bucket checks with a stat first.
   */
  ifMatch?: string | undefined;
  signal: AbortSignal | undefined;
  /**
   * Set when the body is the whole of this local file and its producer gave the file up (a store
   * payload's `source.consume`): a driver on the same filesystem may take the file's inode for the
   * object instead of copying its bytes, but must still read the body through (the digest and size
   * checks run there). Other drivers ignore it and copy.
   */
  consumable?: OpenFile | undefined;
}

export interface DriverDeleteOptions {
  /** Delete only the version whose `etag` is this; PreconditionFailed when it moved on (a missing key still succeeds). */
  ifMatch?: string | undefined;
}

export interface ByteRange {
  /** First byte, inclusive. */
  start: number;
  /** Last byte, inclusive; undefined reads to the end. */
  end?: number | undefined;
}

export interface DriverGetResult {
  stream: Readable;
  /** The object's info as of this read (from the same response where the store allows). */
  info: ObjectInfo;
}

/**
 * One piece of an object `splice` assembles: a range of the version being replaced (copied by the
 * store), or bytes the caller sends.
 */
export type SplicePiece = { copy: { offset: number; length: number } } | { bytes: Buffer };

/** A range of the version being replaced whose bytes the caller read and checked against this digest. */
export interface CheckedRange {
  offset: number;
  length: number;
  sha256: string;
}

export interface DriverSpliceOptions {
  /**
   * The version being replaced, whose ranges `copy` pieces name: each copy is conditional on it
   * (S3 `x-amz-copy-source-if-match`), and so is the commit where the store enforces `If-Match`;
   * where it does not (`atomicIfMatch` false), the driver stats the version right before its commit.
   */
  ifMatch: string;
  /** Digest and size of the assembled object, worked out by the caller before the first request. */
  sha256: string;
  size: number;
  /**
   * Ranges of that version the caller hashed (sorted, not overlapping), covering every `copy`
   * piece: old bytes a driver sends rather than copies are read as whole such ranges and checked
   * against them, so what it sends is what the digest was computed over.
   */
  checked: readonly CheckedRange[];
  contentType: string | undefined;
  metadata: Record<string, string>;
  signal: AbortSignal | undefined;
  /** Told of a failure that is not the splice's, such as an upload left unaborted. */
  warn?: ((message: string, err: unknown) => void) | undefined;
}

export interface ListPage {
  objects: ObjectInfo[];
  /** Opaque token for the next page; undefined on the last page. */
  next: string | undefined;
}

/**
 * One storage backend, kept small and dumb (the go-cloud `driver.Bucket` split): the portable
 * `Bucket` validates keys, hashes, verifies and wraps errors; a driver only moves bytes and maps
 * its SDK's errors to codes.
 */
export interface Driver {
  /** `file`, `memory`, `s3`, `gs`, `azblob`. */
  readonly kind: string;
  /**
   * True when the driver can record the digest after the bytes have flowed (filesystem sidecar,
   * Azure commit-time metadata). When false, the Bucket works the digest out first.
   */
  readonly metadataAtEnd: boolean;
  /**
   * Where `metadataAtEnd` is false: bodies of known size up to this many bytes may still come
   * without their digest, which the driver works out before it commits them (S3 holds such a body
   * whole and sends one PutObject once it is read and hashed). Unset: none.
   */
  readonly digestAtEndUpTo?: number | undefined;
  /** True when `ifAbsent` is enforced atomically by the store itself. */
  readonly atomicIfAbsent: boolean;
  /** True when `ifMatch` (put and delete) is enforced atomically by the store itself. */
  readonly atomicIfMatch: boolean;
  /** True when `list` returns each object's recorded `sha256`; when false (S3) the Bucket stats each object if asked for digests. */
  readonly listHasDigest: boolean;

  put(key: string, body: PutBody, opts: DriverPutOptions): Promise<ObjectInfo>;
  get(key: string, range: ByteRange | undefined, signal: AbortSignal | undefined): Promise<DriverGetResult>;
  stat(key: string): Promise<ObjectInfo>;
  /**
   * Objects whose key starts with `prefix` (a plain string prefix), in UTF-8 byte order of key,
   * each with its etag (or generation), size and modification time on every backend.
   */
  list(prefix: string, pageToken: string | undefined, pageSize: number): Promise<ListPage>;
  /** Deleting a missing key succeeds (object-store semantics). */
  delete(key: string, opts?: DriverDeleteOptions): Promise<void>;
  /** Server-side copy within this backend, metadata (including the digest) included. */
  copy(src: string, dst: string, opts: { ifAbsent: boolean; ifMatch?: string | undefined }): Promise<ObjectInfo>;
  /**
   * Replaces `key` with an object assembled from ranges of its current version and new bytes,
   * the ranges copied inside the store (S3 UploadPartCopy, Azure Put Block From URL): only the new bytes, and what the
   * store's part rules make it pad them with, pass through the worker. Only drivers whose store
   * has such a copy define it. Resolves undefined, with nothing written, when it cannot: the
   * store answered that it has no such copy (`spliceable` is false from then on), or these pieces
   * would break the store's limits (S3's 10,000 parts, Azure's 50,000 blocks).
   */
  splice?(key: string, pieces: readonly SplicePiece[], opts: DriverSpliceOptions): Promise<ObjectInfo | undefined>;
  /** Whether `splice` is worth calling: false when configured off or once the store refused it. */
  readonly spliceable?: boolean;
  /**
   * With `splice`: the most old bytes a splice sends beside the new ones (the store's part rules
   * make it pad them), when old bytes follow `stretches` stretches of new bytes.
   */
  spliceOverhead?(stretches: number): number;
  /** Throws when the backend cannot be reached or used. */
  health(): Promise<void>;
  /** Maps an SDK-specific error to a code; undefined falls back to the common mapping. */
  classify(err: unknown): ErrorCode | undefined;
  /**
   * Removes what killed writers left behind (temp files older than `maxAgeMs`, orphaned metadata)
   * and returns how many it removed; only drivers that leave such things have it (the filesystem).
   */
  sweep?(maxAgeMs?: number): Promise<number>;
  /** Releases clients and sockets. */
  close(): Promise<void>;
}

/** Name of the metadata entry that holds the SHA-256 on every backend. */
export const SHA256_META = 'sha256';
