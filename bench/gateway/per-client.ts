/** Clients that each send requests back to back on their own keep-alive connection, counted per client. */
import { Client } from 'undici';

export interface PerClientRow {
  path: string;
  /** Answers per second, per client. */
  rates: number[];
  /** Requests that got no answer within the time-out, or failed. */
  failures: number;
}

export async function perClientLoad(path: string, origin: string, clients: number, seconds: number, timeoutMs: number): Promise<PerClientRow> {
  const until = Date.now() + seconds * 1000;
  let failures = 0;
  const answers = await Promise.all(
    Array.from({ length: clients }, async (_, i) => {
      const client = new Client(origin, { headersTimeout: timeoutMs, bodyTimeout: timeoutMs });
      let n = 0;
      while (Date.now() < until) {
        try {
          const res = await client.request({ path: `/client${i}`, method: 'GET' });
          await res.body.dump();
          if (res.statusCode === 200) n++;
          else failures++;
        } catch {
          failures++;
        }
      }
      await client.destroy();
      return n;
    }),
  );
  return { path, rates: answers.map((n) => n / seconds), failures };
}
