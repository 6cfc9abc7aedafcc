/**
 * `npm run bench`: storage throughput and memory, each figure printed beside a reference measured
 * in the same run on the same machine (openssl for hashing, a bare lib-storage Upload for S3), so
 * the ratios mean something on any box. It only measures and prints; goals are shown, never asserted.
 */
import { mkdir, mkdtemp, rm, statfs } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { DeleteObjectCommand } from '@aws-sdk/client-s3';
import { startS3rver, type S3rver } from '../test/harness/s3.js';
import { compileCases, dd, openssl, progress, randomFile, settle, teePipeline, warm, type Child } from './proc.js';
import { metricsBench } from './metrics.js';
import { largeStoreBench, queueBench } from './queue.js';
import { sessionBench } from './session.js';
import { groupCommitBench } from './group-commit.js';
import { GiB, MiB, mb, mbRange, mbps, ratio, secs, size, stats, table, verdict, type Stats } from './table.js';

const RUNS = 3;
/**
 * The filesystem table's goals are within 10-30% of their references on a shared 2-core VM: more
 * runs, so the median is not one noisy spell. `BENCH_FS_RUNS` changes it (fewer while iterating).
 */
const FS_RUNS = Number(process.env.BENCH_FS_RUNS ?? 5);
/** The issue's limit for one S3 run of the main file; beyond it the S3 section measures 256 MiB. */
const S3_RUN_BUDGET_MS = 60_000;

/** One timed run; RSS and CPU only for our own processes (not openssl, dd). */
interface Run {
  ms: number;
  bytes: number;
  maxRssKiB?: number;
  cpuMs?: number;
}

interface Variant {
  label: string;
  /** Goal for median / reference median; undefined for rows shown for information. */
  goal?: number;
  /** Short name in the ratio column of the rows measured against this one. */
  short?: string;
  /** Label of the variant this row's ratio is taken against. @defaultValue the first variant */
  vs?: string;
  /** Untimed preparation just before each run (after the `sync`). */
  before?(round: number): Promise<void>;
  run(round: number): Promise<Run>;
  /** Untimed clean-up after each run: roots and objects go, so disk use stays flat. */
  after?(round: number): Promise<void>;
}

interface Timed {
  v: Variant;
  time: Stats;
  bytes: number;
  /** Peak RSS of each run, KiB; empty for processes that are not ours (openssl, dd). */
  rssKiB: number[];
  cpu: Stats | undefined;
}

/**
 * `n` rounds of every variant, interleaved so a slow spell on this shared machine lands on all of
 * them rather than on one, and alternating direction (A B C, C B A, ...) so no variant always
 * runs right after the same neighbour; a `sync` before each run keeps one run's writeback out of
 * the next run's time.
 */
async function rounds(variants: Variant[], n = RUNS): Promise<Timed[]> {
  const runs = variants.map(() => [] as Run[]);
  for (let i = 0; i < n; i++) {
    const order = [...variants.entries()];
    if (i % 2) order.reverse();
    for (const [j, v] of order) {
      await settle();
      await v.before?.(i);
      const r = await v.run(i);
      await v.after?.(i);
      progress(`${v.label}: run ${i + 1}/${n} ${secs(r.ms)} (${mbps(r.bytes, r.ms)}${r.cpuMs ? `, CPU ${secs(r.cpuMs)}` : ''}${r.maxRssKiB ? `, peak RSS ${mb(r.maxRssKiB)}` : ''})`);
      runs[j]!.push(r);
    }
  }
  return variants.map((v, j) => {
    const rs = runs[j]!;
    const rss = rs.map((r) => r.maxRssKiB).filter((x) => x !== undefined).sort((a, b) => a - b);
    const cpu = rs.map((r) => r.cpuMs).filter((x) => x !== undefined);
    return { v, time: stats(rs.map((r) => r.ms)), bytes: rs[0]!.bytes, rssKiB: rss, cpu: cpu.length ? stats(cpu) : undefined };
  });
}

const HEAD = ['operation', 'median', 'min', 'MB/s (median)', 'ratio', 'paired', 'goal', 'CPU (median)', 'peak RSS (min-max)'];

