/** Clients that load a service through the gateway in integration tests. */
import { setTimeout as sleep } from 'node:timers/promises';
import { Agent, request } from 'undici';

const FAILURE_BACKOFF_MS = 50;

/**
 * Sends POST /increment to `baseUrl` (the gateway) from `workers` clients until stopped, or
 * for at most `maxMs`: load in tests is bounded. Counts acknowledged (200) and failed requests.
 */
export function steadyIncrements(baseUrl: string, workers: number, maxMs: number) {
  const agent = new Agent({ keepAliveTimeout: 10_000 });
  let stop = false;
  const stats = { ok: 0, failed: 0, errors: [] as string[], maxLatencyMs: 0 };
  const deadline = setTimeout(() => (stop = true), maxMs);
  const loops = Array.from({ length: workers }, async () => {
    while (!stop) {
      const t = Date.now();
      try {
        const res = await request(`${baseUrl}/increment`, { method: 'POST', dispatcher: agent, headersTimeout: 60_000 });
        const body = await res.body.text();
        if (res.statusCode === 200) stats.ok++;
        else {
          stats.failed++;
          stats.errors.push(`${res.statusCode} ${body.slice(0, 200)}`);
        }
      } catch (err) {
        stats.failed++;
        stats.errors.push(String((err as Error).message));
        // A refused connection fails at once: do not spin while nothing listens.
        await sleep(FAILURE_BACKOFF_MS);
      }
      stats.maxLatencyMs = Math.max(stats.maxLatencyMs, Date.now() - t);
    }
  });
  let stopped: Promise<typeof stats> | undefined;
  return {
    stats,
    /** Stops the loops once their requests are answered; calling it again waits for the same. */
    stop() {
      stopped ??= (async () => {
        stop = true;
        clearTimeout(deadline);
        await Promise.all(loops);
        await agent.close();
        return stats;
      })();
      return stopped;
    },
  };
}
