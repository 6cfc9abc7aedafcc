/**
 * crc32_combine, as zlib computes it (crc32.c: multmodp and x2nmodp over GF(2)): the CRC-32 of
 * A followed by B from crc(A), crc(B) and B's length, without B's bytes. The seekable writer
 * builds the gzip trailer from its segments' CRCs, so a segment copied as it was never has to
 * be inflated again.
 */

const POLY = 0xedb88320;

/** x^(2^n) modulo the CRC polynomial, n = 0..31. */
const X2N: number[] = (() => {
  const table: number[] = [];
  let p = 1 << 30; // x^1
  table.push(p);
  for (let n = 1; n < 32; n++) table.push(p = multModP(p, p));
  return table;
})();

/** a(x) * b(x) modulo p(x), reflected. */
function multModP(a: number, b: number): number {
  let m = 1 << 31;
  let p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) === 0) break;
    }
    m >>>= 1;
    b = b & 1 ? (b >>> 1) ^ POLY : b >>> 1;
  }
  return p >>> 0;
}

/** x^(n * 2^k) modulo p(x). */
function x2nModP(n: number, k: number): number {
  let p = 1 << 31; // x^0 == 1
  while (n > 0) {
    if (n % 2 === 1) p = multModP(X2N[k & 31]!, p);
    n = Math.floor(n / 2);
    k++;
  }
  return p;
}

/** CRC-32 of A || B, given crc32(A), crc32(B) and B's length in bytes (any safe integer). */
export function crc32Combine(crcA: number, crcB: number, lenB: number): number {
  if (lenB === 0) return crcA >>> 0;
  return (multModP(x2nModP(lenB, 3), crcA >>> 0) ^ (crcB >>> 0)) >>> 0;
}
