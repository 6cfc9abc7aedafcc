import { execFile } from 'node:child_process';
import { chmod, chown, link, mkdir, symlink, utimes, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const exec = promisify(execFile);
const here = dirname(fileURLToPath(import.meta.url));

/** Runs a tool; fails with its stderr. Returns stdout and stderr. */
export async function run(cmd: string, args: string[], opts: { cwd?: string } = {}): Promise<{ stdout: string; stderr: string }> {
  return exec(cmd, args, { maxBuffer: 64 * 1024 ** 2, encoding: 'utf8', ...opts });
}

export const LONG_DIR = 'd'.repeat(120);
export const LONG_FILE = `${LONG_DIR}/${'f'.repeat(140)}.txt`;
export const LONG_LINK_TARGET = `../${LONG_FILE}`;

/**
 * A session-like source tree with what a tar round trip must keep: a long path (over ustar's 100 +
 * 155 bytes), unicode names, symlinks inside the tree (one up a level, one with a long target), a
 * hard link, empty directories and files, 0755 / 0600 / 0000 modes, setuid, another owner, and old
 * (1975, before 1970) and sub-second mtimes.
 */
export async function makeTree(root: string): Promise<void> {
  for (const d of ['bin', 'empty-dir', 'sub/deeper', LONG_DIR, '日本語']) await mkdir(join(root, d), { recursive: true });
  const files: Array<[string, string | Buffer, number]> = [
    ['README.md', '# session\n', 0o644],
    ['bin/run', '#!/bin/sh\necho run\n', 0o755],
    ['bin/suid', 'x', 0o4755],
    ['empty', '', 0o644],
    ['secret', 'private\n', 0o600],
    ['locked', 'no access\n', 0o000],
    ['café.txt', 'NFC name\n', 0o644],
    ['日本語/ファイル.txt', 'unicode\n', 0o644],
    [LONG_FILE, 'long path\n', 0o644],
    ['sub/deeper/data.bin', Buffer.from(Array.from({ length: 70_000 }, (_, i) => (i * 7) & 0xff)), 0o644],
  ];
  for (const [name, data, mode] of files) {
    await writeFile(join(root, name), data);
    await chmod(join(root, name), mode);
  }
  await chown(join(root, 'secret'), 1234, 5678);
  await symlink('bin/run', join(root, 'link'));
  await symlink('../README.md', join(root, 'sub/up'));
  await symlink(`../${LONG_FILE}`, join(root, 'sub/long-link'));
  await link(join(root, 'README.md'), join(root, 'hard'));
  await utimes(join(root, 'bin/run'), new Date('1975-06-01T12:00:00.5Z'), new Date('1975-06-01T12:00:00.5Z'));
  await utimes(join(root, 'empty'), new Date('1960-01-01T00:00:00Z'), new Date('1960-01-01T00:00:00Z'));
  await utimes(join(root, 'sub/deeper/data.bin'), new Date('2020-02-02T02:02:02.123Z'), new Date('2020-02-02T02:02:02.123Z'));
}

export interface Member {
  name: string;
  type: string;
  mode: number;
  uid: number;
  gid: number;
  uname: string;
  gname: string;
  mtime: number;
  size: number;
  linkname: string;
  pax: Record<string, string>;
  sha256?: string;
}

/** The members of an archive as Python's tarfile reads them (`r:gz`, `r|gz`, `r:`, `r|`). */
export async function members(archive: string, mode: 'r:gz' | 'r|gz' | 'r:' | 'r|'): Promise<Member[]> {
  const { stdout } = await run('python3', [join(here, 'tar-members.py'), archive, mode]);
  return JSON.parse(stdout) as Member[];
}

/** Writes an archive with Python's tarfile, in GNU or PAX format, gzip-compressed. */
export async function pythonTar(src: string, out: string, format: 'GNU' | 'PAX'): Promise<void> {
  const script = [
    'import sys, tarfile',
    `with tarfile.open(sys.argv[1], 'w:gz', format=tarfile.${format}_FORMAT) as t:`,
    "    t.add(sys.argv[2], arcname='.')",
  ].join('\n');
  await run('python3', ['-c', script, out, src]);
}
