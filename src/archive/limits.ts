import type { Gunzip } from 'node:zlib';
import { ErrorCode, StorageError } from '../errors.js';

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

/** Bounds on what one archive may make the extractor do. Every violation is InvalidInput ("limit"). */
export interface ExtractLimits {
  /**
   * Sum of the data bytes of all entries.
   * @defaultValue 10 GiB
   */
  maxTotalBytes?: number;
  /**
   * Number of entries (PAX and GNU long-name headers are not entries; `maxHeaderBytes` bounds
   * them), and also of paths created on disk, directories implied by a file's path included, so
   * deep paths cannot multiply the inodes one entry makes.
   * @defaultValue 100 000
   */
  maxEntries?: number;
  /**
   * Data bytes of one entry, checked against its header before anything is written.
   * @defaultValue `maxTotalBytes`
   */
  maxEntryBytes?: number;
  /**
   * Segments in one entry path (`a/b/c` has 3).
   * @defaultValue 1024
   */
  maxPathDepth?: number;
  /**
   * Bytes of metadata between two entries: PAX (local and global) and GNU long-name / long-link
   * headers, plus zero blocks. tar-stream buffers each such header whole (its own fixed cap is
   * 4 MiB), so this is what keeps its memory small.
   * @defaultValue 1 MiB
   */
  maxHeaderBytes?: number;
  /**
   * Decompressed / compressed bytes for gzip input, checked continuously once more than 1 MiB has
   * come out, so a gzip bomb stops early rather than at `maxTotalBytes`.
   * @defaultValue 1000
   */
  maxRatio?: number;
}

/** The same limits, for any consumer of a tar stream (extraction, transforms). */
export type ArchiveLimits = ExtractLimits;

export type Limits = Required<ExtractLimits>;

/** Output below which the ratio is not checked: tiny archives have meaningless ratios. */
export const RATIO_GRACE_BYTES = MiB;
/**
 * How far the raw tar stream may run ahead of the last entry tar-stream announced before the
 * header limit trips early: one slice in flight, tar-stream's buffer and its 16 KiB high-water mark,
 * rounded up generously so no honest archive is refused by the live check. The exact check runs at
 * each entry.
 */
const LIVE_SLACK_BYTES = 256 * 1024;
/** Large input chunks are cut to this before tar-stream sees them, so the live check stays tight. */
const SLICE_BYTES = 64 * 1024;

export function resolveLimits(opts: ExtractLimits = {}, op = 'extract'): Limits {
  const maxTotalBytes = positive(opts.maxTotalBytes, 10 * GiB, 'maxTotalBytes', op);
  return {
    maxTotalBytes,
    maxEntries: positive(opts.maxEntries, 100_000, 'maxEntries', op),
    maxEntryBytes: positive(opts.maxEntryBytes, maxTotalBytes, 'maxEntryBytes', op),
    maxPathDepth: positive(opts.maxPathDepth, 1024, 'maxPathDepth', op),
    maxHeaderBytes: positive(opts.maxHeaderBytes, MiB, 'maxHeaderBytes', op),
    maxRatio: positive(opts.maxRatio, 1000, 'maxRatio', op),
  };
}

function positive(value: number | undefined, fallback: number, field: string, op: string): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !(value > 0)) {
    throw new StorageError(ErrorCode.InvalidInput, `${field} must be a positive number`, { op });
  }
  return value;
}

/** The one shape of a limit violation; callers and tests look for the word "limit". */
export function limitError(detail: string, key?: string, op = 'extract'): StorageError {
  return new StorageError(ErrorCode.InvalidInput, `archive over a limit: ${detail}`, { op, key });
}

/**
 * The per-entry limits: entry count, one entry's data bytes (from its header, before any data is
 * read) and the total. One per stream: the archive read, and a transform's output.
 */
export class EntryBudget {
  entries = 0;
  bytes = 0;

  constructor(private readonly limits: Limits, private readonly op = 'extract') {}

  /** Counts one entry; call it as soon as the entry is announced. */
  count(name: string): void {
    if (++this.entries > this.limits.maxEntries) throw limitError(`more than ${this.limits.maxEntries} entries (maxEntries)`, name, this.op);
  }

  /** Adds an entry's declared data bytes. */
  data(name: string, size: number): void {
    if (size > this.limits.maxEntryBytes) throw limitError(`entry of ${size} bytes over maxEntryBytes ${this.limits.maxEntryBytes}`, name, this.op);
    if (this.bytes + size > this.limits.maxTotalBytes) throw limitError(`more than ${this.limits.maxTotalBytes} bytes in total (maxTotalBytes)`, name, this.op);
    this.bytes += size;
  }
}

/**
 * Counts the raw (decompressed) tar stream on its way into tar-stream and enforces the limits that
 * tar-stream cannot: header bytes between entries and the compression ratio.
 *
 * tar-stream reports, for each entry, the offset of its header in the raw stream. The end of the
 * previous entry's data (`frontier`) is known from its header, so any bytes past the frontier that
 * are not yet an announced entry are headers or zero blocks being buffered inside tar-stream.
 */
export class ArchiveMeter {
  /** Raw tar bytes handed to tar-stream so far. */
  private raw = 0;
  /** Where the data of the last announced entry ends, padding included. */
  private frontier = 0;

  constructor(
    private readonly limits: Limits,
    /** The decompressor, when the input is gzip: its `bytesWritten` is the compressed bytes consumed. */
    private readonly gunzip?: Gunzip,
    private readonly op = 'extract',
  ) {}

  /** A pipeline stage between the (decompressed) source and tar-stream. */
  async *tap(source: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
    for await (const chunk of source) {
      // A generator resumes only when tar-stream wants more, so the checks run just in time.
      for (let at = 0; at < chunk.length; at += SLICE_BYTES) {
        const slice = chunk.subarray(at, at + SLICE_BYTES);
        this.raw += slice.length;
        this.checkLive();
        yield slice;
      }
    }
  }

  private checkLive(): void {
    const ahead = this.raw - this.frontier;
    if (ahead > this.limits.maxHeaderBytes + LIVE_SLACK_BYTES) {
      throw limitError(`more than ${this.limits.maxHeaderBytes} header bytes before the next entry (maxHeaderBytes)`, undefined, this.op);
    }
    const compressed = this.gunzip?.bytesWritten;
    if (compressed !== undefined && this.raw > RATIO_GRACE_BYTES && this.raw > this.limits.maxRatio * compressed) {
      throw limitError(`compression ratio over ${this.limits.maxRatio} (maxRatio): ${this.raw} bytes from ${compressed}`, undefined, this.op);
    }
  }

  /**
   * Called for each entry tar-stream announces: `offset` is where its header starts in the raw
   * stream, `dataBytes` how much data tar-stream will read after it (PAX `size` applied).
   */
  entry(name: string, offset: number, dataBytes: number): void {
    const headerBytes = offset - this.frontier;
    if (headerBytes > this.limits.maxHeaderBytes) {
      throw limitError(`${headerBytes} header bytes before this entry, over maxHeaderBytes ${this.limits.maxHeaderBytes}`, name, this.op);
    }
    this.frontier = offset + 512 + dataBytes + ((512 - (dataBytes % 512)) % 512);
  }

  /** After the last entry: what follows it (end-of-archive blocks, padding) is bounded the same way. */
  finish(): void {
    if (this.raw - this.frontier > this.limits.maxHeaderBytes) {
      throw limitError(`${this.raw - this.frontier} bytes after the last entry, over maxHeaderBytes ${this.limits.maxHeaderBytes}`, undefined, this.op);
    }
  }
}