function rows(timed: Timed[]): string[][] {
  const refOf = (t: Timed) => (t.v.vs === undefined ? timed[0]! : timed.find((r) => r.v.label === t.v.vs)!);
  const isRef = (t: Timed) => t === timed[0] || timed.some((r) => r.v.vs === t.v.label);
  return timed.map((t) => {
    const ref = refOf(t);
    const of = ref.v.short && ref !== t ? ` vs ${ref.v.short}` : '';
    // Each round's run over its reference's run of the same round: a slow spell that hit one round
    // hits both, so the median of these moves less than the ratio of the medians.
    const paired = ref === t ? '-' : `${stats(t.time.runs.map((ms, i) => ms / ref.time.runs[i]!)).median.toFixed(2)}x`;
    return [
      t.v.label, secs(t.time.median), secs(t.time.min), mbps(t.bytes, t.time.median), `${ratio(t.time.median, ref.time.median)}${of}`, paired,
      t.v.goal !== undefined ? `<= ${t.v.goal}x ${verdict(t.time.median / ref.time.median, t.v.goal)}` : isRef(t) ? 'reference' : '(info)',
      t.cpu === undefined ? '-' : secs(t.cpu.median), t.rssKiB.length ? mbRange(t.rssKiB[0]!, t.rssKiB.at(-1)!) : '-',
    ];
  });
}

async function fsSection(child: Child, work: string, file: string, bytes: number, notes: string[]): Promise<{ out: string; sha256: string }> {
  progress(`warming the page cache with ${file}`);
  await warm(file);
  const { sha256 } = await openssl(file);
  progress('writing the object every fs get reads');
  const root = (tag: string, i: number) => join(work, `${tag}-${i}`);
  const drop = (tag: string) => (i: number) => rm(root(tag, i), { recursive: true, force: true });
  // The object every get reads, written once, untimed; as fresh in the page cache as the file openssl reads.
  await child('fs-put', { file, root: join(work, 'seed') });
  await mkdir(join(work, 'naive'));
  const naive = (chunk?: number) => async () => child('naive-copy', { file, root: join(work, 'naive'), chunk });
  const PIPE = 'tee >(openssl dgst -sha256) | dd bs=1M conv=fsync (reference)';
  const OPENSSL = 'openssl dgst -sha256 (reference for get)';
  const pipeOut = join(work, 'pipe-out');
  const timed = await rounds([
    {
      label: PIPE, short: 'pipeline', after: () => rm(pipeOut),
      run: async () => {
        const r = await teePipeline(file, pipeOut);
        if (r.sha256 !== sha256) throw new Error(`the pipeline's openssl printed ${r.sha256}, not ${sha256}`);
        return { ms: r.ms, bytes };
      },
    },
    { label: 'fs put {path}', goal: 1.1, run: (i) => child('fs-put', { file, root: root('put', i) }), after: drop('put') },
    { label: OPENSSL, short: 'openssl', run: async () => ({ ms: (await openssl(file)).ms, bytes }) },
    { label: 'fs get + verify', goal: 1.3, vs: OPENSSL, run: () => child('fs-get', { root: join(work, 'seed') }) },
    { label: 'fs put {path}, fsync off', run: (i) => child('fs-put', { file, root: root('nosync', i), fsync: 'off' }), after: drop('nosync') },
    { label: 'dd bs=1M conv=fsync (no hash)', run: async () => ({ ms: await dd(file, join(work, 'dd-out')), bytes }), after: () => rm(join(work, 'dd-out')) },
    { label: 'naive copy, 64 KiB chunks', run: naive(), after: () => rm(join(work, 'naive/obj')) },
    { label: 'naive copy, 1 MiB chunks', run: naive(MiB), after: () => rm(join(work, 'naive/obj')) },
  ], FS_RUNS);
  const out = table(`Filesystem backend, ${size(bytes)} of random bytes (ratio = median / the named reference's median; ${FS_RUNS} runs each)`, HEAD, rows(timed), [
    ...notes,
    'CPU: user + system time of our Node process (all its threads) during the operation; less moved by other load than wall time.',
    'fs put: Bucket(FsDriver).put(key, {path}) into a fresh root: read, hash, write, fsync file + dirs, rename (as in production).',
    'pipeline: `tee >(openssl dgst -sha256) < file | dd of=out bs=1M conv=fsync` in bash, timed until openssl has printed its',
    '  digest (checked): the same work as a put (one read, hash, durable write) by the best standard tools; the put\'s reference.',
    'fs get: Bucket.get(key) piped to a null sink, verified against the recorded digest; the object is in the page cache.',
    'For information: the same put with fsync off (the Node path alone), dd (the disk\'s floor for a durable copy, no',
    '  hashing), and a hand-written createReadStream -> sha256 Transform -> createWriteStream({flush: true}).',
    'Runs alternate direction each round (A B C ..., ... C B A), so no row always follows the same neighbour. paired: the',
    '  median over rounds of (this run / the reference\'s run in the same round); the goal is judged on the ratio of medians.',
  ]);
  return { out, sha256 };
}

