import { createHash } from 'node:crypto';
import { constants, createReadStream, createWriteStream } from 'node:fs';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { ErrorCode, StorageError, classifyCommon } from '../errors.js';
import { hashFile } from '../storage/bucket.js';
import type { Edit, NewEntry, TarEntry, TreeView } from '../archive/transform.js';

/** A put's new content: bytes carried by the payload, or a staged file streamed in. */
export type Body = { bytes: Buffer } | { file: string; size: number };

/** A put's `mtime`: its own job's enqueue time when ops of several jobs share a plan (the plan's otherwise). */
export type PlanOp =
  | { op: 'put'; path: string; body: Body; mode?: number | undefined; ifSha256?: string | undefined; mtime?: Date | undefined }
  | { op: 'delete'; path: string; ifSha256?: string | undefined };

const NEW_FILE_MODE = 0o644;
const NEW_DIR_MODE = 0o755;

/**
 * Asked of the job when a hard link that stays names a file an op removed: the run is repeated
 * with that file's bytes kept aside (spooled), so the link can become the file. Rare, so the
 * common run spools nothing.
 */
export class SpoolNeeded extends StorageError {
  constructor(readonly target: string) {
    super(ErrorCode.Unknown, `a hard link needs the removed file ${JSON.stringify(target)}: run again with it spooled`, { op: 'repack' });
  }
}

/**
 * An op that cannot apply (its condition, or a path the tree holds otherwise): carries the op's
 * index, so a batch of several jobs' ops can tell whose op it was. `alone`: it fails whatever the
 * ops before it did (its staged file cannot be read); otherwise the failure was judged on the
 * tree the earlier ops left, and holds only as long as they are the ones applied.
 */
export class OpFailed extends StorageError {
  constructor(code: ErrorCode, readonly index: number, readonly why: string, readonly alone = false) {
    super(code, `ops.${index}: ${why}`, { op: 'repack' });
  }

  /** The same failure at another index (a job's own, or the whole plan's). */
  at(index: number): OpFailed {
    return new OpFailed(this.code, index, this.why, this.alone);
  }
}

/** `a/b` covers `a/b` and everything under it, never `a/bc`. */
const covers = (p: string, q: string): boolean => q === p || (q.length > p.length && q.startsWith(p) && q[p.length] === '/');

/** `a/b/c` -> `a`, `a/b`, `a/b/c`. */
function prefixes(path: string): string[] {
  const out: string[] = [];
  for (let i = path.indexOf('/'); i >= 0; i = path.indexOf('/', i + 1)) out.push(path.slice(0, i));
  out.push(path);
  return out;
}

/**
 * The ordered ops of one repack job, worked out once from the ops alone: which put is the last
 * word on each path, the mode each put gets, which conditions and deletes depend on the archive.
 * Each pass over an archive is a `PlanRun` (a job may make several: a commit conflict or a spool
 * rerun). Ops apply in order, as if one after the other on the tree: a delete removes a path and
 * its subtree, a put (re)creates a file, a condition (`ifSha256`) sees the tree as the earlier
 * ops of the job left it.
 */
export class EditPlan {
  private readonly putsAt = new Map<string, number[]>();
  private readonly deletesAt = new Map<string, number[]>();
  /** Path -> the put that decides its content (no delete covers it later). */
  readonly finalPut = new Map<string, number>();
  /** Per put: its mode, or 'inherit' (the archive's file, when it is there when the put runs). */
  private readonly modes = new Map<number, number | 'inherit'>();
  /** Deletes that find something without looking at the archive (an earlier put of this job). */
  private readonly hitByPut = new Set<number>();
  /** Paths whose archive content a condition needs. */
  readonly needOriginal = new Set<string>();

  constructor(readonly ops: readonly PlanOp[], readonly mtime: Date) {
    ops.forEach((o, k) => {
      const at = o.op === 'put' ? this.putsAt : this.deletesAt;
      const list = at.get(o.path) ?? [];
      list.push(k);
      at.set(o.path, list);
    });
    for (const [path, puts] of this.putsAt) {
      const last = puts[puts.length - 1]!;
      if (!this.coveredBetween(path, last, ops.length)) this.finalPut.set(path, last);
      for (const k of puts) this.modes.set(k, this.modeOf(k));
    }
    ops.forEach((o, k) => {
      if (o.op === 'delete') {
        for (const [path, puts] of this.putsAt) {
          if (covers(o.path, path) && puts.some((j) => j < k && !this.coveredBetween(path, j, k))) this.hitByPut.add(k);
        }
      }
      if (o.ifSha256 !== undefined && this.previousPut(o.path, k) === undefined && !this.coveredBetween(o.path, -1, k)) this.needOriginal.add(o.path);
    });
  }

