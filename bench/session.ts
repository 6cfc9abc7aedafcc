/**
 * `npm run bench -- --session`: repack-session on the seekable format beside GNU tar measured in
 * the same run (extract then create: the naive repack), on a 5,000-file session (~18 MiB) and the
 * same plus four 48 MiB binaries (~200 MB), on the filesystem backend; then the same one-file edit
 * on s3rver and azurite (the test suite's shims, which have UploadPartCopy and Put Block From URL
 * and count uploaded bytes), spliced beside the streaming put. `--session-s3` and
 * `--session-azure` run the rows of that store alone. Goals are printed, never asserted.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Writable, type Readable } from 'node:stream';
import { Redis } from 'ioredis';
import { RepackPayload, repackSession } from '../jobs/repack-session.js';
import { FsDriver } from '../src/backends/fs.js';
import { AzureDriver } from '../src/backends/azure.js';
import { S3Driver } from '../src/backends/s3.js';
import { parsePayload } from '../src/payload.js';
import { Bucket } from '../src/storage/bucket.js';
import { sessionKey } from '../src/session/ids.js';
import { catSession } from '../src/session/read.js';
import { overrideDriver } from '../test/fixtures/override-driver.js';
import { freePort, startServerProcess, tempDir } from '../test/harness/process.js';
import { startAzurite, type Azurite } from '../test/harness/azure.js';
import { startS3rver, type S3rver } from '../test/harness/s3.js';
import { run as sh } from '../test/archive/corpus.js';
import { jobDeps } from '../test/session/helpers.js';
import { compileCases, dd, progress, randomFile, settle } from './proc.js';
import { MiB, ratio, secs, size, stats, table, verdict } from './table.js';

const RUNS = Number(process.env.BENCH_SESSION_RUNS ?? 3);
const FILES = 5000;
const WORDS = ['const', 'return', 'function', 'export', 'import', 'await', 'async', 'if', 'else', 'for', 'let', 'new', 'this', 'null', 'true', 'string', 'number'];

/** A source-like tree: FILES text files in 100 directories, identifiers random enough to compress about 2:1. */
async function sourceTree(dir: string): Promise<void> {
  for (let d = 0; d < 100; d++) {
    await mkdir(join(dir, `src/pkg-${d}/lib`), { recursive: true });
    for (let f = 0; f < FILES / 100; f++) {
      const lines: string[] = [];
      const n = 40 + ((d * 31 + f * 17) % 200);
      for (let i = 0; i < n; i++) lines.push(`  ${WORDS[(i * 7 + f) % WORDS.length]} v_${randomBytes(5).toString('base64url')} = ${WORDS[(i + d) % WORDS.length]}(${randomBytes(3).readUIntBE(0, 3)}, 'k${randomBytes(4).toString('hex')}');`);
      await writeFile(join(dir, `src/pkg-${d}/lib/mod-${f}.ts`), `// pkg ${d} module ${f}\n${lines.join('\n')}\n`);
    }
  }
}

async function timed<T>(f: () => Promise<T>): Promise<{ ms: number; value: T }> {
  const t = performance.now();
  const value = await f();
  return { ms: performance.now() - t, value };
}

const median = (xs: number[]): number => stats(xs).median;
const EDIT_PATH = 'src/pkg-50/lib/mod-25.ts';

/** A cloud store the one-file edit runs on: the emulator with the suite's shim, which counts what was uploaded. */
interface CloudStore {
  /** `S3` or `Azure`, for the rows. */
  name: string;
  /** A bucket on a fresh container, splicing or not (the same container for both). */
  buckets(): Promise<(splice: boolean) => Bucket>;
  uploadedBytes(): Promise<number>;
}

const s3Store = (s3: S3rver): CloudStore => ({
  name: 'S3',
  async buckets() {
    const name = await s3.bucket();
    return (splice) => new Bucket(new S3Driver({ ...s3.driverOptions(name), splice }), { name: 's3' });
  },
  uploadedBytes: async () => (await s3.stats()).uploadedBytes,
});

const azureStore = (az: Azurite): CloudStore => ({
  name: 'Azure',
  async buckets() {
    const container = (await az.container()).containerName;
    return (splice) => new Bucket(new AzureDriver({ connectionString: az.connectionString, container, splice }), { name: 'azure' });
  },
  uploadedBytes: async () => (await az.stats()).uploadedBytes,
});

/**
 * The one-file edit of the seekable archive at `archive` on a cloud store, spliced and by the
 * streaming put, alternating: time and the bytes the worker uploaded (counted by the emulator's
 * shim), medians of RUNS.
 */
