import { ErrorCode, StorageError } from '../errors.js';
import { collisionKey, entrySegments, linkTargetSegments } from './entry-path.js';
import { limitError } from './limits.js';

/** The entry types an archive may carry through the checks. Everything else (devices, FIFOs, sparse, unknown) is refused. */
export type EntryType = 'file' | 'contiguous-file' | 'directory' | 'symlink' | 'link';

/** The header fields the checks look at. */
export interface CheckedHeader {
  name: string;
  type: string | null | undefined;
  size: number;
  linkname?: string | null;
}

/** An entry that passed the checks that need no memory of earlier entries. */
export interface Inspected {
  name: string;
  type: EntryType;
  /** Path segments; empty for the root directory entry (`./`). */
  segments: string[];
  size: number;
  /** Symlink target segments as written (`..` kept), or a hard link's target path segments. */
  target?: string[];
}

export interface CheckPolicy {
  /**
   * `refuse`: every symlink and hard link is refused (extraction into the staging area).
   * `inside`: symlinks whose target resolves inside the tree, through the links before them,
   * and hard links to a regular file earlier in the archive are allowed (tar-to-tar transforms).
   */
  links: 'refuse' | 'inside';
  /**
   * `fold`: two spellings equal after NFC and case folding are one name, and the second is refused
   * (extraction: a case-insensitive filesystem would write one through the other). `exact`: names
   * are their bytes (tar-to-tar transforms write no filesystem, and a Linux repository may hold
   * both `Makefile` and `makefile`). @defaultValue 'fold'
   */
  collisions?: 'fold' | 'exact';
  maxPathDepth: number;
  /** Cap on paths remembered (entries, directories implied by their paths, and paths links resolve through). */
  maxPaths: number;
  /** The operation named in errors. */
  op: string;
}

/**
 * One path of the tree the archive describes. A trie of segments rather than a map of whole
 * paths, so memory grows with the segments (each at most NAME_MAX bytes), not with path length
 * times entry count.
 */
export interface PathNode<M> {
  /** The spelling that created it; another spelling with the same collision key is refused. */
  segment: string;
  /** `none`: a path only a link resolved through so far; it may still become a directory or a file. */
  kind: 'directory' | 'file' | 'symlink' | 'none';
  /** Children by collision key; directories and `none` only. */
  children?: Map<string, PathNode<M>>;
  /** A directory that has its own entry (not only implied by a path under it). */
  explicit?: boolean;
  /** A link resolved through or to this path: it can no longer become a symlink. */
  walked?: boolean;
  /** A symlink's target, resolved to a path in the tree (symlink-free). */
  resolved?: string[];
  /** Whatever the consumer keeps per path (extraction: a directory's mode and mtime). */
  meta?: M;
}

/** What `place` decided about an entry. */
export interface Placement<M> {
  node: PathNode<M>;
  /** Index of the first segment whose directory this entry creates (the consumer makes segments[createdFrom..]). */
  createdFrom: number;
  /** A file entry with the exact name of an earlier file: it replaces it, as tar does. */
  replaces: boolean;
}

const LINK_TYPES = new Set(['symlink', 'link']);

/**
 * The entry rules of RELIABILITY #1-#5 and #7, in one place for every consumer of a tar stream:
 * safe names (entry-path.ts), allowed types, links that stay inside the tree, and a tree of the
 * paths so far that refuses NFC / case collisions, a path through a file or a symlink, and a
 * directory turned into something else (`d/`, then symlink `d`, then `d/f`).
 *
 * `inspect` needs no memory of earlier entries; `place` records the entry in the tree. A
 * consumer that drops an entry inspects it (the archive must be sound) but does not place it, so
 * the tree is the one the consumer writes.
 */
export class EntryChecker<M = unknown> {
  readonly top: PathNode<M> = { segment: '', kind: 'directory', children: new Map(), explicit: false };
  private paths = 0;
  files = 0;
  dirs = 0;

  constructor(private readonly policy: CheckPolicy) {}

  /** The name under which a segment is one path: folded, or its own spelling (policy.collisions). */
  private keyOf(segment: string): string {
    return this.policy.collisions === 'exact' ? segment : collisionKey(segment);
  }

