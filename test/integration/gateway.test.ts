/**
 * The gateway on a real local cluster: clients keep one address (127.0.0.1:PORT on this
 * machine) while the container moves, no request fails, and a TCP connection open across a
 * move stays open (the container keeps its cluster address, the gateway's upstream).
 */
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { request } from 'undici';
import { steadyIncrements } from '../support/clients.js';
import { EchoClient } from '../support/kept-connection-clients.js';
import { cli, cliFails, cliOk, ps, startLocalCluster, stopLocalCluster, waitFor } from '../support/local-cluster.js';

const GATEWAY = '127.0.0.1';
const HTTP_PORT = 28080;
const TCP_PORT = 29000;
const UNPUBLISHED_PORT = 28081;

before(async () => {
  await startLocalCluster(3);
}, { timeout: 300_000 });

after(async () => {
  await stopLocalCluster();
}, { timeout: 120_000 });

/** One short TCP exchange through the gateway: connect, send a line, read the echo, close. */
function echoOnce(line: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: GATEWAY, port: TCP_PORT });
    let got = '';
    socket.setTimeout(30_000, () => socket.destroy(new Error('echo timed out')));
    socket.on('connect', () => socket.write(`${line}\n`));
    socket.on('data', (d) => {
      got += d.toString();
      if (got.endsWith('\n')) {
        socket.end();
        resolve(got.trim());
      }
    });
    socket.on('error', reject);
    socket.on('close', () => {
      if (!got.endsWith('\n')) reject(new Error(`connection closed after '${got}'`));
    });
  });
}

