/**
 * bench/downtime's Redis probes (src/devtools/downtime-probe.ts) against a PING server on loopback:
 * fresh connections count a +PONG as an answer and anything else as none; the kept connection
 * answers PING after PING on one connection, and a connection the server drops is an error, not
 * a silent reconnect.
 */
import assert from 'node:assert/strict';
import { createServer, type Server, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, describe, it } from 'node:test';
import { FreshConnectionProbe, KeptRedisProbe } from '../../src/devtools/downtime-probe.js';

async function pingServer(reply: string): Promise<{ server: Server; url: string; sockets: Set<Socket> }> {
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('data', (d) => {
      for (const _ of d.toString().matchAll(/PING\r\n/g)) socket.write(reply);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  return { server, url: `redis://127.0.0.1:${port}`, sockets };
}

describe('Redis probes', () => {
  const servers: Server[] = [];
  after(() => {
    for (const s of servers) s.close();
  });

  it('fresh connections: +PONG is an answer, an error reply is not', async () => {
    const good = await pingServer('+PONG\r\n');
    const bad = await pingServer('-ERR no\r\n');
    servers.push(good.server, bad.server);
    const [a, b] = [new FreshConnectionProbe(good.url, 10_000), new FreshConnectionProbe(bad.url, 10_000)];
    a.start();
    b.start();
    await sleep(100);
    const [ta, tb] = await Promise.all([a.stop(), b.stop()]);
    assert.ok(ta.answers.length > 5, `answers from the PONG server: ${ta.answers.length}`);
    assert.equal(tb.answers.length, 0);
    assert.ok(tb.requests > 5);
  });

  it('kept connection: PINGs answered on one connection; a dropped connection is an error', async () => {
    const { server, url, sockets } = await pingServer('+PONG\r\n');
    servers.push(server);
    const kept = new KeptRedisProbe(url, 10_000, 1);
    kept.start();
    await sleep(100);
    assert.equal(sockets.size, 1, 'one connection');
    for (const s of sockets) s.destroy();
    await sleep(50);
    const times = await kept.stop();
    assert.ok(times.answers.length > 5, `answers: ${times.answers.length}`);
    assert.equal(times.connections, 1);
    assert.equal(times.errors.length, 1, `errors: ${times.errors.join('; ')}`);
  });
});
