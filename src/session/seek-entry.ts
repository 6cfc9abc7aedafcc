import { ErrorCode, StorageError } from '../errors.js';
import type { Bucket } from '../storage/bucket.js';
import type { IndexEntry } from './seek-format.js';
import { readSegments, segmentAt, type SeekView } from './seek-read.js';
import { parseEntryHeader } from './tar-blocks.js';

const normalise = (p: string): string => p.split('/').filter((s) => s !== '' && s !== '.').join('/');

/**
 * One regular file's bytes from a seekable archive: the segment holding its header, then (for a
 * file running past it) the segments holding the rest, each verified before its bytes are used.
 * The header found where the index points must name the entry and its size, so an index that
 * points elsewhere fails ChecksumMismatch rather than serving another file's bytes. `sink` gets
 * the data in order; nothing reaches it from a segment that failed its check.
 */
export async function readEntryData(bucket: Bucket, view: SeekView, e: IndexEntry, signal: AbortSignal | undefined, sink: (data: Buffer) => Promise<void> | void): Promise<void> {
  const ix = view.index;
  const first = segmentAt(ix, e.start);
  let dataStart = -1;
  let dataEnd = -1;
  const take = async (segOff: number, tar: Buffer): Promise<void> => {
    const from = Math.max(dataStart - segOff, 0);
    const to = Math.min(dataEnd - segOff, tar.length);
    if (to > from) await sink(tar.subarray(from, to));
  };
  await readSegments(bucket, view, first, first, signal, async (seg, tar) => {
    const h = parseEntryHeader(tar.subarray(e.start - seg.uOff));
    if (!h || normalise(h.name) !== e.path || h.size !== e.size) {
      throw new StorageError(ErrorCode.ChecksumMismatch, `the index does not match the archive at "${e.path}"`, { op: 'cat', key: view.key });
    }
    dataStart = e.start + h.headerBytes;
    dataEnd = dataStart + h.size;
    if (dataEnd > ix.tarBytes) throw new StorageError(ErrorCode.ChecksumMismatch, `"${e.path}" runs past the archive`, { op: 'cat', key: view.key });
    await take(seg.uOff, tar);
  });
  const firstSeg = ix.segments[first]!;
  if (dataEnd <= firstSeg.uOff + firstSeg.uLen) return;
  await readSegments(bucket, view, first + 1, segmentAt(ix, dataEnd - 1), signal, (seg, tar) => take(seg.uOff, tar));
}
