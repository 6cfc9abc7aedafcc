import { ErrorCode, StorageError } from '../errors.js';
import type { Bucket } from './bucket.js';
import type { ObjectInfo } from './driver.js';
import { validateSha256 } from './keys.js';

export interface CopyObjectOptions {
  /** Fail with PreconditionFailed when the destination key already exists. */
  ifAbsent?: boolean | undefined;
  /** Replace only the destination version whose `etag` is this. */
  ifMatch?: string | undefined;
  signal?: AbortSignal | undefined;
  /** Called with the bytes copied so far. */
  progress?: ((bytes: number) => void) | undefined;
  /** Expected SHA-256 of the source (a caller's own record), checked in the same pass as the recorded one. */
  sha256?: string | undefined;
}

export interface CopyObjectResult extends ObjectInfo {
  /** The destination's digest, as recorded there. */
  sha256: string;
  /**
   * True when the bytes were checked against a digest known before the copy (the source's
   * recorded one, or `sha256`); false when the source had none and the digest was computed while
   * copying (decision 12).
   */
  verified: boolean;
}

/**
 * Copies `srcKey` of `src` to `dstKey` of `dst`, whatever the two backends, keeping content type
 * and user metadata, and never leaving a destination that reads as good unless its bytes are the
 * source's, checked.
 *
 * Between two drivers the bytes stream from a full read of the source into a put whose expected
 * digest is the source's, which hashes and checks them (once: the read only counts them): a
 * rotten source fails ChecksumMismatch before the destination object becomes visible (the put
 * stores nothing). A source without a recorded digest is hashed on
 * the way and arrives with it (digest-first stores spool it, as any put of unknown digest).
 *
 * On one driver instance the copy is server-side (no bytes are written through the worker), after
 * a read that checks the source against its digest, so a rotten source is refused here too rather
 * than copied with a digest its bytes fail. A source without a digest streams instead, so that
 * the destination gets one.
 */
export async function copyObject(src: Bucket, srcKey: string, dst: Bucket, dstKey: string, opts: CopyObjectOptions = {}): Promise<CopyObjectResult> {
  if (src.driver === dst.driver) {
    const info = await src.stat(srcKey);
    if (info.sha256 !== undefined) {
      const checked = await readVerified(src, srcKey, opts);
      const out = await dst.copyFrom(src, srcKey, dstKey, { ifAbsent: opts.ifAbsent, ifMatch: opts.ifMatch });
      // Replaced between the check and the copy: the destination is a whole version with its own
      // recorded digest, but not the one checked.
      return { ...out, sha256: out.sha256 ?? checked, verified: out.sha256 === checked };
    }
  }
  // Hashed once, by the put: it checks every byte against the digest before the destination
  // object becomes visible (and the size the read announced), so the read only counts them; a
  // second SHA-256 on the way out would judge the same bytes again.
  const asked = validateSha256(opts.sha256);
  const got = await src.get(srcKey, { signal: opts.signal, partsChecked: true });
  if (asked !== undefined && got.info.sha256 !== undefined && asked !== got.info.sha256) {
    got.stream.destroy();
    throw new StorageError(ErrorCode.ChecksumMismatch, `stored sha256 ${got.info.sha256} is not the expected ${asked}`, { op: 'get', key: srcKey });
  }
  const expected = got.info.sha256 ?? asked;
  const out = await dst.put(dstKey, got.stream, {
    sha256: expected, contentType: got.info.contentType, metadata: got.info.metadata,
    ifAbsent: opts.ifAbsent, ifMatch: opts.ifMatch, signal: opts.signal, progress: opts.progress, size: got.info.size,
  });
  if (out.sha256 === undefined) throw new StorageError(ErrorCode.Unknown, 'the destination reported no digest', { op: 'copy', key: dstKey });
  // Verified means checked against a digest the source recorded: a caller's sha256 alone is not that.
  return { ...out, sha256: out.sha256, verified: got.info.sha256 !== undefined };
}

/** Reads the whole object, checked against its recorded digest (and `sha256`), and returns that digest. */
async function readVerified(b: Bucket, key: string, opts: CopyObjectOptions): Promise<string> {
  const got = await b.get(key, { signal: opts.signal, sha256: opts.sha256, progress: opts.progress });
  for await (const _ of got.stream) { /* hashed and checked as it flows */ }
  return got.digest().sha256;
}