  /** Delete ops covering `path` (at it or at a parent), in op order. */
  coveringDeletes(path: string): number[] {
    if (this.deletesAt.size === 0) return [];
    const out: number[] = [];
    for (const p of prefixes(path)) out.push(...(this.deletesAt.get(p) ?? []));
    return out.sort((a, b) => a - b);
  }

  /** Is some delete strictly between ops `lo` and `hi` covering `path`? */
  coveredBetween(path: string, lo: number, hi: number): boolean {
    return this.coveringDeletes(path).some((d) => d > lo && d < hi);
  }

  /** The put at `path` before op `k` that is still the file's content when `k` runs. */
  previousPut(path: string, k: number): number | undefined {
    const j = (this.putsAt.get(path) ?? []).filter((i) => i < k).pop();
    return j !== undefined && !this.coveredBetween(path, j, k) ? j : undefined;
  }

  private modeOf(k: number): number | 'inherit' {
    const o = this.ops[k] as Extract<PlanOp, { op: 'put' }>;
    if (o.mode !== undefined) return o.mode;
    const j = this.previousPut(o.path, k);
    if (j !== undefined) return this.modes.get(j) ?? this.modeOf(j);
    return this.coveredBetween(o.path, -1, k) ? NEW_FILE_MODE : 'inherit';
  }

  mode(k: number): number | 'inherit' {
    return this.modes.get(k)!;
  }

  /** The mtime of put `k`'s new entries (the file, and the parent directories it creates). */
  mtimeOf(k: number): Date {
    return (this.ops[k] as Extract<PlanOp, { op: 'put' }>).mtime ?? this.mtime;
  }

  deleteHitByPut(k: number): boolean {
    return this.hitByPut.has(k);
  }

  start(spool: ReadonlySet<string> = new Set()): PlanRun {
    return new PlanRun(this, spool);
  }
}

/** One pass of a plan over an archive: the edit and append callbacks of a tar-to-tar transform. */
export class PlanRun {
  /** Deletes that found something in the archive. */
  private readonly hit = new Set<number>();
  /** Digest of the archive's regular file at a path a condition needs. */
  private readonly original = new Map<string, string>();
  /** Paths whose archive entry the final put replaced where it stood. */
  private readonly replaced = new Set<string>();
  /** Regular files dropped by a delete, with their spooled bytes when asked for. */
  private readonly dropped = new Map<string, { file: string; size: number } | undefined>();
  /** Removed file -> the name of the hard link that became it, for later links to the same file. */
  private readonly materialized = new Map<string, string>();
  private spoolDir: string | undefined;
  /**
   * The earliest op failure the pass found (a failure it meets is noted and the pass goes on, so
   * one failing later in the archive than another op's is still found): the job fails with it
   * whatever else the transform reports. Earliest, so a batch drops its jobs in their order and
   * never blames a job judged with an earlier one that fails too.
   */
  private failed: OpFailed | undefined;

  constructor(private readonly plan: EditPlan, private readonly spool: ReadonlySet<string>) {}

  async edit(e: TarEntry): Promise<Edit> {
    const p = e.path;
    if (p === '') return 'keep';
    const plan = this.plan;
    const type = e.header.type;
    const isFile = type === 'file' || type === 'contiguous-file';
    const deletes = plan.coveringDeletes(p);
    if (deletes.length > 0) this.hit.add(deletes[0]!);
    const fp = plan.finalPut.get(p);
    if (fp !== undefined && deletes.length === 0) {
      if (type === 'directory') {
        this.fail(new OpFailed(ErrorCode.InvalidInput, fp, `"${p}" is a directory in the session; delete it first to put a file there`));
        return 'keep';
      }
      // A second entry of the same path (tar's "the later one wins") goes: the new content stands once.
      if (this.replaced.has(p)) return 'drop';
      if (plan.needOriginal.has(p) && isFile) this.original.set(p, await digestOf(e.data));
      this.replaced.add(p);
      const inherited = isFile || type === 'link' ? e.header.mode : NEW_FILE_MODE;
      const { uid, gid, uname, gname } = e.header;
      return { replace: this.newFile(fp, e.header.name, inherited, { uid, gid, uname, gname }) };
    }
    if (deletes.length > 0) {
      if (isFile) {
        if (this.spool.has(p)) {
          const spooled = await this.spoolData(e.data, plan.needOriginal.has(p));
          if (spooled.sha256) this.original.set(p, spooled.sha256);
          this.dropped.set(p, { file: spooled.file, size: spooled.size });
        } else {
          if (plan.needOriginal.has(p)) this.original.set(p, await digestOf(e.data));
          this.dropped.set(p, undefined);
        }
      }
      return 'drop';
    }
    if (type === 'link' && e.header.linkname !== undefined) {
      const target = e.header.linkname.split('/').filter((s) => s !== '' && s !== '.').join('/');
      if (!this.dropped.has(target)) return 'keep';
      const became = this.materialized.get(target);
      if (became !== undefined) return { replace: { header: { ...e.header, linkname: became } } };
      const spooled = this.dropped.get(target);
      if (!spooled) throw new SpoolNeeded(target);
      this.materialized.set(target, e.header.name);
      const { linkname: _, ...header } = e.header;
      return { replace: { header: { ...header, type: 'file', size: spooled.size }, data: createReadStream(spooled.file) } };
    }
    return 'keep';
  }

