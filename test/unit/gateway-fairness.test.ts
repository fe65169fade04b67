/**
 * The gateway in front of an upstream that serves one keep-alive connection at a time (Python's
 * http.server, HTTP/1.1, not threading: a real one, on loopback): every client is served in
 * turn, and a hold's drain does not wait on an idle connection (docs/gateway.md, "Upstream
 * connections").
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { connect } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { Client } from 'undici';
import type { Upstream } from '../../src/gateway/index.js';
import { LOOPBACK, freePort, httpUpstream, withGateway } from './gateway-env.js';

const ONE_CONNECTION_SERVER = fileURLToPath(new URL('../../src/devtools/python/one-connection-server.py', import.meta.url));

/** Python's http.server serving one connection at a time, on a free loopback port. */
async function withOneConnectionServer(run: (upstream: Upstream) => Promise<void>): Promise<void> {
  const child: ChildProcess = spawn('python3', [ONE_CONNECTION_SERVER], { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    const [line] = (await once(child.stdout!, 'data')) as [Buffer];
    await run({ address: LOOPBACK, port: Number(line.toString().trim()) });
  } finally {
    child.kill('SIGKILL');
    if (child.exitCode === null && child.signalCode === null) await once(child, 'exit');
  }
}

interface ClientTally {
  answers: number;
  errors: string[];
}

/** `clients` clients, each on its own keep-alive connection, sending requests back to back for `ms`. */
async function loadFor(origin: string, clients: number, ms: number): Promise<ClientTally[]> {
  const until = Date.now() + ms;
  return Promise.all(
    Array.from({ length: clients }, async (_, i) => {
      const client = new Client(origin, { headersTimeout: 2_000, bodyTimeout: 2_000 });
      const tally: ClientTally = { answers: 0, errors: [] };
      try {
        for (let n = 0; Date.now() < until; n++) {
          try {
            const res = await client.request({ path: `/client${i}/${n}`, method: 'GET' });
            const body = await res.body.text();
            if (res.statusCode === 200 && body === `ok /client${i}/${n}`) tally.answers++;
            else tally.errors.push(`${res.statusCode} ${body}`);
          } catch (err) {
            tally.errors.push((err as Error).message);
          }
        }
      } finally {
        await client.close();
      }
      return tally;
    }),
  );
}

describe('gateway: an upstream that serves one connection at a time', () => {
  it('serves four clients writing nonstop in turn: each gets answers, none times out', () =>
    withOneConnectionServer((upstream) =>
      withGateway(async ({ client }) => {
        const listenPort = await freePort();
        await client.putRoute('py', { protocol: 'http', listenPort, upstream });
        const tallies = await loadFor(`http://${LOOPBACK}:${listenPort}`, 4, 3_000);
        const answers = tallies.map((t) => t.answers);
        assert.deepEqual(
          tallies.map((t) => t.errors.slice(0, 3)),
          [[], [], [], []],
          `errors per client (answers ${answers.join(', ')})`,
        );
        for (const [i, n] of answers.entries()) assert.ok(n > 0, `client ${i} got no answer (answers ${answers.join(', ')})`);
        // In turn: no client gets more than a few times what another got.
        assert.ok(Math.min(...answers) * 3 >= Math.max(...answers), `clients served unevenly: ${answers.join(', ')}`);
      }),
    ));

  it("a hold's drain does not wait on an idle upstream connection", () =>
    withOneConnectionServer((upstream) =>
      withGateway(
        async ({ client }) => {
          const listenPort = await freePort();
          await client.putRoute('py', { protocol: 'http', listenPort, log: true, upstream });
          const origin = `http://${LOOPBACK}:${listenPort}`;
          const first = new Client(origin);
          const second = new Client(origin);
          try {
            // A slow request takes one upstream connection; a request sent meanwhile takes a
            // second one, which the server leaves in its backlog for as long as the first stays open.
            const slow = first.request({ path: '/sleep/500', method: 'GET' });
            await sleep(150);
            const waiting = second.request({ path: '/waiting', method: 'POST', body: 'the waiting request' });
            assert.equal(await (await slow).body.text(), 'ok /sleep/500');
            // That client keeps its keep-alive connection open, idle; the hold drains the other request.
            const started = Date.now();
            const hold = await client.hold('py', 'm1');
            const heldFor = Date.now() - started;
            assert.equal(await (await waiting).body.text(), 'the waiting request');
            assert.ok(hold.logPosition, `the hold has no clean cut: ${hold.uncleanCut}`);
            assert.equal(hold.logPosition.seq, 2);
            // Far below the drain's own bound (5 s) and undici's keep-alive time-out (4 s) that
            // would otherwise close the idle connection.
            assert.ok(heldFor < 1_500, `the hold took ${heldFor} ms to drain`);
            await client.release('py', 'm1', upstream);
          } finally {
            await first.close();
            await second.close();
          }
        },
        // No stall detection in this test: only the hold can free the waiting request.
        { upstreamStallMs: 60_000 },
      ),
    ));

  it('takes client connections in turn: one that pipelines many requests does not make another wait for all of them', () =>
    withGateway(
      async ({ client }) => {
        const seen: string[] = [];
        const upstream = await httpUpstream((req, res) => {
          seen.push(req.url ?? '');
          setTimeout(() => res.end('ok'), 10);
        });
        const listenPort = await freePort();
        await client.putRoute('busy', { protocol: 'http', listenPort, upstream: upstream.upstream });
        const pipelining = connect(listenPort, LOOPBACK);
        pipelining.on('error', () => undefined);
        pipelining.write(Array.from({ length: 20 }, (_, i) => `GET /flood/${i} HTTP/1.1\r\nHost: x\r\n\r\n`).join(''));
        while (seen.length === 0) await sleep(5);
        const other = new Client(`http://${LOOPBACK}:${listenPort}`);
        try {
          const res = await other.request({ path: '/other', method: 'GET' });
          assert.equal(await res.body.text(), 'ok');
          // With one upstream connection, turns alternate: the other client's request goes right
          // after the pipelined request being answered when it came, not after the 19 queued ones.
          const at = seen.indexOf('/other');
          assert.ok(at >= 1 && at <= 3, `the other request reached the upstream as number ${at + 1}: ${seen.join(' ')}`);
        } finally {
          pipelining.destroy();
          await other.close();
          await upstream.kill();
        }
      },
      { upstreamConnections: 1 },
    ));

  it('a first request that is only slow (an upstream that serves many connections) costs no connections for good', () =>
    withGateway(async ({ client }) => {
      let running = 0;
      let mostAtOnce = 0;
      const upstream = await httpUpstream((req, res) => {
        const ms = Number(/^\/wait\/(\d+)/.exec(req.url ?? '')?.[1] ?? 0);
        running++;
        mostAtOnce = Math.max(mostAtOnce, running);
        setTimeout(() => {
          running--;
          res.end('ok');
        }, ms);
      });
      const listenPort = await freePort();
      await client.putRoute('many', { protocol: 'http', listenPort, upstream: upstream.upstream });
      const origin = `http://${LOOPBACK}:${listenPort}`;
      const clients = Array.from({ length: 6 }, () => new Client(origin));
      try {
        // One client's request on a new connection takes 1.2 s, while another client's requests
        // are answered at once on the first connection: it looks like a stall.
        await (await clients[0].request({ path: '/wait/0', method: 'GET' })).body.text();
        const slow = clients[1].request({ path: '/wait/1200', method: 'GET' });
        const until = Date.now() + 900;
        while (Date.now() < until) await (await clients[0].request({ path: '/wait/0', method: 'GET' })).body.text();
        assert.equal(await (await slow).body.text(), 'ok');
        // Six requests at once are still served at once.
        mostAtOnce = 0;
        await Promise.all(clients.map(async (c) => (await c.request({ path: '/wait/300', method: 'GET' })).body.text()));
        assert.equal(mostAtOnce, 6);
      } finally {
        await Promise.all(clients.map((c) => c.close()));
        await upstream.kill();
      }
    }));
});
