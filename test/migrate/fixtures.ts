import { createHash } from 'node:crypto';
import { lstat, mkdir, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { Bucket } from '../../src/storage/bucket.js';

/** Keys every backend must carry through a migration: unicode, spaces, %, +, deep paths. */
export const AWKWARD_KEYS = [
  'a.txt',
  'deep/er/and/deeper/still/leaf.bin',
  'with space/and more spaces.dat',
  'percent%20not-an-escape%zz',
  'plus+and=equals&amp',
  'unicode/naïve/日本語/ファイル.txt',
  'unicode/emoji-🚚.bin',
  'zero-length',
];

/** A tree of `count` objects of mixed sizes (0 B to ~300 KiB) plus the awkward keys. */
export function mixedTree(count: number, seed = 1): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  const sizes = [0, 1, 1000, 16 * 1024, 300 * 1024 + 7];
  const keys = [...AWKWARD_KEYS, ...Array.from({ length: Math.max(0, count - AWKWARD_KEYS.length) }, (_, i) => `tree/${String(i % 7)}/obj-${String(i).padStart(4, '0')}.bin`)];
  keys.forEach((k, i) => {
    const size = k === 'zero-length' ? 0 : sizes[(i + seed) % sizes.length]!;
    const b = Buffer.alloc(size);
    for (let j = 0; j < size; j++) b[j] = (j * 31 + i * 7 + seed) & 0xff;
    if (size > 8) b.write(`${k}#${seed}`.slice(0, size));
    out.set(k, b);
  });
  return out;
}

export const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** Writes the tree as plain files (no sidecars): a tree another tool wrote. */
export async function writeLegacyTree(root: string, tree: Map<string, Buffer>): Promise<void> {
  for (const [k, b] of tree) {
    await mkdir(dirname(join(root, k)), { recursive: true });
    await writeFile(join(root, k), b);
  }
}

/** Writes the tree through the Bucket (every object with its recorded digest). */
export async function putTree(b: Bucket, tree: Map<string, Buffer>, prefix = ''): Promise<void> {
  for (const [k, v] of tree) await b.put(prefix + k, v, { contentType: 'application/x-test', metadata: { origin: 'fixture' } });
}

/** Every object's key -> sha256 of its bytes (read and hashed here), and the recorded digest. */
export async function contents(b: Bucket, prefix = ''): Promise<Map<string, { sha: string; recorded: string | undefined; type: string | undefined; meta: Record<string, string> }>> {
  const out = new Map<string, { sha: string; recorded: string | undefined; type: string | undefined; meta: Record<string, string> }>();
  for await (const o of b.list(prefix)) {
    const got = await b.get(o.key);
    const h = createHash('sha256');
    for await (const c of got.stream) h.update(c as Buffer);
    out.set(o.key, { sha: h.digest('hex'), recorded: got.info.sha256, type: got.info.contentType, meta: got.info.metadata });
  }
  return out;
}

/** Flips one byte of a file in place (same inode), as bit rot would: its recorded digest stays. */
export async function flipByte(path: string, at = 0): Promise<void> {
  const { open } = await import('node:fs/promises');
  const before = await lstat(path);
  const fh = await open(path, 'r+');
  try {
    const buf = Buffer.alloc(1);
    await fh.read(buf, 0, 1, at);
    buf[0] = buf[0]! ^ 0xff;
    await fh.write(buf, 0, 1, at);
  } finally {
    await fh.close();
  }
  if ((await lstat(path)).ino !== before.ino) throw new Error('flipByte changed the inode');
}
