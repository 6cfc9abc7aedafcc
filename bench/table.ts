/** Small helpers for the bench's printed tables: statistics, units and markdown-style rows. */

export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;

export interface Stats {
  median: number;
  min: number;
  runs: number[];
}

export function stats(runs: number[]): Stats {
  const sorted = [...runs].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  // An even count takes the mean of the middle two, so two runs do not silently report the faster.
  const median = sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
  return { median, min: sorted[0]!, runs };
}

export function size(bytes: number): string {
  return bytes >= GiB ? `${+(bytes / GiB).toFixed(2)} GiB` : `${+(bytes / MiB).toFixed(1)} MiB`;
}

export function secs(ms: number): string {
  return `${(ms / 1000).toFixed(2)} s`;
}

/** Decimal MB/s, the unit disks and `dd` report. */
export function mbps(bytes: number, ms: number): string {
  return `${(bytes / 1e6 / (ms / 1000)).toFixed(0)} MB/s`;
}

export function ratio(ms: number, referenceMs: number): string {
  return `${(ms / referenceMs).toFixed(2)}x`;
}

/** `ok` or `MISSED` beside a goal; the bench never fails on it, it only says so. */
export function verdict(value: number, goal: number): string {
  return value <= goal ? 'ok' : 'MISSED';
}

export function mb(kib: number): string {
  return `${(kib / 1024).toFixed(1)} MB`;
}

/** Lowest to highest of several runs' figures (KiB), e.g. `86.0-88.7 MB`. */
export function mbRange(loKiB: number, hiKiB: number): string {
  return `${(loKiB / 1024).toFixed(1)}-${mb(hiKiB)}`;
}

/** A markdown table whose columns are padded, so it reads in a terminal as well as in an issue. */
export function table(title: string, head: string[], rows: string[][], notes: string[] = []): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i]!)).join(' | ')} |`;
  const rule = `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`;
  return [`### ${title}`, '', line(head), rule, ...rows.map(line), ...(notes.length ? ['', ...notes.map((n) => `- ${n}`)] : []), ''].join('\n');
}