describe('gateway', { timeout: 600_000 }, () => {
  it('HTTP: a client sending increments nonstop through two migrations (lazy, then copy) sees no failure', async () => {
    await cliOk(['run', '--name', 'counter', '--node', 'node1', '-p', '8080:8080', '-e', 'MEMORY_MB=32', 'chipmunk/statefulapp']);
    const route = await cliOk<{ listenPort: number; protocol: string }>(['expose', 'counter', '--port', '8080', '--listen', String(HTTP_PORT)]);
    assert.deepEqual([route.listenPort, route.protocol], [HTTP_PORT, 'http']);
    await waitFor(async () => {
      const res = await request(`http://${GATEWAY}:${HTTP_PORT}/health`).catch(() => undefined);
      await res?.body.dump();
      return res?.statusCode === 200;
    }, 30_000, 'counter answers through the gateway');

    const client = steadyIncrements(`http://${GATEWAY}:${HTTP_PORT}`, 2, 120_000);
    await new Promise((r) => setTimeout(r, 1_000));
    await cliOk(['migrate', 'counter', '--to', 'node2', '--mode', 'lazy'], { timeoutMs: 120_000 });
    await new Promise((r) => setTimeout(r, 1_000));
    await cliOk(['migrate', 'counter', '--to', 'node3', '--mode', 'copy'], { timeoutMs: 120_000 });
    await new Promise((r) => setTimeout(r, 1_000));
    const stats = await client.stop();

    assert.deepEqual(stats.errors, [], 'no client request failed');
    assert.ok(stats.ok > 100, `the client kept going (${stats.ok} acknowledged)`);
    const res = await request(`http://${GATEWAY}:${HTTP_PORT}/`);
    const state = (await res.body.json()) as { counter: number };
    assert.equal(state.counter, stats.ok, 'every acknowledged increment, and only those, is in the state');
    const row = (await ps()).find((c) => c.name === 'counter');
    assert.equal(row?.node, 'node3');
    assert.deepEqual(row?.endpoints, [`${GATEWAY}:${HTTP_PORT}->8080/http`]);
  });

  it('TCP: a connection open across a migration stays open (every echo in order); new connections during it are held, then connected', async () => {
    const server = "require('net').createServer((s) => s.pipe(s)).listen(7000, '0.0.0.0')";
    await cliOk(['run', '--name', 'echo', '--node', 'node1', '-p', '7000:7000', 'chipmunk/statefulapp', '/usr/bin/node', '-e', server]);
    await cliOk(['expose', 'echo', '--port', '7000', '--listen', String(TCP_PORT), '--protocol', 'tcp']);
    await waitFor(async () => (await echoOnce('hello').catch(() => '')) === 'hello', 30_000, 'echo answers through the gateway');

    let stop = false;
    const failures: string[] = [];
    let exchanges = 0;
    const loop = (async () => {
      for (let i = 0; !stop && i < 100_000; i++) {
        try {
          const echoed = await echoOnce(`line ${i}`);
          if (echoed !== `line ${i}`) failures.push(`got '${echoed}' for 'line ${i}'`);
          exchanges++;
        } catch (err) {
          failures.push((err as Error).message);
        }
      }
    })();
    // And one connection open throughout, sending a line every 10 ms.
    const kept = await EchoClient.open({ host: GATEWAY, port: TCP_PORT });
    await new Promise((r) => setTimeout(r, 500));
    await cliOk(['migrate', 'echo', '--to', 'node2', '--mode', 'lazy'], { timeoutMs: 120_000 });
    await new Promise((r) => setTimeout(r, 500));
    stop = true;
    await loop;
    const sent = await kept.stop();
    // The container keeps its cluster address, which is the gateway's upstream, and its
    // established connections: the connection open when it froze stays open (the gateway's side
    // sees a retransmission), and every connection opened during the move is held, then connected.
    assert.deepEqual(failures, [], 'no connection failed, not even the one open at the freeze');
    kept.assertAllInOrder(sent);
    assert.ok(exchanges > 20, `connections kept coming (${exchanges})`);
  });

  it('HTTP without a published port: the gateway reaches the container at its own address, before and after a lazy and a copy move', async () => {
    await cliOk(['run', '--name', 'unpublished', '--node', 'node1', '-e', 'MEMORY_MB=16', 'chipmunk/statefulapp']);
    await cliOk(['expose', 'unpublished', '--port', '8080', '--listen', String(UNPUBLISHED_PORT)]);
    const url = `http://${GATEWAY}:${UNPUBLISHED_PORT}`;
    await waitFor(async () => {
      const res = await request(`${url}/health`).catch(() => undefined);
      await res?.body.dump();
      return res?.statusCode === 200;
    }, 30_000, 'the unpublished container answers through the gateway');
    const client = steadyIncrements(url, 1, 60_000);
    await new Promise((r) => setTimeout(r, 500));
    await cliOk(['migrate', 'unpublished', '--to', 'node3', '--mode', 'lazy'], { timeoutMs: 120_000 });
    await new Promise((r) => setTimeout(r, 500));
    await cliOk(['migrate', 'unpublished', '--to', 'node2', '--mode', 'copy'], { timeoutMs: 120_000 });
    await new Promise((r) => setTimeout(r, 500));
    const stats = await client.stop();
    // Its cluster address is the gateway's upstream throughout: the same before and after each move.
    assert.deepEqual(stats.errors, [], 'no request failed (EHOSTUNREACH before the container subnets were routed)');
    assert.ok(stats.ok > 10, `the client kept going (${stats.ok} acknowledged)`);
    const state = (await (await request(`${url}/`)).body.json()) as { counter: number };
    assert.equal(state.counter, stats.ok);
    assert.equal((await ps()).find((c) => c.name === 'unpublished')?.node, 'node2');
  });

  it('bad input gets a clear error and changes nothing', async () => {
    const before = await ps();
    const unknown = await cliFails(['expose', 'nosuch', '--port', '80']);
    assert.equal(unknown.error.code, 'CHIPMUNK_NOT_FOUND');
    assert.match(unknown.error.message, /nosuch/);
    const taken = await cliFails(['expose', 'echo', '--port', '7000', '--listen', String(HTTP_PORT)]);
    assert.equal(taken.error.code, 'CHIPMUNK_CONFLICT');
    assert.match(taken.error.message, new RegExp(String(HTTP_PORT)));
    const badProtocol = await cli(['expose', 'echo', '--port', '7000', '--protocol', 'udp']);
    assert.equal(badProtocol.code, 2);
    assert.match(badProtocol.stderr, /protocol/);
    const badPort = await cli(['expose', 'echo', '--port', '0']);
    assert.equal(badPort.code, 2);
    const notExposed = await cliFails(['unexpose', 'nosuch']);
    assert.equal(notExposed.error.code, 'CHIPMUNK_NOT_FOUND');
    assert.deepEqual(await ps(), before);
  });
});
