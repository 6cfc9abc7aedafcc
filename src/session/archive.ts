import type { Readable, Writable } from 'node:stream';
import { Writable as WritableStream } from 'node:stream';
import { transformTar, type TarHeader } from '../archive/transform.js';
import type { ArchiveLimits } from '../archive/limits.js';
import type { PlanRun } from './plan.js';
import type { SeekIndex } from './seek-format.js';
import { seekableSource } from './seek-source.js';
import { SeekableWriter } from './seek-writer.js';

/**
 * The session archive format, behind the two calls the rest of the session code makes: rewrite
 * an archive through a plan, and read its entries. Written seekable (seek-format.ts): the
 * tar-to-tar transform's plain tar stream goes through the segmenting writer.
 */

/** Fixed, so a job run twice writes identical bytes (Node's gzip header has no time and a fixed OS byte). */
export const GZIP_LEVEL = 6;
export const CONTENT_TYPE = 'application/gzip';

export interface FormatOptions {
  signal?: AbortSignal | undefined;
  limits?: ArchiveLimits | undefined;
}

export interface RewriteResult {
  /** Entries written. */
  entries: number;
  /** Segments whose compressed bytes were copied from the input, and segments compressed. */
  reused: number;
  compressed: number;
}

/** The input's index when it is seekable: its unchanged segments are copied, not recompressed. */
export interface SeekableInput {
  index: SeekIndex;
  key: string;
}

/**
 * Writes `input` (null: a session not created yet) to `output` with the plan's edits applied.
 * `output` is ended on success and destroyed on failure, so a put reading it never commits a
 * partial archive.
 */
export async function rewriteArchive(input: Readable | null, output: Writable, run: PlanRun, opts: FormatOptions & { seekable?: SeekableInput | undefined } = {}): Promise<RewriteResult> {
  const source = input && opts.seekable ? seekableSource(input, opts.seekable.index, opts.seekable.key) : undefined;
  const writer = new SeekableWriter(output, { level: GZIP_LEVEL, source: source?.pool, signal: opts.signal });
  const result = await transformTar(source?.tar ?? input, writer, (e) => run.edit(e), {
    gzip: false,
    append: (tree) => run.append(tree),
    ...(opts.signal ? { signal: opts.signal } : {}),
    ...(opts.limits ? { limits: opts.limits } : {}),
  });
  return { entries: result.entries, reused: writer.reused, compressed: writer.compressed };
}

/** One entry as a reader sees it. */
export interface ArchiveEntry {
  /** Normalised: segments joined by `/`, no `./`, no trailing `/`. */
  path: string;
  header: Readonly<TarHeader>;
  /** The entry's bytes (files only); read them or not, before the visitor returns. */
  data: AsyncIterable<Buffer>;
}

/**
 * Reads every entry of an archive, checked by the same rules as a rewrite (names, types, links
 * inside the tree, limits). Errors: InvalidInput for a corrupt archive, the source's own code
 * (ChecksumMismatch for a stored archive that fails its digest at the end).
 */
/** Resolves with the number of entries read, a root entry (`./`) included, as a rewrite counts them. */
export async function readArchive(input: Readable, visit: (e: ArchiveEntry) => void | Promise<void>, opts: FormatOptions = {}): Promise<{ entries: number }> {
  const sink = new WritableStream({ write: (_chunk, _enc, cb) => cb() });
  const result = await transformTar(input, sink, async (e): Promise<'drop'> => {
    if (e.path !== '') await visit({ path: e.path, header: e.header, data: e.data });
    return 'drop';
  }, { gzip: false, ...(opts.signal ? { signal: opts.signal } : {}), ...(opts.limits ? { limits: opts.limits } : {}) });
  return { entries: result.read };
}
