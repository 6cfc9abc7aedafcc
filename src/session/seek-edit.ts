import { Readable, Writable } from 'node:stream';
import { transformTar } from '../archive/transform.js';
import { ErrorCode, StorageError } from '../errors.js';
import { EditPlan, OpFailed, type PlanOp } from './plan.js';
import { GZIP_HEADER, type SeekIndex } from './seek-format.js';
import { segmentAt } from './seek-read.js';
import { sourceSegments } from './seek-source.js';
import { SeekableWriter, type CopiedSegment } from './seek-writer.js';

const END_OF_TAR = 1024;

/**
 * The segments a job's ops rewrite, when the job is one the index alone can place: puts without
 * `ifSha256` onto regular files the archive holds once, no hard link naming them, each in
 * segments without links (whose rules need the tree before them). Undefined otherwise: the job
 * takes the full rewrite, which knows every rule.
 */
export function dirtySegments(ops: readonly PlanOp[], ix: SeekIndex): Map<number, number> | undefined {
  if (ops.length === 0 || ops.some((o) => o.op !== 'put' || o.ifSha256 !== undefined)) return undefined;
  if (new Set(ops.map((o) => o.path)).size !== ops.length) return undefined;
  const linked = new Set(ix.entries.filter((e) => e.type === 'link').map((e) => (e.linkname ?? '').split('/').filter((s) => s !== '' && s !== '.').join('/')));
  const groups = new Map<number, number>();
  for (const o of ops) {
    const at = ix.entries.flatMap((e, i) => (e.path === o.path ? [i] : []));
    if (at.length !== 1 || linked.has(o.path)) return undefined;
    const e = ix.entries[at[0]!]!;
    if (e.type !== 'file' || e.path === '') return undefined;
    const end = ix.entries[at[0]! + 1]?.start ?? ix.tarBytes - END_OF_TAR;
    const first = segmentAt(ix, e.start);
    const last = segmentAt(ix, end - 1);
    for (let i = first; i <= last; i++) {
      const seg = ix.segments[i]!;
      if (ix.entries.some((x) => (x.type === 'link' || x.type === 'symlink') && x.start >= seg.uOff && x.start < seg.uOff + seg.uLen)) return undefined;
    }
    groups.set(first, Math.max(last, groups.get(first) ?? first));
  }
  // Overlapping groups merge.
  const merged = new Map<number, number>();
  let open: [number, number] | undefined;
  for (const [f, l] of [...groups].sort((a, b) => a[0] - b[0])) {
    if (open && f <= open[1] + 0) open[1] = Math.max(open[1], l);
    else {
      if (open) merged.set(open[0], open[1]);
      open = [f, l];
    }
  }
  if (open) merged.set(open[0], open[1]);
  return merged;
}

/**
 * Rewrites a seekable archive whose edits `dirtySegments` placed: the segments outside the dirty
 * groups are checked against their digests and copied as compressed bytes, never inflated; each
 * dirty group is inflated and goes through the tar-to-tar transform on its own with the ops that
 * land in it. `onCopy` hears where each copied segment lands in the output, and the gzip header
 * (at 0) when the source's, as read, is the one the writer writes (a splice copies those bytes
 * inside the store). Resolves with the segment counts.
 */
export async function rewriteSegments(raw: Readable, ix: SeekIndex, key: string, ops: readonly PlanOp[], mtime: Date, groups: Map<number, number>, output: Writable, level: number, signal?: AbortSignal, onCopy?: (copy: CopiedSegment) => void): Promise<{ entries: number; reused: number; compressed: number }> {
  const writer = new SeekableWriter(output, { level, signal, onCopy });
  const inGroup = new Set<number>();
  for (const [f, l] of groups) for (let i = f; i <= l; i++) inGroup.add(i);
  const lastSeg = ix.segments.length - 1;
  let e = 0;
  const write = (b: Buffer): Promise<void> => new Promise((resolve, reject) => {
    if (writer.write(b)) return resolve();
    const onDrain = (): void => { writer.off('error', onError); resolve(); };
    const onError = (err: Error): void => { writer.off('drain', onDrain); reject(err); };
    writer.once('drain', onDrain).once('error', onError);
  });
  try {
    let group: { last: number; parts: Buffer[] } | undefined;
    // Only the dirty groups and the archive's end (which the writer must see) are inflated.
    const onHead = (head: Buffer): void => { if (head.equals(GZIP_HEADER)) onCopy?.({ at: 0, from: 0, length: head.length }); };
    for await (const k of sourceSegments(raw, ix, key, (i) => inGroup.has(i) || i === lastSeg, onHead)) {
      signal?.throwIfAborted();
      const seg = ix.segments[k.i]!;
      const entries: typeof ix.entries = [];
      for (; e < ix.entries.length && ix.entries[e]!.start < seg.uOff + seg.uLen; e++) entries.push(ix.entries[e]!);
      const last = groups.get(k.i);
      if (last !== undefined) group = { last, parts: [] };
      if (!group) {
        if (k.i === lastSeg) await write(k.u);
        else await writer.copySegment(seg, k.c, entries);
        continue;
      }
      group.parts.push(k.u);
      if (k.i < group.last) continue;
      const seg0 = ix.segments[k.i - group.parts.length + 1]!;
      const inGroup = ops.flatMap((o, j) => {
        const e = ix.entries.find((x) => x.path === o.path)!;
        return e.start >= seg0.uOff && e.start < ix.segments[k.i]!.uOff + ix.segments[k.i]!.uLen ? [j] : [];
      });
      await editGroup(Buffer.concat(group.parts), ops, inGroup, mtime, write);
      group = undefined;
    }
    await new Promise<void>((resolve, reject) => writer.end((err?: Error | null) => (err ? reject(err) : resolve())));
    return { entries: writer.index!.entries.length, reused: writer.reused, compressed: writer.compressed };
  } catch (err) {
    writer.destroy(err as Error);
    throw err;
  }
}

/**
 * One dirty group's entries through the transform, its puts (ops `at` of the plan) applied; the
 * new entries' tar bytes go to `write`. An op's failure names its index in the plan, not in the
 * group, so a batch blames the job it came from.
 */
async function editGroup(tar: Buffer, ops: readonly PlanOp[], at: readonly number[], mtime: Date, write: (b: Buffer) => Promise<void>): Promise<void> {
  const run = new EditPlan(at.map((j) => ops[j]!), mtime).start(new Set());
  // The transform ends its output with the two zero blocks of a tar's end: held back, the group goes on.
  let held = Buffer.alloc(0);
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      const all = Buffer.concat([held, chunk]);
      held = all.subarray(Math.max(0, all.length - END_OF_TAR));
      const pass = all.subarray(0, all.length - held.length);
      (pass.length ? write(pass) : Promise.resolve()).then(() => cb(), cb);
    },
  });
  try {
    await transformTar(Readable.from([tar, Buffer.alloc(END_OF_TAR)]), sink, (e) => run.edit(e), { gzip: false, append: (tree) => run.append(tree) });
    const failed = run.failure();
    if (failed) throw failed;
    if (held.length !== END_OF_TAR || held.some((b) => b !== 0)) throw new StorageError(ErrorCode.Unknown, 'a segment group\'s rewrite did not end as a tar does', { op: 'repack' });
  } catch (err) {
    const failed = run.failure(err) ?? err;
    throw failed instanceof OpFailed ? failed.at(at[failed.index]!) : failed;
  } finally {
    await run.close();
  }
}