async function s3Section(child: Child, s3: S3rver, work: string, main: { file: string; bytes: number; sha256: string }, probe: { file: string; bytes: number }): Promise<{ out: string; msPerByte: number }> {
  const bucket = await s3.bucket();
  const opts = JSON.stringify(s3.driverOptions(bucket));
  const del = (key: string) => () => s3.client.send(new DeleteObjectCommand({ Bucket: bucket, Key: key })).then(() => {});
  // A probe with the small file tells whether the main file fits the issue's time limit.
  const p = await child('s3-upload', { file: probe.file, s3: opts, key: 'probe' });
  await del('probe')();
  const notes: string[] = [];
  let target = main;
  const estimate = (p.ms / probe.bytes) * main.bytes;
  if (estimate > S3_RUN_BUDGET_MS) {
    target = { file: join(work, 's3-256m'), bytes: 256 * MiB, sha256: '' };
    notes.push(`SCALED DOWN: a ${size(probe.bytes)} probe upload took ${secs(p.ms)}, so ${size(main.bytes)} would take ~${secs(estimate)} per run; measured ${size(target.bytes)}.`);
    await randomFile(target.file, target.bytes);
    target.sha256 = (await openssl(target.file)).sha256;
  }
  progress(`s3: ${size(target.bytes)} per run (probe: ${size(probe.bytes)} in ${secs(p.ms)})`);
  const put = (tag: string, sha256?: string): Variant['run'] => (i) => child(tag === 'upload' ? 's3-upload' : 's3-put', { file: target.file, s3: opts, key: `${tag}-${i}`, sha256 });
  const timed = await rounds([
    { label: 'bare lib-storage Upload (reference)', run: put('upload'), after: (i) => del(`upload-${i}`)() },
    { label: 'Bucket.put {path}, sha256 given', goal: 1.1, run: put('given', target.sha256), after: (i) => del(`given-${i}`)() },
    { label: 'Bucket.put {path}, pre-hashed', goal: 1.1, run: put('hashed'), after: (i) => del(`hashed-${i}`)() },
  ]);
  const out = table(`S3 on s3rver, ${size(target.bytes)} of random bytes (ratio = median / bare Upload median)`, HEAD, rows(timed), [
    ...notes,
    'Same S3Client (the driver\'s own), partSize 8 MiB, queueSize 4, same s3rver; each object deleted after its run.',
    'pre-hashed: no sha256 given, so the Bucket reads the file once to hash it before uploading (as rclone does).',
    'The reference: Upload of createReadStream(file) (64 KiB chunks), no metadata. s3rver shares the 2 cores and is most of the cost.',
  ]);
  return { out, msPerByte: timed[0]!.time.median / target.bytes };
}

