/** Waiting for a condition in tests, bounded. */
import { setTimeout as sleep } from 'node:timers/promises';

/**
 * Polls COND until it returns a truthy value (returned) or TIMEOUTMS pass (throws, naming
 * WHAT and the last error COND threw, if any).
 */
export async function waitFor<T>(cond: () => T | Promise<T>, timeoutMs: number, what = 'condition'): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    try {
      const value = await cond();
      if (value) return value as NonNullable<T>;
    } catch (err) {
      lastError = err;
    }
    if (Date.now() >= deadline) {
      const why = lastError === undefined ? '' : `; last error: ${lastError instanceof Error ? lastError.message : String(lastError)}`;
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${why}`);
    }
    await sleep(100);
  }
}
