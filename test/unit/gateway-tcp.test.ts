import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import type { GatewayClient, Upstream } from '../../src/gateway/index.js';
import { LOOPBACK, echoUpstream, eventually, freePort, withGateway } from './gateway-env.js';

async function tcpRoute(client: GatewayClient, name: string, upstream?: Upstream): Promise<number> {
  const listenPort = await freePort();
  await client.putRoute(name, { protocol: 'tcp', listenPort, ...(upstream ? { upstream } : {}) });
  return listenPort;
}

/** A client connection that records what it receives and how it ended. */
class TestConnection {
  received = '';
  ended = false;
  error?: string;
  closed: Promise<void>;
  readonly socket: Socket;

  constructor(port: number) {
    this.socket = connect(port, LOOPBACK);
    this.socket.setEncoding('utf8');
    this.socket.on('data', (data: string) => (this.received += data));
    this.socket.on('end', () => (this.ended = true));
    this.socket.on('error', (err: NodeJS.ErrnoException) => (this.error = err.code ?? err.message));
    this.closed = new Promise((resolve) => this.socket.once('close', () => resolve()));
  }

  /** Bounded: a connection left open fails the test instead of hanging it. */
  async closedWithin(ms = 5_000): Promise<void> {
    await Promise.race([this.closed, sleep(ms).then(() => Promise.reject(new Error(`the connection was still open after ${ms} ms (got "${this.received}")`)))]);
  }

  until(text: string): Promise<void> {
    return eventually(() => this.received.includes(text), `"${text}" (got "${this.received}")`);
  }
}