  /**
   * The entries after the archive's last: the conditions are checked first, then new files and
   * their parents, in op order, each checked against the tree so far (a directory at its path, a
   * file or a symlink at a parent's fails that put); the pass fails with its earliest failure.
   * Once a failure is noted the pass will not commit: the puts before it are only checked, not
   * written.
   */
  async *append(tree: TreeView): AsyncGenerator<NewEntry> {
    await this.checkConditions();
    const plan = this.plan;
    const news = [...plan.finalPut.entries()].filter(([path]) => !this.replaced.has(path)).sort((a, b) => a[1] - b[1]);
    const dry = this.failed !== undefined;
    // What the puts checked but not written would have made.
    const made = new Map<string, 'file' | 'directory'>();
    const kind = (p: string): ReturnType<TreeView['kind']> => made.get(p) ?? tree.kind(p);
    for (const [path, k] of news) {
      const parents = prefixes(path).slice(0, -1);
      const blocked = parents.find((dir) => kind(dir) === 'file' || kind(dir) === 'symlink');
      if (blocked !== undefined) this.fail(new OpFailed(ErrorCode.InvalidInput, k, `"${blocked}" is a ${kind(blocked)} in the session, not a directory`));
      else if (kind(path) !== undefined) this.fail(new OpFailed(ErrorCode.InvalidInput, k, `"${path}" is a directory in the session; delete it first to put a file there`));
      if (this.failed && this.failed.index <= k) break;
      const dirs = parents.filter((dir) => kind(dir) === undefined);
      if (dry) {
        for (const dir of dirs) made.set(dir, 'directory');
        made.set(path, 'file');
        continue;
      }
      for (const dir of dirs) yield { header: { name: dir, type: 'directory', mode: NEW_DIR_MODE, mtime: plan.mtimeOf(k) } };
      yield this.newFile(k, path, NEW_FILE_MODE, {});
    }
    if (this.failed) throw this.failed;
  }

  /**
   * The earliest op failure of the pass, when it noted one: `err` (what ended the pass) when that
   * is an earlier op's failure (a staged file that could not be read), else the noted one.
   */
  failure(err?: unknown): OpFailed | undefined {
    if (!this.failed) return undefined;
    return err instanceof OpFailed && err.index < this.failed.index ? err : this.failed;
  }

  private fail(err: OpFailed): void {
    if (!this.failed || err.index < this.failed.index) this.failed = err;
  }

  /** Paths of deletes that found nothing, in op order; of ops `from` to `to` (excluded) only when given. */
  missing(from = 0, to = this.plan.ops.length): string[] {
    const out: string[] = [];
    this.plan.ops.forEach((o, k) => {
      if (k >= from && k < to && o.op === 'delete' && !this.hit.has(k) && !this.plan.deleteHitByPut(k) && !out.includes(o.path)) out.push(o.path);
    });
    return out;
  }

  async close(): Promise<void> {
    if (this.spoolDir) await rm(this.spoolDir, { recursive: true, force: true });
  }

