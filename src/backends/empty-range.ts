import { ErrorCode } from '../errors.js';
import type { ByteRange, Driver, DriverGetResult } from '../storage/driver.js';

/**
 * S3 and Azure refuse every range of an empty object (416). A range from byte 0 of an empty object
 * is the whole, empty object (the suite's decision): read it whole, or rethrow `err` when the object
 * turns out not to be empty (the range really was unsatisfiable).
 */
export async function emptyObjectRange(driver: Driver, key: string, range: ByteRange | undefined, signal: AbortSignal | undefined, err: unknown): Promise<DriverGetResult> {
  if (range?.start === 0 && driver.classify(err) === ErrorCode.InvalidInput) {
    const whole = await driver.get(key, undefined, signal);
    if (whole.info.size === 0) return whole;
    whole.stream.destroy();
  }
  throw err;
}
