import fs, { type BigIntStats } from 'node:fs';
import { promisify } from 'node:util';

/**
 * The fs callback API on plain file descriptors, promisified. fs/promises' FileHandle costs about
 * twice the CPU per open/stat/close (measured: 47 against 21 us for the three), which counts on
 * the filesystem put, a dozen such calls per object however small.
 */
export const openFd = promisify(fs.open) as (path: string, flags: string | number, mode?: number) => Promise<number>;
export const closeFd = promisify(fs.close);
export const fsyncFd = promisify(fs.fsync);
export const fdatasyncFd = promisify(fs.fdatasync);
export const futimesFd = promisify(fs.futimes);
const writeFd = promisify(fs.write) as (fd: number, buf: Buffer, offset: number, length: number, position: null) => Promise<{ bytesWritten: number }>;

export function fstatFd(fd: number): Promise<BigIntStats> {
  return new Promise((resolve, reject) => fs.fstat(fd, { bigint: true }, (err, st) => (err ? reject(err) : resolve(st))));
}

/** stat, following links: the identity (dev, ino) of what a path leads to now. */
export function statPath(path: string): Promise<BigIntStats> {
  return new Promise((resolve, reject) => fs.stat(path, { bigint: true }, (err, st) => (err ? reject(err) : resolve(st))));
}

export function lstatPath(path: string): Promise<BigIntStats> {
  return new Promise((resolve, reject) => fs.lstat(path, { bigint: true }, (err, st) => (err ? reject(err) : resolve(st))));
}

const readFileCb = promisify(fs.readFile);
/** A small file's text (a sidecar's JSON). */
export const readTextPath = (path: string): Promise<string> => readFileCb(path, 'utf8');

/** The kernel's realpath (the callback API's plain fs.realpath walks the path in JavaScript). */
export const realpathPath = promisify(fs.realpath.native) as (path: string) => Promise<string>;

/** Writes `length` bytes of `buf` at the descriptor's position, however many calls it takes. */
export async function writeFully(fd: number, buf: Buffer, length = buf.length): Promise<void> {
  for (let off = 0; off < length;) off += (await writeFd(fd, buf, off, length - off, null)).bytesWritten;
}
