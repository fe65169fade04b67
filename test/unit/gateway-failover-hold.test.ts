/**
 * A failover's hold (connectionsLost) on a logged HTTP route: nothing more goes to the lost
 * copy's address outside the replay. With cluster addresses the restored copy answers at that
 * same address, so a request still waiting there (queued, or connecting) reached it before or
 * beside the replay, which then sent it again: applied twice (found by bench/ha: a counter one
 * above the acknowledged count).
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import { request } from 'undici';
import { LOOPBACK, eventually, freePort, httpUpstream, withGateway } from './gateway-env.js';

/** Applies an increment when it reads it; answers the first one only after `firstDelayMs`. */
class Counter {
  readonly applied: string[] = [];
  constructor(private readonly firstDelayMs = 0) {}
  readonly handle = (req: IncomingMessage, res: ServerResponse): void => {
    req.resume();
    req.on('end', () => {
      if (req.method === 'POST') this.applied.push(String(req.headers['x-n']));
      const delay = this.applied.length === 1 ? this.firstDelayMs : 0;
      setTimeout(() => res.end('ok'), delay);
    });
  };
}

async function increment(url: string, n: number): Promise<number> {
  try {
    const res = await request(`${url}/increment`, { method: 'POST', headers: { 'x-n': String(n) } });
    await res.body.text();
    return res.statusCode;
  } catch {
    return 0;
  }
}

describe('gateway: a failover hold on a logged route', () => {
  it('sends nothing more to the lost copy: a request queued behind one in flight waits for the replay, which applies each request once', () =>
    withGateway(
      async ({ client }) => {
        const lost = new Counter(1_500);
        const old = await httpUpstream(lost.handle);
        const restored = new Counter();
        const copy = await httpUpstream(restored.handle);
        try {
          const listenPort = await freePort();
          await client.putRoute('web', { protocol: 'http', listenPort, log: true, upstream: old.upstream });
          const url = `http://${LOOPBACK}:${listenPort}`;
          // #1 is in flight at the copy (answered late); #2 waits in the route's only connection's queue.
          const first = increment(url, 1);
          await eventually(() => lost.applied.length === 1, '#1 reached the copy');
          const second = increment(url, 2);
          await eventually(async () => (await client.getRoute('web')).requestLog?.lastSeq === 2, '#2 logged');

          // The copy's node is dead: the failover holds (connections lost), restores, replays from the log's start.
          await client.hold('web', 'failover-1', { drain: false, takeOver: true, connectionsLost: true });
          await sleep(2_000);
          assert.deepEqual(lost.applied, ['1'], 'nothing reached the lost copy after the hold (#1 answered there, then #2 would have gone)');

          const replay = await client.replay('web', { logId: (await client.getRoute('web')).requestLog!.logId, seq: 0 }, copy.upstream);
          await client.release('web', 'failover-1', copy.upstream);
          assert.deepEqual(await Promise.all([first, second]), [200, 200], 'both clients answered, by the replay');
          assert.deepEqual(restored.applied, ['1', '2'], 'the restored copy applied each request once');
          assert.equal(replay.delivered, 2);
        } finally {
          await old.kill();
          await copy.kill();
        }
      },
      { upstreamConnections: 1 },
    ));
});
