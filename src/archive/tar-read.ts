import type { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { extract as tarExtract, type Extract, type Header } from 'tar-stream';
import { classifyCommon, ErrorCode, StorageError } from '../errors.js';
import type { EntryChecker, Inspected } from './entry-check.js';
import { ArchiveMeter, EntryBudget, limitError, type Limits } from './limits.js';

/** One entry as tar-stream yields it: a readable of its data, with `header` and `offset`. */
export type EntryStream = Extract extends AsyncIterable<infer S> ? S : never;

export interface TarReadOptions {
  limits: Limits;
  /** Inspects every entry (names, types, link targets); placing it in the tree is the visitor's choice. */
  checker: Pick<EntryChecker, 'inspect'>;
  /** Aborting stops the read and fails with Transient, or with the reason when it is a StorageError. */
  signal?: AbortSignal;
  /** The operation named in errors. */
  op: string;
  /** Told whether the input is gzip, once known and before the first entry. */
  onFormat?: (gzip: boolean) => void;
}

/** An entry that passed inspection and the limits. */
export interface ReadEntry {
  inspected: Inspected;
  /** The header as tar-stream decoded it, PAX and GNU long names applied. */
  header: Header;
  /**
   * The entry's data. The visitor reads it whole or not at all before it returns, and hands
   * errors of this stream back unwrapped: their origin decides their code.
   */
  stream: EntryStream;
}

export interface TarReadResult {
  /** Tar entries read (not PAX or long-name headers). */
  entries: number;
  /** Declared data bytes of the entries. */
  bytes: number;
  gzip: boolean;
}

/** Where an error first surfaced: decides its code when it is not already a StorageError. */
type Origin = 'source' | 'archive' | 'signal';

/**
 * Reads a tar or gzip-compressed tar stream (told apart by the gzip magic bytes, never by a name),
 * one entry at a time, each one checked before the visitor sees it: the header and ratio limits
 * on the raw stream (ArchiveMeter), the entry count, size and total (EntryBudget), and the entry
 * rules that need no memory of earlier entries (EntryChecker.inspect). Memory stays bounded: no
 * data is buffered beyond the streams' high-water marks, and headers are bounded by
 * `maxHeaderBytes`.
 *
 * Errors: InvalidInput for anything the archive did wrong ("limit" for limits, "corrupt or
 * truncated" for bytes that are not a whole tar(.gz)), Transient when aborted or when the source
 * closes early, the source's own code when reading it fails; a StorageError thrown by the visitor
 * passes through. The source is consumed or destroyed in all cases.
 */
export async function readTar(source: Readable, opts: TarReadOptions, visit: (entry: ReadEntry) => Promise<void>): Promise<TarReadResult> {
  const { limits, signal, op } = opts;
  let first: { origin: Origin; err: unknown } | undefined;
  const note = (origin: Origin) => (err: unknown) => { first ??= { origin, err }; };
  const stop = new AbortController();
  const onAbort = (): void => {
    note('signal')(signal?.reason);
    stop.abort();
    source.destroy();
  };
  // Listeners go on before pipeline() adds its own, so the stream that failed first is the one noted.
  source.on('error', note('source'));
  if (source.errored) note('source')(source.errored);
  if (signal?.aborted) onAbort();
  signal?.addEventListener('abort', onAbort, { once: true });
  let done: Promise<void> | undefined;
  try {
    const head = await peek(source, 2, op);
    const gunzip = head[0] === 0x1f && head[1] === 0x8b ? createGunzip() : undefined;
    opts.onFormat?.(gunzip !== undefined);
    gunzip?.on('error', note('archive'));
    const ex = tarExtract();
    ex.on('error', note('archive'));
    // The iterator listens for 'entry' from the moment it exists; made after the pipeline starts,
    // an entry announced in between would be lost and the read would hang.
    const iterator = ex[Symbol.asyncIterator]();
    const meter = new ArchiveMeter(limits, gunzip, op);
    const budget = new EntryBudget(limits, op);
    const tap = (s: AsyncIterable<Buffer>): AsyncGenerator<Buffer> => meter.tap(s);
    // tar-stream's extract is a streamx Writable, which pipeline() drives like a Node one.
    const sink = ex as unknown as Writable;
    done = gunzip
      ? pipeline(source, gunzip, tap, sink, { signal: stop.signal })
      : pipeline(source, tap, sink, { signal: stop.signal });
    done.catch(() => {}); // awaited below; until then its rejection is not unhandled
    // One entry at a time: tar-stream reads no further until the loop asks for the next one.
    for await (const stream of { [Symbol.asyncIterator]: () => iterator }) {
      const h = stream.header;
      budget.count(h.name);
      // Frontier bookkeeping first, so the header limit holds whatever this entry turns out to be.
      meter.entry(h.name, stream.offset, h.type === 'directory' ? 0 : h.size);
      const inspected = opts.checker.inspect(h);
      budget.data(h.name, inspected.size);
      await visit({ inspected, header: h, stream });
    }
    await done;
    meter.finish();
    return { entries: budget.entries, bytes: budget.bytes, gzip: gunzip !== undefined };
  } catch (err) {
    stop.abort();
    await done?.catch(() => {});
    throw classify(err, first, op);
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
}

/** Gives an error that is not yet a StorageError the code its origin calls for. */
function classify(err: unknown, first: { origin: Origin; err: unknown } | undefined, op: string): StorageError {
  if (err instanceof StorageError) return err;
  if (first?.err instanceof StorageError) return first.err;
  const cause = first?.err ?? err;
  const message = cause instanceof Error ? cause.message : String(cause);
  if ((cause as NodeJS.ErrnoException | undefined)?.code === 'ERR_STREAM_PREMATURE_CLOSE' && first?.origin !== 'signal') {
    // The source went away without ending (a dropped connection): worth a retry, unlike a short archive.
    return new StorageError(ErrorCode.Transient, 'the archive stream closed before its end', { op, cause });
  }
  switch (first?.origin) {
    case 'signal':
      return new StorageError(ErrorCode.Transient, `${op} aborted`, { op, cause });
    case 'source':
      return new StorageError(classifyCommon(cause) ?? ErrorCode.Unknown, `reading the archive failed: ${message}`, { op, cause });
    default:
      // zlib and tar-stream errors: the bytes are not a whole, valid tar(.gz).
      if (message.includes('Header exceeds max size')) return limitError(`a header over tar-stream's 4 MiB cap (maxHeaderBytes): ${message}`, undefined, op);
      return new StorageError(ErrorCode.InvalidInput, `corrupt or truncated archive: ${message}`, { op, cause });
  }
}

/**
 * Reads at least `n` bytes (one chunk or a few) and puts them back, so the format is known
 * before the pipeline is built. Short of `n` bytes the input cannot be an archive.
 */
function peek(source: Readable, n: number, op: string): Promise<Buffer> {
  return new Promise<Buffer>((resolvePeek, reject) => {
    if (source.destroyed) return reject(source.errored ?? new Error('the archive stream was already closed'));
    const chunks: Buffer[] = [];
    let have = 0;
    const settle = (err?: unknown): void => {
      source.off('readable', onReadable).off('end', onEnd).off('error', settle).off('close', onClose);
      if (err !== undefined) return reject(err);
      if (have < n) return reject(new StorageError(ErrorCode.InvalidInput, `corrupt or truncated archive: ${have} bytes`, { op }));
      const all = Buffer.concat(chunks);
      source.unshift(all);
      resolvePeek(all.subarray(0, n));
    };
    const onReadable = (): void => {
      let chunk: unknown;
      while (have < n && (chunk = source.read()) !== null) {
        const buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk as Uint8Array);
        chunks.push(buf);
        have += buf.length;
      }
      if (have >= n) settle();
    };
    const onEnd = (): void => settle();
    const onClose = (): void => settle(new Error('the archive stream closed before its first bytes'));
    source.on('readable', onReadable).on('end', onEnd).on('error', settle).on('close', onClose);
  });
}
