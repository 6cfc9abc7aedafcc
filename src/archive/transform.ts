import type { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { constants as zlib, createGzip } from 'node:zlib';
import { pack as tarPack } from 'tar-stream';
import { classifyCommon, ErrorCode, StorageError } from '../errors.js';
import { EntryChecker, type EntryType, type Inspected } from './entry-check.js';
import { EntryBudget, resolveLimits, type ArchiveLimits } from './limits.js';
import { readTar } from './tar-read.js';
import { fromStreamHeader, writeEntry, type TarHeader } from './tar-write.js';

export type { TarHeader } from './tar-write.js';

const OP = 'repack';

/** An entry of the input, as the edit function sees it. */
export interface TarEntry {
  /** The entry's path, normalised: segments joined by `/`, no `./`, no trailing `/`; `''` for the root entry. */
  readonly path: string;
  /** Its header; spread it into a replacement to keep what is not changed. */
  readonly header: Readonly<TarHeader>;
  /**
   * Its data, for an edit that must see the current bytes (a digest check before a replace or a
   * drop). Read whole or in part; an entry whose data was read cannot be kept (return `drop` or a
   * replacement). Leaving the loop early never stops the archive.
   */
  readonly data: AsyncIterable<Buffer>;
}

/** An entry to write: a replacement, or one appended after the input's last entry. */
export interface NewEntry {
  /**
   * `name` is required. Defaults: type `file`, mode 0644 (0755 for a directory), uid and gid 0,
   * empty uname and gname, mtime the current time (pass one for output that does not depend on
   * when it ran), size the data's length (required when `data` is a stream).
   */
  header: Partial<TarHeader> & { name: string };
  data?: Buffer | string | AsyncIterable<Uint8Array>;
}

/** What becomes of an input entry: written as it is, left out, or replaced by another entry in its place. */
export type Edit = 'keep' | 'drop' | { replace: NewEntry };

/** The output tree so far, for an `append` deciding which parent directories a new path needs. */
export interface TreeView {
  kind(path: string): 'file' | 'directory' | 'implied-directory' | 'symlink' | undefined;
}

export interface TransformOptions {
  /** Applied to the input (as for extraction) and again to the output's entries and data bytes. */
  limits?: ArchiveLimits;
  /** Aborting stops both streams and fails with Transient. */
  signal?: AbortSignal;
  /**
   * Output compression: `true` (zlib's default level), a level 0-9, or `false` for a plain tar.
   * @defaultValue as the input; gzip when there is no input
   */
  gzip?: boolean | number;
  /** Entries written after the input's last one (new files and their parent directories). */
  append?: (tree: TreeView) => Iterable<NewEntry> | AsyncIterable<NewEntry>;
}

export interface TransformResult {
  /** Entries read from the input. */
  read: number;
  kept: number;
  dropped: number;
  replaced: number;
  added: number;
  /** Entries written. */
  entries: number;
  /** Data bytes written. */
  bytes: number;
  /** Uncompressed tar bytes written, headers and padding included. */
  tarBytes: number;
  gzip: boolean;
}

/**
 * Rewrites a tar(.gz) stream into another, entry by entry, in bounded memory: `input` is read
 * through the shared reader (tar-read.ts: limits, format) and entry rules (entry-check.ts, with
 * symlinks and hard links allowed while they stay inside the tree), each entry goes to `edit`,
 * and what it keeps, replaces or appends is written through tar-stream's pack to `output` (ended
 * on success, destroyed on failure). `input: null` starts from an empty archive, for a session
 * created by its first edit.
 *
 * Untouched entries keep their name as spelled, type, mode, uid/gid/uname/gname, mtime (PAX
 * sub-second precision included), other PAX records, link targets and data bytes. The header
 * encoding may change (tar-write.ts says how): ustar where it fits, PAX otherwise; GNU long names
 * become ustar prefixes or PAX paths; PAX global headers are folded into entries by tar-stream.
 *
 * Every entry written, kept or new, is checked against the tree of entries written before it, so
 * the output obeys the same rules as the input: a new path colliding with a kept one, a file
 * under a file, or a hard link to a dropped file is refused. Errors: InvalidInput for a bad
 * input or entry, the output's own code when writing fails, Transient when aborted; a
 * StorageError thrown by `edit` or `append` passes through (anything else is Unknown).
 */
export async function transformTar(
  input: Readable | null,
  output: Writable,
  edit: (entry: TarEntry) => Edit | Promise<Edit>,
  opts: TransformOptions = {},
): Promise<TransformResult> {
  const limits = resolveLimits(opts.limits, OP);
  const checker = new EntryChecker({ links: 'inside', collisions: 'exact', maxPathDepth: limits.maxPathDepth, maxPaths: limits.maxEntries, op: OP });
  const budget = new EntryBudget(limits, OP);
  const counts = { read: 0, kept: 0, dropped: 0, replaced: 0, added: 0 };
  const pack = tarPack();
  pack.on('error', () => {}); // destroyed on failure, when nothing may be reading it any more
  const stop = new AbortController();
  const signal = opts.signal ? AbortSignal.any([opts.signal, stop.signal]) : stop.signal;
  let outputFailure: StorageError | undefined;
  let writing: Promise<void> | undefined;
  let gzip = false;
  let tarBytes = 0;

  const startOutput = (inputGzip: boolean): void => {
    const level = opts.gzip === undefined ? (inputGzip ? zlib.Z_DEFAULT_COMPRESSION : undefined)
      : opts.gzip === true ? zlib.Z_DEFAULT_COMPRESSION : opts.gzip === false ? undefined : opts.gzip;
    gzip = level !== undefined;
    const fromPack = async function* (): AsyncGenerator<Buffer> {
      for await (const chunk of pack) {
        tarBytes += (chunk as Buffer).length;
        yield chunk as Buffer;
      }
    };
    writing = (level === undefined ? pipeline(fromPack, output) : pipeline(fromPack, createGzip({ level }), output)).catch((err: unknown) => {
      outputFailure ??= outputError(err);
      // The read may be waiting on an entry the output will never take, or reading one to drop.
      stop.abort(outputFailure);
      throw outputFailure;
    });
    writing.catch(() => {}); // awaited at the end; until then its rejection is not unhandled
  };

  /** Checks a new entry against the same rules as the input's and writes it. */
  const add = async (e: NewEntry): Promise<void> => {
    const { header, data } = newEntry(e);
    const inspected = checker.inspect(header);
    await put(inspected, header, data, () => false);
  };

  const put = async (inspected: Inspected, header: TarHeader, data: Buffer | AsyncIterable<Uint8Array> | undefined, inputFailed: () => boolean): Promise<void> => {
    budget.count(header.name);
    budget.data(header.name, inspected.size);
    checker.place(inspected);
    try {
      await writeEntry(pack, header, data, OP);
    } catch (err) {
      // Anything but our own checks or the input failing under us comes from the output side.
      if (err instanceof StorageError || inputFailed()) throw err;
      throw outputFailure ?? outputError(err);
    }
  };

  try {
    if (input === null) {
      startOutput(true);
    } else {
      await readTar(input, { limits, checker, signal, op: OP, onFormat: startOutput }, async ({ inspected, header, stream }) => {
        counts.read++;
        const it = stream[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
        let touched = false;
        let failed = false;
        // One iterator shared by the edit and by the transform, whose `return` never ends the
        // archive (tar-stream's would destroy the whole extract).
        const view: AsyncIterableIterator<Buffer> = {
          next: () => it.next().catch((err: unknown) => { failed = true; throw err; }),
          return: async () => ({ done: true, value: undefined }),
          [Symbol.asyncIterator]() { return this; },
        };
        const th = fromStreamHeader(header, inspected.type);
        const entry: TarEntry = {
          path: inspected.segments.join('/'),
          header: { ...th, ...(th.pax ? { pax: { ...th.pax } } : {}) },
          data: { [Symbol.asyncIterator]: () => { touched = true; return view; } },
        };
        const verdict = await callerStep(() => edit(entry), () => failed);
        if (verdict === 'keep') {
          if (touched) throw new StorageError(ErrorCode.Unknown, 'edit read the data of an entry it keeps', { op: OP, key: header.name });
          const hasData = inspected.type === 'file' || inspected.type === 'contiguous-file';
          await put(inspected, th, hasData ? view : undefined, () => failed);
          counts.kept++;
          return;
        }
        for await (const chunk of view) void chunk; // the rest of a dropped or replaced entry's data
        if (verdict === 'drop') {
          counts.dropped++;
          return;
        }
        if (typeof verdict !== 'object' || verdict === null || !('replace' in verdict)) {
          throw new StorageError(ErrorCode.Unknown, `edit returned ${JSON.stringify(verdict)}`, { op: OP, key: header.name });
        }
        await add(verdict.replace);
        counts.replaced++;
      });
    }
    const more = opts.append?.({ kind: (path) => checker.kind(path) }) ?? [];
    await callerStep(async () => {
      for await (const e of more) {
        await add(e);
        counts.added++;
      }
    }, () => false);
    pack.finalize();
    await writing;
    return { ...counts, entries: budget.entries, bytes: budget.bytes, tarBytes, gzip };
  } catch (err) {
    const failure = err instanceof StorageError ? err : outputError(err);
    pack.destroy(failure);
    await writing?.catch(() => {});
    if (!output.destroyed) output.destroy(failure);
    throw failure;
  }
}

/** A header with the defaults filled in, and its data as a Buffer or a stream. */
function newEntry(e: NewEntry): { header: TarHeader; data: Buffer | AsyncIterable<Uint8Array> | undefined } {
  const h = e.header;
  const type: EntryType = h.type ?? 'file';
  const data = typeof e.data === 'string' ? Buffer.from(e.data) : e.data;
  const size = Buffer.isBuffer(data) ? data.length : (h.size ?? 0);
  if (data !== undefined && !Buffer.isBuffer(data) && h.size === undefined) {
    throw new StorageError(ErrorCode.InvalidInput, 'a streamed entry needs header.size', { op: OP, key: h.name });
  }
  if (!Number.isSafeInteger(size) || size < 0) throw new StorageError(ErrorCode.InvalidInput, `bad size ${size}`, { op: OP, key: h.name });
  const header: TarHeader = {
    name: h.name,
    type,
    size: type === 'file' || type === 'contiguous-file' ? size : 0,
    mode: h.mode ?? (type === 'directory' ? 0o755 : 0o644),
    uid: h.uid ?? 0,
    gid: h.gid ?? 0,
    uname: h.uname ?? '',
    gname: h.gname ?? '',
    mtime: h.mtime ?? new Date(),
    ...(h.linkname !== undefined ? { linkname: h.linkname } : {}),
    ...(h.pax !== undefined ? { pax: h.pax } : {}),
  };
  return { header, data };
}

/** Runs the caller's code: its StorageErrors pass, anything else is Unknown unless the input failed under it. */
async function callerStep<T>(step: () => T | Promise<T>, inputFailed: () => boolean): Promise<T> {
  try {
    return await step();
  } catch (err) {
    if (err instanceof StorageError || inputFailed()) throw err;
    throw new StorageError(ErrorCode.Unknown, `edit failed: ${(err as Error)?.message ?? String(err)}`, { op: OP, cause: err });
  }
}

function outputError(err: unknown): StorageError {
  if (err instanceof StorageError) return err;
  return new StorageError(classifyCommon(err) ?? ErrorCode.Unknown, `writing the archive failed: ${(err as Error)?.message ?? String(err)}`, { op: OP, cause: err });
}