  inspect(h: CheckedHeader): Inspected {
    const { op } = this.policy;
    const type = h.type ?? undefined;
    const linky = type !== undefined && LINK_TYPES.has(type);
    if (linky && this.policy.links === 'refuse') {
      throw refuse(op, h.name, `${type} entries are refused (target ${JSON.stringify(h.linkname)})`);
    }
    // GNU tar extracts 'contiguous-file' (typeflag 7) as a regular file, and so does this.
    if (type !== 'file' && type !== 'contiguous-file' && type !== 'directory' && !linky) {
      throw refuse(op, h.name, `${type ?? 'unknown'} entries are refused`);
    }
    const isDir = type === 'directory';
    const segments = entrySegments(h.name, isDir, this.policy.maxPathDepth, op) ?? [];
    const out: Inspected = { name: h.name, type: type as EntryType, segments, size: isDir ? 0 : h.size };
    if (linky) {
      // tar-stream reads data for a link with a size; no packer writes one, and no reader agrees on it.
      if (h.size !== 0) throw refuse(op, h.name, `${type} entry carrying ${h.size} data bytes`);
      const target = h.linkname ?? '';
      out.target = type === 'link'
        ? entrySegments(target, false, this.policy.maxPathDepth, op, h.name)!
        : linkTargetSegments(target, h.name, this.policy.maxPathDepth, op);
    }
    return out;
  }

  /** Records an inspected entry in the tree, or refuses it. */
  place(e: Inspected): Placement<M> {
    const { segments } = e;
    if (e.type === 'directory') {
      const { node, createdFrom } = this.ensureDirs(e.name, segments, segments.length);
      node.explicit = true;
      return { node, createdFrom, replaces: false };
    }
    const { node: parent, createdFrom } = this.ensureDirs(e.name, segments, segments.length - 1);
    const last = segments[segments.length - 1]!;
    const key = this.keyOf(last);
    let resolved: string[] | undefined;
    if (e.type === 'symlink') resolved = this.resolveLink(e, segments.slice(0, -1));
    if (e.type === 'link') this.checkHardLink(e);
    const existing = parent.children!.get(key);
    let replaces = false;
    let node: PathNode<M>;
    if (existing && existing.kind !== 'none') {
      this.sameSpelling(existing, last, segments, segments.length - 1, e.name);
      if (existing.kind === 'directory') throw refuse(this.policy.op, e.name, `"${segments.join('/')}" is already a directory`);
      if (existing.kind === 'symlink' || e.type === 'symlink') {
        throw refuse(this.policy.op, e.name, `"${segments.join('/')}" is already in the archive, and one of the two is a symlink`);
      }
      replaces = true;
      node = existing;
    } else if (existing) {
      // A path a link resolved through: it may become a file, never a symlink (the link would now resolve elsewhere).
      if (e.type === 'symlink' && existing.walked) throw refuse(this.policy.op, e.name, 'an earlier link resolves through this path');
      node = existing;
      node.segment = last;
      delete node.children;
      this.files++;
    } else {
      node = this.add(parent, key, { segment: last, kind: 'file' }, e.name);
      this.files++;
    }
    node.kind = e.type === 'symlink' ? 'symlink' : 'file';
    if (resolved) node.resolved = resolved;
    return { node, createdFrom, replaces };
  }

  /** What the tree holds at `path` (segments joined by `/`), for a consumer deciding what to add. */
  kind(path: string): 'file' | 'directory' | 'implied-directory' | 'symlink' | undefined {
    let node: PathNode<M> | undefined = this.top;
    for (const seg of path.split('/').filter((s) => s !== '' && s !== '.')) {
      node = node.children?.get(this.keyOf(seg));
      if (!node) return undefined;
    }
    if (node.kind === 'none') return undefined;
    if (node.kind === 'directory') return node.explicit ? 'directory' : 'implied-directory';
    return node.kind;
  }

  /** Every directory of the tree with its path relative to the root (`''` for the root), parents first. */
  *directories(): Generator<[PathNode<M>, string]> {
    const stack: Array<[PathNode<M>, string]> = [[this.top, '']];
    for (let item = stack.pop(); item !== undefined; item = stack.pop()) {
      const [node, rel] = item;
      yield item;
      for (const child of node.children?.values() ?? []) {
        if (child.kind === 'directory') stack.push([child, rel === '' ? child.segment : `${rel}/${child.segment}`]);
      }
    }
  }