async function rssSection(child: Child, s3: S3rver, work: string, small: { file: string; bytes: number }, big: number, s3MsPerByte: number, notes: string[], withFs: boolean): Promise<string> {
  const opts = JSON.stringify(s3.driverOptions(await s3.bucket()));
  const files = new Map([[small.bytes, small.file]]);
  const fileOf = async (bytes: number) => {
    if (!files.has(bytes)) {
      files.set(bytes, join(work, `rss-${bytes}`));
      await randomFile(files.get(bytes)!, bytes);
    }
    return files.get(bytes)!;
  };
  const s3Big = s3MsPerByte * big <= S3_RUN_BUDGET_MS ? big : 512 * MiB;
  if (s3Big !== big) notes.push(`s3 big object is ${size(s3Big)}, not ${size(big)}: at the measured s3rver speed ${size(big)} would take ~${secs(s3MsPerByte * big)}.`);
  const out: string[][] = [];
  const measure = async (label: string, sizes: number[], run: (file: string, tag: string) => Promise<{ ms: number; maxRssKiB: number; baseRssKiB: number }>) => {
    const cells: string[] = [];
    const peaks: number[] = [];
    for (const [i, bytes] of sizes.entries()) {
      await settle();
      const r = await run(await fileOf(bytes), i === 0 ? 'small' : 'big');
      progress(`peak RSS ${label}, ${size(bytes)}: ${mb(r.maxRssKiB)} (base ${mb(r.baseRssKiB)}, ${secs(r.ms)})`);
      cells.push(`${mb(r.maxRssKiB)} (base ${mb(r.baseRssKiB)}) @ ${size(bytes)}`);
      peaks.push(r.maxRssKiB);
    }
    const diff = peaks[1]! - peaks[0]!;
    const ok = Math.abs(diff) <= 20 * 1024 && Math.max(...peaks) < 150 * 1024;
    out.push([label, ...cells, `${diff >= 0 ? '+' : ''}${mb(diff)}`, ok ? 'ok' : 'MISSED']);
  };
  const root = (tag: string) => join(work, `rss-root-${tag}`);
  if (withFs) {
    await measure('fs put {path}', [small.bytes, big], (file, tag) => child('fs-put', { file, root: root(tag) }));
    await measure('fs get + verify', [small.bytes, big], (_file, tag) => child('fs-get', { root: root(tag) }));
    await rm(root('big'), { recursive: true, force: true });
  }
  // The bare Upload's figure shows how much of the S3 memory is lib-storage's and the SDK's own.
  await measure('s3 bare lib-storage Upload (for comparison)', [small.bytes, s3Big], (file, tag) => child('s3-upload', { file, s3: opts, key: `upload-${tag}` }));
  await measure('s3 put {path}, pre-hashed', [small.bytes, s3Big], (file, tag) => child('s3-put', { file, s3: opts, key: tag }));
  for (const [bytes, file] of files) if (bytes !== small.bytes) await rm(file, { force: true });
  return table('Peak RSS of one process per operation (process.resourceUsage().maxRSS)', ['operation', 'small object', 'big object', 'difference', 'goal: |diff| <= 20 MB, peak < 150 MB'], out, [
    ...notes,
    'base = RSS once the case\'s modules are loaded (Node alone is ~40 MB; the AWS SDK adds ~20 MB), just before the operation.',
    'Compiled JS run by plain `node`, as deployed: no tsx loader thread in the figures.',
  ]);
}

