/** Waiting with a bound. */

/**
 * `p`'s value, or undefined once `ms` have passed. Clears its timer: a pending one would keep
 * the process (a test, the CLI) alive for the whole timeout after the work is done.
 */
export async function within<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<undefined>((resolve) => {
    timer = setTimeout(() => resolve(undefined), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}