describe('gateway: TCP routes', () => {
  it('pipes a connection both ways, half-close included', () =>
    withGateway(async ({ client }) => {
      const a = await echoUpstream('A:');
      const port = await tcpRoute(client, 'echo', a.upstream);
      const conn = new TestConnection(port);
      conn.socket.write('hello');
      await conn.until('A:hello');
      conn.socket.end(' bye'); // half-close: the echo still answers, then ends too
      await conn.closed;
      assert.equal(conn.received, 'A:hello bye');
      assert.equal(conn.ended, true);
      assert.equal(conn.error, undefined);
      await a.kill();
    }));

  it('connects connections opened during a hold to the new upstream once released', () =>
    withGateway(async ({ client }) => {
      const a = await echoUpstream('A:');
      const b = await echoUpstream('B:');
      const port = await tcpRoute(client, 'db', a.upstream);

      const before = new TestConnection(port);
      await before.until('A:');
      await client.hold('db', 'm1');
      const during = [new TestConnection(port), new TestConnection(port)];
      during.forEach((conn, i) => conn.socket.write(`query ${i}`));
      await eventually(async () => (await client.getRoute('db')).held === 2, 'two held connections');
      await sleep(100);
      assert.ok(during.every((conn) => conn.received === ''), 'nothing answers during the hold');
      assert.equal(b.connections, 0);

      await client.release('db', 'm1', b.upstream);
      await Promise.all(during.map((conn, i) => conn.until(`B:query ${i}`)));

      // The connection from before the move went to the old location: it ends cleanly at the
      // release (FIN, not a reset), and the client's reconnection reaches the new one.
      await before.closed;
      assert.equal(before.ended, true);
      assert.equal(before.error, undefined);
      const again = new TestConnection(port);
      await again.until('B:');
      again.socket.destroy();
      await a.kill();

      for (const conn of during) conn.socket.destroy();
      await b.kill();
    }));

  it('ends the client connection cleanly when the upstream closes it', () =>
    withGateway(async ({ client }) => {
      const a = await echoUpstream('A:');
      const port = await tcpRoute(client, 'closing', a.upstream);
      const conn = new TestConnection(port);
      conn.socket.write('last words');
      await conn.until('A:last words');
      await a.kill(); // resets its connections
      await conn.closed;
      assert.equal(conn.ended, true);
      assert.equal(conn.error, undefined);
      assert.equal(conn.received, 'A:last words');
    }));

  it('passes a reset of the upstream on as a reset, not as a clean end', () =>
    withGateway(async ({ client }) => {
      const a = await echoUpstream('A:');
      const port = await tcpRoute(client, 'reset', a.upstream);
      const conn = new TestConnection(port);
      conn.socket.write('hello');
      await conn.until('A:hello');
      // What a restored copy's kernel does to a connection it has no state for.
      for (const socket of a.sockets) socket.resetAndDestroy();
      await conn.closedWithin();
      assert.equal(conn.error, 'ECONNRESET');
      assert.equal(conn.ended, false, 'no end of stream: the client must not take the broken stream for a whole one');
      await a.kill();
    }));

  it('keeps a piped connection open across a hold and a release to the same upstream (a container that keeps its address)', () =>
    withGateway(async ({ client }) => {
      const a = await echoUpstream('A:');
      const port = await tcpRoute(client, 'kept', a.upstream);
      const conn = new TestConnection(port);
      conn.socket.write('before');
      await conn.until('A:before');
      await client.hold('kept', 'm1');
      conn.socket.write(' during');
      await conn.until('during');
      await client.release('kept', 'm1', a.upstream);
      conn.socket.write(' after');
      await conn.until('A:before during after');
      assert.equal(a.connections, 1, 'one upstream connection throughout');
      assert.equal(conn.error, undefined);
      assert.equal(conn.ended, false);
      conn.socket.destroy();
      await a.kill();
    }));

  it("resets piped connections at once when a failover's hold says the container's copy is lost; new ones wait for the release", () =>
    withGateway(async ({ client }) => {
      const a = await echoUpstream('A:');
      const b = await echoUpstream('B:');
      const port = await tcpRoute(client, 'lost', a.upstream);
      const conn = new TestConnection(port);
      conn.socket.write('x');
      await conn.until('A:x');
      // A dead host answers nothing: the old upstream stays open and silent, the reset comes from the gateway.
      await client.hold('lost', 'failover-1', { drain: false, takeOver: true, connectionsLost: true });
      await conn.closedWithin();
      assert.equal(conn.error, 'ECONNRESET', 'reset at the hold, not left silent');
      assert.equal(conn.ended, false);
      const again = new TestConnection(port);
      again.socket.write('y');
      await eventually(async () => (await client.getRoute('lost')).held === 1, 'the reconnection is held');
      await client.release('lost', 'failover-1', b.upstream);
      await again.until('B:y');
      again.socket.destroy();
      await a.kill();
      await b.kill();
    }));

  it('resets connections beyond the queue limit', () =>
    withGateway(
      async ({ client }) => {
        const a = await echoUpstream('A:');
        const port = await tcpRoute(client, 'limited', a.upstream);
        await client.hold('limited', 'm1');
        const held = new TestConnection(port);
        await eventually(async () => (await client.getRoute('limited')).held === 1, 'one held connection');
        const refused = new TestConnection(port);
        await refused.closed;
        assert.equal(refused.error, 'ECONNRESET');
        assert.equal(refused.received, '');

        await client.release('limited', 'm1', a.upstream);
        await held.until('A:');
        held.socket.destroy();
        await a.kill();
      },
      { holdLimits: { maxQueued: 1 } },
    ));

  it('resets held connections when the hold passes its time bound, and stays held until released', () =>
    withGateway(async ({ client }) => {
      const a = await echoUpstream('A:');
      const port = await tcpRoute(client, 'slow-move', a.upstream);
      await client.hold('slow-move', 'm1', { timeoutMs: 200 });
      const conn = new TestConnection(port);
      conn.socket.write('x');
      await conn.closed;
      assert.equal(conn.error, 'ECONNRESET');
      assert.equal(conn.received, '');
      assert.equal(a.connections, 0, 'nothing reached the old upstream');
      const route = await client.getRoute('slow-move');
      assert.equal(route.state, 'holding');
      assert.ok(route.migration?.lapsedAt !== undefined);
      await client.release('slow-move', 'm1', a.upstream);
      const after = new TestConnection(port);
      after.socket.write('y');
      await after.until('A:y');
      after.socket.destroy();
      await a.kill();
    }));

  it('waits for the new upstream to accept after a release, and resets when there is none', () =>
    withGateway(async ({ client }) => {
      const nowhere = await tcpRoute(client, 'unplaced');
      const refused = new TestConnection(nowhere);
      await refused.closed;
      assert.equal(refused.error, 'ECONNRESET');

      const port = await tcpRoute(client, 'late', { address: LOOPBACK, port: await freePort() });
      await client.hold('late', 'm1');
      const bPort = await freePort();
      await client.release('late', 'm1', { address: LOOPBACK, port: bPort });
      const conn = new TestConnection(port);
      conn.socket.write('early');
      await sleep(200);
      const b = await echoUpstream('B:', bPort);
      await conn.until('B:early');
      conn.socket.destroy();
      await b.kill();
    }));
});