  /** Makes the first `count` segments directories of the tree; returns the last and where creation began. */
  private ensureDirs(name: string, segments: string[], count: number): { node: PathNode<M>; createdFrom: number } {
    let node = this.top;
    let createdFrom = count;
    for (let i = 0; i < count; i++) {
      const segment = segments[i]!;
      const key = this.keyOf(segment);
      const child = node.children!.get(key);
      if (child && child.kind !== 'none') {
        this.sameSpelling(child, segment, segments, i, name);
        const at = segments.slice(0, i + 1).join('/');
        if (child.kind === 'file') throw refuse(this.policy.op, name, `"${at}" is a file, not a directory`);
        if (child.kind === 'symlink') throw refuse(this.policy.op, name, `"${at}" is a symlink: nothing is written through a link`);
        node = child;
        continue;
      }
      if (child) {
        child.kind = 'directory';
        child.segment = segment;
        child.children ??= new Map();
        node = child;
      } else {
        node = this.add(node, key, { segment, kind: 'directory', children: new Map() }, name);
      }
      createdFrom = Math.min(createdFrom, i);
      this.dirs++;
    }
    return { node, createdFrom };
  }

  /**
   * Resolves a symlink's target through the tree as the kernel would, following the symlinks
   * already in it (each already resolved to a symlink-free path), so `..` after a link applies
   * where the link really leads. Refused when it leaves the root. Every path walked is marked, so
   * no later entry can turn it into a symlink and make this resolution wrong.
   */
  private resolveLink(e: Inspected, parent: string[]): string[] {
    let at = [...parent];
    for (const seg of e.target!) {
      if (seg === '..') {
        if (at.length === 0) throw refuse(this.policy.op, e.name, `symlink target ${JSON.stringify(e.target!.join('/'))} points out of the tree`);
        at.pop();
        continue;
      }
      at.push(seg);
      const node = this.walk(at, e.name);
      if (node.kind === 'symlink') at = [...node.resolved!];
    }
    if (at.length > this.policy.maxPathDepth) throw limitError(`symlink target depth ${at.length} is over the limit of ${this.policy.maxPathDepth}`, e.name, this.policy.op);
    return at;
  }

  /** The node at `path`, made as a `none` placeholder where missing, and marked walked. */
  private walk(path: string[], name: string): PathNode<M> {
    let node = this.top;
    for (const seg of path) {
      const key = this.keyOf(seg);
      let child = node.children?.get(key);
      if (!child) {
        // Under a file there is nothing to walk into: resolving fails there (ENOTDIR), harmlessly.
        if (!node.children) return node;
        child = this.add(node, key, { segment: seg, kind: 'none', children: new Map() }, name);
      }
      child.walked = true;
      node = child;
    }
    return node;
  }

  /** A hard link must name a regular file already in the tree (tar links to an earlier member). */
  private checkHardLink(e: Inspected): void {
    let node: PathNode<M> | undefined = this.top;
    for (const seg of e.target!) node = node?.children?.get(this.keyOf(seg));
    if (node?.kind !== 'file') throw refuse(this.policy.op, e.name, `hard link target ${JSON.stringify(e.target!.join('/'))} is not a regular file earlier in the archive`);
    if (e.target!.join('/') === e.segments.join('/')) throw refuse(this.policy.op, e.name, 'hard link to itself');
  }

  private add(parent: PathNode<M>, key: string, node: PathNode<M>, name: string): PathNode<M> {
    if (this.paths >= this.policy.maxPaths) throw limitError(`more than ${this.policy.maxPaths} paths (maxEntries)`, name, this.policy.op);
    this.paths++;
    parent.children!.set(key, node);
    return node;
  }

  private sameSpelling(node: PathNode<M>, segment: string, segments: string[], i: number, name: string): void {
    if (node.segment !== segment) {
      const at = segments.slice(0, i).concat(segment).join('/');
      const other = segments.slice(0, i).concat(node.segment).join('/');
      throw refuse(this.policy.op, name, `"${at}" collides with "${other}" (same name after Unicode NFC and case folding)`);
    }
  }
}

function refuse(op: string, name: string, detail: string): StorageError {
  return new StorageError(ErrorCode.InvalidInput, detail, { op, key: name });
}
