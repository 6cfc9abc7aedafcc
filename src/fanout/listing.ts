import type { Bucket } from '../storage/bucket.js';
import type { ObjectInfo } from '../storage/driver.js';

/** UTF-8 byte order of keys: the order every backend lists in (decision in the conformance suite). */
export function compareKeys(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a), Buffer.from(b));
}

/** One source object as listed, with what the destination listing said about the same key. */
export interface Listed {
  src: ObjectInfo;
  dst: ObjectInfo | undefined;
}

/**
 * Lists `src` under `prefix` and, when given, `dst` beside it, merging the two sorted listings as
 * rclone does: each source object comes with the destination object of the same key, so a chunk
 * knows the destination's size, etag (and digest where the listing has it) without a HEAD per key.
 * Keys at or before `after` are skipped (a restarted parent resumes past its last chunk).
 */
export async function* listMerged(src: Bucket, dst: Bucket | undefined, prefix: string, after: string | undefined): AsyncGenerator<Listed> {
  const theirs = dst?.list(prefix)[Symbol.asyncIterator]();
  let head: ObjectInfo | undefined;
  let ended = theirs === undefined;
  const advance = async () => {
    const n = await theirs!.next();
    if (n.done) ended = true;
    head = n.done ? undefined : n.value;
  };
  if (!ended) await advance();
  try {
    for await (const o of src.list(prefix)) {
      if (after !== undefined && compareKeys(o.key, after) <= 0) continue;
      while (!ended && head && compareKeys(head.key, o.key) < 0) await advance();
      const match = head && head.key === o.key ? head : undefined;
      yield { src: o, dst: match };
    }
  } finally {
    await theirs?.return?.(undefined);
  }
}

/** Cuts a listing into chunks of at most `keys` objects or, at the object that reaches it, `bytes`. */
export async function* chunked<T>(items: AsyncIterable<T>, size: (t: T) => number, keys: number, bytes: number): AsyncGenerator<T[]> {
  let chunk: T[] = [];
  let total = 0;
  for await (const t of items) {
    chunk.push(t);
    total += size(t);
    if (chunk.length >= keys || total >= bytes) {
      yield chunk;
      chunk = [];
      total = 0;
    }
  }
  if (chunk.length) yield chunk;
}
