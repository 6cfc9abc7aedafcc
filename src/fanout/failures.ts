/** One object a fanned-out job could not handle, as the contract reports it. */
export interface Failure {
  key: string;
  code: string;
  message: string;
}

/** The contract's cap on `failures` in a result (counters still count every one). */
export const MAX_FAILURES = 100;
/** Messages are cut here: a result is kept in Redis with its parent. */
const MAX_MESSAGE = 500;

export function mergeFailures(into: Failure[], more: Failure[]): Failure[] {
  if (into.length >= MAX_FAILURES || more.length === 0) return into;
  return [...into, ...more.slice(0, MAX_FAILURES - into.length)];
}

export function failureOf(key: string, code: string, message: string): Failure {
  return { key, code, message: message.length > MAX_MESSAGE ? `${message.slice(0, MAX_MESSAGE)}...` : message };
}
