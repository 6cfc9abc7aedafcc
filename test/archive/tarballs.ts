import { mkdir, readdir, lstat } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { gzipSync } from 'node:zlib';
import { pack, type Header } from 'tar-stream';
import { tempDir } from '../harness/process.js';

/**
 * Hand-made tar blocks, byte for byte, for archives no honest packer writes: names tar-stream's
 * pack would reject or rewrite, huge PAX and GNU long-name headers, NUL inside a PAX path, device
 * entries. Each helper returns Buffers to concatenate; `tarball` adds the end-of-archive blocks.
 */
export interface RawHeader {
  name: string;
  /** The typeflag character: '0' file, '1' hardlink, '2' symlink, '3' char, '4' block, '5' dir, '6' fifo, 'x' PAX, 'g' PAX global, 'L' GNU long name. */
  type?: string;
  size?: number;
  mode?: number;
  /** Seconds since the epoch. */
  mtime?: number;
  linkname?: string;
}

export function header(h: RawHeader): Buffer {
  const b = Buffer.alloc(512);
  const name = Buffer.from(h.name);
  if (name.length > 100) throw new Error(`raw header name over 100 bytes: use a PAX or GNU long-name header`);
  name.copy(b, 0);
  octal(b, 100, 8, h.mode ?? 0o644);
  octal(b, 108, 8, 0);
  octal(b, 116, 8, 0);
  octal(b, 124, 12, h.size ?? 0);
  octal(b, 136, 12, h.mtime ?? 1_700_000_000);
  b.write(h.type ?? '0', 156, 'latin1');
  if (h.linkname) b.write(h.linkname, 157);
  b.write('ustar\u000000', 257, 'latin1');
  b.fill(0x20, 148, 156); // the checksum is computed over spaces in its own field
  let sum = 0;
  for (const byte of b) sum += byte;
  b.write(`${sum.toString(8).padStart(6, '0')}\u0000 `, 148, 'latin1');
  return b;
}

function octal(b: Buffer, at: number, len: number, value: number): void {
  b.write(`${value.toString(8).padStart(len - 1, '0')}\u0000`, at, 'latin1');
}

/** Data padded to whole 512-byte blocks. */
export function padded(data: Buffer): Buffer {
  const rest = data.length % 512;
  return rest === 0 ? data : Buffer.concat([data, Buffer.alloc(512 - rest)]);
}

/** One entry: header, data, padding. */
export function entry(h: RawHeader, data: Buffer | string = Buffer.alloc(0)): Buffer {
  const bytes = Buffer.from(data);
  return Buffer.concat([header({ ...h, size: h.size ?? bytes.length }), padded(bytes)]);
}

/** PAX records (`<len> key=value\n`), length prefix computed the way POSIX defines it. */
export function paxRecords(records: Array<[string, string]>): Buffer {
  return Buffer.concat(records.map(([k, v]) => {
    const body = Buffer.from(` ${k}=${v}\n`);
    let len = body.length + 1;
    while (String(len).length + body.length > len) len++;
    return Buffer.concat([Buffer.from(String(len)), body]);
  }));
}

/** A PAX extended header ('x', or 'g' for global) carrying `records`. */
export function pax(records: Array<[string, string]>, type = 'x'): Buffer {
  return entry({ name: 'PaxHeader', type }, paxRecords(records));
}

/** A GNU long-name ('L') header carrying `name`. */
export function gnuLongName(name: string): Buffer {
  return entry({ name: '././@LongLink', type: 'L' }, Buffer.concat([Buffer.from(name), Buffer.alloc(1)]));
}

export function tarball(...parts: Buffer[]): Buffer {
  return Buffer.concat([...parts, Buffer.alloc(1024)]);
}

/** An honest archive, written by tar-stream's own packer. */
export async function packed(entries: Array<Partial<Header> & { name: string; data?: string | Buffer }>): Promise<Buffer> {
  const p = pack();
  // Read while adding: the packer holds back an entry's callback until its output is read, so
  // reading only afterwards would stall past its buffer (about 16 small entries).
  const chunks: Buffer[] = [];
  const read = (async () => { for await (const c of p) chunks.push(c as Buffer); })();
  for (const { data, ...h } of entries) {
    await new Promise<void>((resolve, reject) => {
      p.entry(h, data ?? Buffer.alloc(0), (err) => (err ? reject(err) : resolve()));
    });
  }
  p.finalize();
  await read;
  return Buffer.concat(chunks);
}

export const gz = (tar: Buffer): Buffer => gzipSync(tar, { level: 9 });

/** An archive as a stream in small chunks, the way a backend delivers it. */
export function streamOf(bytes: Buffer, chunk = 16 * 1024): Readable {
  return Readable.from((function* () {
    for (let at = 0; at < bytes.length; at += chunk) yield bytes.subarray(at, at + chunk);
  })(), { objectMode: false });
}

/**
 * A plain tar produced lazily: `prefix` blocks, then one entry header declaring `size` bytes whose
 * data is generated on demand (`fill`), then the trailer. `produced()` tells how far a consumer read.
 */
export function lazyTar(prefix: Buffer, h: RawHeader & { size: number }, fill: number | Buffer = 0x61): { stream: Readable; produced(): number } {
  let produced = 0;
  const block = typeof fill === 'number' ? Buffer.alloc(64 * 1024, fill) : fill;
  const gen = function* (): Generator<Buffer> {
    for (const b of [prefix, header(h)]) { produced += b.length; yield b; }
    for (let left = h.size; left > 0; left -= block.length) {
      const b = left >= block.length ? block : block.subarray(0, left);
      produced += b.length;
      yield b;
    }
    const tail = Buffer.alloc(((512 - (h.size % 512)) % 512) + 1024);
    produced += tail.length;
    yield tail;
  };
  return { stream: Readable.from(gen(), { objectMode: false }), produced: () => produced };
}

/** A scratch area: `<root>/staging/out` is the destination, `<root>` the "outside". */
export async function sandbox(): Promise<{ root: string; parent: string; dest: string; remove(): Promise<void> }> {
  const dir = await tempDir('stevedore-archive-');
  const parent = join(dir.path, 'staging');
  await mkdir(parent);
  return { root: dir.path, parent, dest: join(parent, 'out'), remove: dir.remove };
}

/** Every path under `dir`, relative, directories included, symlinks not followed. */
export async function listAll(dir: string, prefix = ''): Promise<string[]> {
  // By hand: readdir's `recursive` descends into symlinked directories.
  const out: string[] = [];
  for (const d of await readdir(dir, { withFileTypes: true })) {
    out.push(prefix + d.name);
    if (d.isDirectory()) out.push(...(await listAll(join(dir, d.name), `${prefix}${d.name}/`)));
  }
  return out.sort();
}

export async function exists(path: string): Promise<boolean> {
  return lstat(path).then(() => true, () => false);
}