/** `only` runs one part alone: `npm run bench -- --fs` (filesystem table) or `-- --s3` (S3 tables). */
async function main(only?: 'fs' | 's3'): Promise<void> {
  const work = await mkdtemp(join(tmpdir(), 'stevedore-bench-'));
  let s3: S3rver | undefined;
  try {
    const fsInfo = await statfs(work);
    const free = fsInfo.bavail * fsInfo.bsize;
    const notes = [`Load average at start: ${loadavg().map((l) => l.toFixed(1)).join(' ')} (2 cores here; other work on the machine shows up as noise).`];
    let bytes = GiB;
    let big = 2 * GiB;
    // Peak disk use: the main file and a copy of it, or the big file and a copy, plus s3rver's parts.
    if (free < 4 * GiB) {
      bytes = 256 * MiB;
      notes.push(`SCALED DOWN: only ${size(free)} free in ${tmpdir()} (4 GiB wanted), so the main file is ${size(bytes)}, not 1 GiB.`);
    }
    if (free < 8 * GiB) {
      big = 512 * MiB;
      notes.push(`SCALED DOWN: only ${size(free)} free (8 GiB wanted for the 2 GiB case), so the big object is ${size(big)}.`);
    }
    progress(`temp dir ${work}, ${size(free)} free; main file ${size(bytes)}, peak-RSS objects 64 MiB and ${size(big)}`);
    const child = await compileCases(join(work, 'js'));
    progress('compiled bench/storage.ts and src/ for the child processes');
    const file = join(work, 'main');
    await randomFile(file, bytes);
    const small = { file: join(work, 'rss-small'), bytes: 64 * MiB };
    await randomFile(small.file, small.bytes);

    const bigNote = (n: string) => n.includes('big object');
    const fs = only === 's3' ? { out: '', sha256: (await openssl(file)).sha256 } : await fsSection(child, work, file, bytes, notes.filter((n) => !bigNote(n)));
    if (only === 'fs') {
      process.stdout.write(`\n${fs.out}\nLoad average at end: ${loadavg().map((l) => l.toFixed(1)).join(' ')}\n`);
      return;
    }
    progress('starting s3rver');
    s3 = await startS3rver();
    const s3r = await s3Section(child, s3, work, { file, bytes, sha256: fs.sha256 }, small);
    const rss = await rssSection(child, s3, work, small, big, s3r.msPerByte, notes.filter(bigNote), only !== 's3');
    await s3.stop();
    s3 = undefined;
    let queue = '';
    let large = '';
    if (only !== 's3') {
      progress('queue: log and store jobs through Redis');
      queue = await queueBench();
      large = await largeStoreBench(file, bytes);
    }
    process.stdout.write(`\n${[fs.out, s3r.out, rss, queue, large].filter(Boolean).join('\n')}\nLoad average at end: ${loadavg().map((l) => l.toFixed(1)).join(' ')}\n`);
  } finally {
    await s3?.stop().catch((err: unknown) => progress(`stopping s3rver failed: ${String(err)}`));
    await rm(work, { recursive: true, force: true });
    progress(`removed ${work}`);
  }
}

if (process.argv.includes('--migrate')) {
  // `npm run bench -- --migrate`: migrate and verify against rclone and sha256sum (bench/migrate.ts).
  const { migrateBench } = await import('./migrate.js');
  process.stdout.write(`${await migrateBench()}\n`);
} else if (process.argv.includes('--metrics')) {
  // `npm run bench -- --metrics`: only GET /metrics against a queue of 100,000 jobs.
  process.stdout.write(`${await metricsBench()}\n`);
} else if (process.argv.includes('--server')) {
  // `npm run bench -- --server`: only the HTTP server section (bench/server.ts).
  process.stdout.write(`${await (await import('./server.js')).serverBench()}\n`);
} else if (process.argv.includes('--group')) {
  // `npm run bench -- --group`: only group commit against one rewrite per edit (bench/group-commit.ts).
  process.stdout.write(`${await groupCommitBench()}\n`);
} else if (process.argv.includes('--session-s3')) {
  // `npm run bench -- --session-s3`: only the S3 one-file edits of the session section, spliced and streamed.
  process.stdout.write(`${await sessionBench({ fs: false, clouds: ['s3'] })}\n`);
} else if (process.argv.includes('--session-azure')) {
  // `npm run bench -- --session-azure`: only the Azure one-file edits of the session section, spliced and streamed.
  process.stdout.write(`${await sessionBench({ fs: false, clouds: ['azure'] })}\n`);
} else if (process.argv.includes('--session')) {
  // `npm run bench -- --session`: only the session archive section (bench/session.ts).
  process.stdout.write(`${await sessionBench()}\n`);
} else if (process.argv.includes('--queue')) {
  // `npm run bench -- --queue`: only the queue section, a few minutes shorter.
  process.stdout.write(`${await queueBench()}\n`);
} else {
  await main(process.argv.includes('--s3') ? 's3' : process.argv.includes('--fs') ? 'fs' : undefined);
}
// Worker connections BullMQ does not own keep the loop alive; the bench is done.
process.exit(0);