  private newFile(k: number, name: string, inherited: number, owner: { uid?: number; gid?: number; uname?: string; gname?: string }): NewEntry {
    const o = this.plan.ops[k] as Extract<PlanOp, { op: 'put' }>;
    const m = this.plan.mode(k);
    const header = { ...owner, name, type: 'file' as const, mode: m === 'inherit' ? inherited : m, mtime: this.plan.mtimeOf(k) };
    if ('bytes' in o.body) return { header, data: o.body.bytes };
    // O_NOFOLLOW: a staged file swapped for a symlink after its check is refused, never read.
    return { header: { ...header, size: o.body.size }, data: readStaged(o.body.file, k) };
  }

  /** Notes the first condition that fails (or the staged file it hashes), in op order. */
  private async checkConditions(): Promise<void> {
    const plan = this.plan;
    for (const [k, o] of plan.ops.entries()) {
      if (this.failed && this.failed.index <= k) return;
      if (o.ifSha256 === undefined) continue;
      const j = plan.previousPut(o.path, k);
      let current: string | undefined;
      try {
        if (j !== undefined) current = await bodyDigest((plan.ops[j] as Extract<PlanOp, { op: 'put' }>).body, j);
        else if (!plan.coveredBetween(o.path, -1, k)) current = this.original.get(o.path);
      } catch (err) {
        if (!(err instanceof OpFailed)) throw err;
        return this.fail(err);
      }
      if (current !== o.ifSha256) {
        return this.fail(new OpFailed(ErrorCode.PreconditionFailed, k,
          `"${o.path}" ${current === undefined ? 'is not a regular file in the session' : `has sha256 ${current}`}, not ifSha256 ${o.ifSha256}; nothing applied`));
      }
    }
  }

  private async spoolData(data: AsyncIterable<Buffer>, hash: boolean): Promise<{ file: string; size: number; sha256?: string }> {
    this.spoolDir ??= await mkdtemp(join(tmpdir(), 'stevedore-repack-'));
    const file = join(this.spoolDir, String(this.dropped.size));
    const h = createHash('sha256');
    let size = 0;
    await pipeline(data, async function* (src: AsyncIterable<Buffer>) {
      for await (const chunk of src) {
        size += chunk.length;
        if (hash) h.update(chunk);
        yield chunk;
      }
    }, createWriteStream(file));
    return { file, size, ...(hash ? { sha256: h.digest('hex') } : {}) };
  }
}

/**
 * A staged file's bytes, opened only when the transform reaches it (a run that fails earlier opens
 * nothing). A file that cannot be opened or read (gone since its check, swapped for a link) fails
 * put `k` alone, so a batch of several jobs' ops knows whose it was.
 */
async function* readStaged(file: string, k: number): AsyncGenerator<Buffer> {
  const fh = await open(file, constants.O_RDONLY | constants.O_NOFOLLOW).catch((err: unknown) => { throw stagedFailed(err, k); });
  try {
    const chunks = fh.createReadStream({ autoClose: false, highWaterMark: 1 << 20 });
    try {
      for await (const chunk of chunks) yield chunk as Buffer;
    } catch (err) {
      throw stagedFailed(err, k);
    }
  } finally {
    await fh.close();
  }
}

/** Errno codes that mean a staged file is not there (gone, or swapped for a link): NotFound. */
const STAGED_GONE = new Set(['ENOENT', 'ENOTDIR', 'ELOOP']);

/**
 * A staged file's fs error as the failure of the put that reads it (other errors pass as they
 * are). Gone is NotFound; the rest keep the usual fs mapping, and a passing one (EMFILE, EIO) is
 * no OpFailed: it is not that job's fault, so the whole pass fails Transient and is tried again.
 * @internal exported for tests
 */
export function stagedFailed(err: unknown, k: number): unknown {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (typeof code !== 'string' || err instanceof StorageError) return err;
  const why = `its staged file cannot be read (${code})`;
  if (STAGED_GONE.has(code)) return new OpFailed(ErrorCode.NotFound, k, why, true);
  const mapped = classifyCommon(err) ?? ErrorCode.Unknown;
  if (mapped === ErrorCode.Transient) return new StorageError(ErrorCode.Transient, `ops.${k}: ${why}`, { op: 'repack', cause: err });
  return new OpFailed(mapped, k, why, true);
}

async function digestOf(data: AsyncIterable<Buffer>): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of data) h.update(chunk);
  return h.digest('hex');
}

/** The digest of put `k`'s content; its staged file unreadable fails that put alone. */
async function bodyDigest(body: Body, k: number): Promise<string> {
  if ('bytes' in body) return createHash('sha256').update(body.bytes).digest('hex');
  return (await hashFile(body.file).catch((err: unknown) => { throw stagedFailed(err, k); })).sha256;
}