async function cloudRows(store: CloudStore, archive: string, archiveSize: number, repack: (bucket: Bucket, session: string, ops: unknown[]) => Promise<unknown>): Promise<string[][]> {
  const bucket = await store.buckets();
  const ms: Record<'splice' | 'stream', number[]> = { splice: [], stream: [] };
  const up: Record<'splice' | 'stream', number[]> = { splice: [], stream: [] };
  let editBytes = 0;
  for (let r = 0; r < RUNS; r++) {
    for (const splice of [false, true]) {
      const how = splice ? 'splice' : 'stream';
      const b = bucket(splice);
      const s = `bench__${store.name.toLowerCase()}__${how}${r}`;
      await b.put(sessionKey(s), { path: archive });
      await settle();
      const text = `// edited on ${store.name} in round ${r}\n`;
      editBytes = text.length;
      const before = await store.uploadedBytes();
      ms[how].push((await timed(() => repack(b, s, [{ op: 'put', path: EDIT_PATH, text }]))).ms);
      up[how].push((await store.uploadedBytes()) - before);
    }
  }
  const uploaded = (xs: number[]): string => `${size(median(xs))} uploaded (${((median(xs) / archiveSize) * 100).toFixed(1)}%)`;
  const goal = 3 * 5 * MiB + editBytes;
  return [
    [`${store.name} one-file edit, streaming put (splice=0)`, secs(median(ms.stream)), uploaded(up.stream), '', ''],
    [`${store.name} one-file edit, splice on (spliced where shouldSplice picks it)`, secs(median(ms.splice)), uploaded(up.splice), store.name === 'S3' ? '<= 3 x 5 MiB + file' : '<= 3 x 5 MiB + file (the S3 goal)', verdict(median(up.splice) / goal, 1)],
  ];
}

