import { ErrorCode, StorageError } from '../errors.js';
import { limitError } from './limits.js';

/**
 * A tar entry name, checked and split into segments. Every hostile spelling from the node-tar and
 * tar-fs advisories is refused here rather than "cleaned up": an archive that needs cleaning is
 * not one a build produced honestly, and a rewritten name could collide with another entry.
 *
 * Refused (InvalidInput, naming the entry): absolute names (`/x`, `////x`), Windows drive prefixes
 * (`C:x`, `C:../x`), any backslash (so `a\..\..\x` can never act as traversal on any platform),
 * any `..` segment, NUL / C0 / DEL / C1 control characters, U+FFFD (tar-stream's replacement for
 * bytes that are not UTF-8, so two different byte names cannot decode to one), and a name that is
 * empty once `.` and empty segments are dropped, unless it is a directory entry: `./` is what
 * `tar -C dir .` writes for the root and it names the destination itself.
 *
 * Returns the segments, or `null` for the root directory entry. Over `maxDepth` segments is a
 * limit violation.
 */
export function entrySegments(name: string, isDirectory: boolean, maxDepth: number, op = 'extract', key = name): string[] | null {
  const bad = (why: string): never => {
    throw new StorageError(ErrorCode.InvalidInput, `unsafe entry name: ${why}`, { op, key });
  };
  refuseSpelling(name, bad);
  const segments: string[] = [];
  for (const seg of name.split('/')) {
    if (seg === '' || seg === '.') continue;
    if (seg === '..') return bad('contains a ".." segment');
    segments.push(seg);
  }
  if (segments.length === 0) return isDirectory ? null : bad('empty after removing "." segments');
  if (segments.length > maxDepth) {
    throw limitError(`path depth ${segments.length} is over the limit of ${maxDepth}`, key, op);
  }
  return segments;
}

/**
 * A symlink's target, checked with the same spelling rules as names (an absolute target, a drive
 * prefix or a backslash is refused outright), split into segments with `..` kept: whether it
 * stays inside the tree depends on where the link is and on the links before it, which
 * entry-check.ts resolves.
 */
export function linkTargetSegments(target: string, name: string, maxDepth: number, op: string): string[] {
  refuseSpelling(target, (why) => {
    throw new StorageError(ErrorCode.InvalidInput, `unsafe symlink target ${JSON.stringify(target)}: ${why}`, { op, key: name });
  });
  const segments = target.split('/').filter((seg) => seg !== '' && seg !== '.');
  if (segments.length > maxDepth) throw limitError(`symlink target depth ${segments.length} is over the limit of ${maxDepth}`, name, op);
  return segments;
}

function refuseSpelling(name: string, bad: (why: string) => never): void {
  if (name.length === 0) bad('empty');
  if (/[\u0000-\u001f\u007f-\u009f]/.test(name)) bad('contains a NUL or control character');
  if (name.includes('\ufffd')) bad('not valid UTF-8');
  if (name.includes('\\')) bad('contains a backslash');
  if (name.startsWith('/')) bad('absolute path');
  if (/^[A-Za-z]:/.test(name)) bad('Windows drive prefix');
}

/**
 * The key under which two spellings of a path segment count as the same name: Unicode NFC, then case-folded the way
 * case-insensitive filesystems (APFS, NTFS) fold (`toUpperCase().toLowerCase()` also maps `ß` to
 * `ss` and the Kelvin sign to `k`). Folding too much only refuses an odd archive; folding too little
 * would let one entry be written through another on such a filesystem.
 */
export function collisionKey(segment: string): string {
  return segment.normalize('NFC').toUpperCase().toLowerCase().normalize('NFC');
}
