/**
 * The archive pieces, for every consumer of a tar stream:
 * - entry-check.ts: the entry rules (names, types, links, collisions), `EntryChecker`;
 * - limits.ts: the limits and their checks on a stream (`ArchiveMeter`, `EntryBudget`);
 * - tar-read.ts: a checked, bounded read of a tar(.gz) stream (`readTar`);
 * - transform.ts: a tar-to-tar rewrite that keeps, drops, replaces and appends (`transformTar`);
 * - extract.ts: extraction into the staging area (`extractArchive`), one consumer of the above.
 */
export { EntryChecker, type CheckPolicy, type EntryType, type Inspected } from './entry-check.js';
export { extractArchive, type ExtractOptions, type ExtractResult } from './extract.js';
export { EntryBudget, limitError, resolveLimits, type ArchiveLimits, type Limits } from './limits.js';
export { readTar, type ReadEntry, type TarReadOptions, type TarReadResult } from './tar-read.js';
export { transformTar, type Edit, type NewEntry, type TarEntry, type TarHeader, type TransformOptions, type TransformResult, type TreeView } from './transform.js';