export async function sessionBench(opts: { fs?: boolean; clouds?: ReadonlyArray<'s3' | 'azure'> } = {}): Promise<string> {
  const withFs = opts.fs ?? true;
  const clouds = opts.clouds ?? ['s3', 'azure'];
  const dir = await tempDir('stevedore-bench-session-');
  const port = await freePort();
  const redisProc = await startServerProcess({ command: 'redis-server', args: ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], port });
  const redis = new Redis(`redis://127.0.0.1:${port}`, { maxRetriesPerRequest: null });
  const out: string[] = [];
  let s3: S3rver | undefined;
  let az: Azurite | undefined;
  try {
    const stores: CloudStore[] = [];
    if (clouds.includes('s3')) stores.push(s3Store(s3 = await startS3rver()));
    if (clouds.includes('azure')) stores.push(azureStore(az = await startAzurite()));
    const cloudEdits = async (archive: string): Promise<string[][]> => {
      const archiveSize = (await stat(archive)).size;
      const rows: string[][] = [];
      for (const store of stores) rows.push(...await cloudRows(store, archive, archiveSize, repackOn));
      return rows;
    };
    const staging = join(dir.path, 'staging');
    await mkdir(staging, { recursive: true });
    const fs = new FsDriver({ root: join(dir.path, 'objects') });
    let readBytes = 0;
    const counted = overrideDriver(fs, {
      get: async (key, range, signal) => {
        const got = await fs.get(key, range, signal);
        (got.stream as Readable).on('data', (c: Buffer) => { readBytes += c.length; });
        return got;
      },
    });
    const bucket = new Bucket(counted, { name: 'bench' });
    // The edit once more in a fresh process, for a worker's peak RSS (this one holds the corpora): compiled for the filesystem rows only.
    let child: Awaited<ReturnType<typeof compileCases>> | undefined;
    let job = 0;
    const repackOn = (b: Bucket, session: string, ops: unknown[]) => repackSession(parsePayload(RepackPayload, { session, ops }), jobDeps(b, redis, staging, { jobId: `b${++job}`, enqueuedAt: Date.now() }));
    const repack = (session: string, ops: unknown[]) => repackOn(bucket, session, ops);

    for (const big of [false, true]) {
      const label = big ? '~200 MB session (5,000 files + 4 x 48 MiB binaries)' : '5,000-file session';
      const tree = join(dir.path, big ? 'tree-big' : 'tree');
      await sourceTree(tree);
      if (big) for (let i = 0; i < 4; i++) await randomFile(join(tree, `blob-${i}.bin`), 48 * MiB);
      const gnu = join(dir.path, 'gnu.tgz');
      await rm(gnu, { force: true });
      await sh('tar', ['-czf', gnu, '-C', tree, '.']);
      const gnuSize = (await stat(gnu)).size;
      progress(`${label}: GNU tar -czf made ${size(gnuSize)}`);
      if (!withFs) {
        const s = `bench__session__s3${big ? 'big' : ''}`;
        await bucket.put(sessionKey(s), { path: gnu });
        await repack(s, [{ op: 'put', path: 'NOTES.md', text: 'converted\n' }]);
        const names = stores.map((c) => (c.name === 'S3' ? 'S3 (s3rver + shim)' : 'Azure (azurite + shim)')).join(' and ');
        out.push(table(`Session archives: ${label}, one-file edit on ${names}, medians of ${RUNS}`, ['case', 'time', 'ratio / figure', 'goal', ''], await cloudEdits(join(dir.path, 'objects', sessionKey(s)))));
        await rm(tree, { recursive: true, force: true });
        continue;
      }

      child ??= await compileCases(join(dir.path, 'compiled'));
      const gnuMs: number[] = [];
      const convMs: number[] = [];
      const editMs: number[] = [];
      const ddMs: number[] = [];
      let seekSize = 0;
      let rss = { base: 0, peak: 0 };
      for (let r = 0; r < RUNS; r++) {
        await settle();
        const x = join(dir.path, 'x');
        await rm(x, { recursive: true, force: true });
        await mkdir(x);
        gnuMs.push((await timed(async () => {
          await sh('tar', ['-xzf', gnu, '-C', x]);
          await sh('tar', ['-czf', join(dir.path, 'gnu-out.tgz'), '-C', x, '.']);
        })).ms);
        await rm(x, { recursive: true, force: true });
        // Conversion: the first repack of the GNU archive (one small put).
        const s = `bench__session__r${r}${big ? 'big' : ''}`;
        await bucket.put(sessionKey(s), { path: gnu });
        await settle();
        convMs.push((await timed(() => repack(s, [{ op: 'put', path: 'NOTES.md', text: `round ${r}\n` }]))).ms);
        seekSize = (await bucket.stat(sessionKey(s))).size;
        // A one-file edit of the seekable archive.
        await settle();
        editMs.push((await timed(() => repack(s, [{ op: 'put', path: EDIT_PATH, text: `// edited in round ${r}\n` }]))).ms);
        await settle();
        const worker = await child('session-edit', { root: join(dir.path, 'objects'), file: staging, redis: `redis://127.0.0.1:${port}`, session: s, key: 'src/pkg-51/lib/mod-26.ts' });
        rss = { base: Math.max(rss.base, worker.baseRssKiB * 1024), peak: Math.max(rss.peak, worker.maxRssKiB * 1024) };
        if (big) {
          await settle();
          ddMs.push(await dd(join(dir.path, 'objects', sessionKey(s)), join(dir.path, 'dd-copy')));
          await rm(join(dir.path, 'dd-copy'), { force: true });
        }
      }
      const s0 = `bench__session__r0${big ? 'big' : ''}`;
      // session cat of a small file, against tar -xzOf of the same file from the GNU archive.
      const catMs: number[] = [];
      const tarCatMs: number[] = [];
      let catBytes = 0;
      for (let r = 0; r < RUNS; r++) {
        readBytes = 0;
        catMs.push((await timed(() => catSession(bucket, s0, 'src/pkg-10/lib/mod-3.ts', new Writable({ write: (_c, _e, cb) => cb() })))).ms);
        catBytes = readBytes;
        tarCatMs.push((await timed(() => sh('tar', ['-xzOf', gnu, './src/pkg-10/lib/mod-3.ts']))).ms);
      }
      const g = median(gnuMs);
      const rows = [
        ['GNU tar -xzf then -czf (reference)', secs(g), '1.00x', '', ''],
        ['first repack (conversion)', secs(median(convMs)), ratio(median(convMs), g), '<= 0.5x', verdict(median(convMs) / g, 0.5)],
        ['one-file edit', secs(median(editMs)), ratio(median(editMs), g), '<= 0.1x', verdict(median(editMs) / g, 0.1)],
      ];
      if (big) rows.push(['dd conv=fsync of the archive', secs(median(ddMs)), `edit ${ratio(median(editMs), median(ddMs))} of dd`, 'edit <= 1.5x dd', verdict(median(editMs) / median(ddMs), 1.5)]);
      rows.push(
        ['archive size', size(seekSize), `${(seekSize / gnuSize).toFixed(3)}x GNU (${size(gnuSize)})`, '<= 1.05x', verdict(seekSize / gnuSize, 1.05)],
        ['session cat, small file', secs(median(catMs)), `${size(catBytes)} read (${((catBytes / seekSize) * 100).toFixed(2)}%)`, '', ''],
        ['tar -xzOf, same file', secs(median(tarCatMs)), `cat ${ratio(median(catMs), median(tarCatMs))}`, '', ''],
        ['edit in a fresh process: peak RSS', `${size(rss.base)} loaded`, `peak ${size(rss.peak)} (+${size(rss.peak - rss.base)})`, '< 150 MB', verdict(rss.peak / (150e6), 1)],
        ...await cloudEdits(join(dir.path, 'objects', sessionKey(s0))),
      );
      out.push(table(`Session archives: ${label}, filesystem, medians of ${RUNS}`, ['case', 'time', 'ratio / figure', 'goal', ''], rows));
      await rm(tree, { recursive: true, force: true });
    }
  } finally {
    await s3?.stop();
    await az?.stop();
    await redis.quit().catch(() => {});
    await redisProc.stop();
    await dir.remove();
  }
  return out.join('\n');
}
