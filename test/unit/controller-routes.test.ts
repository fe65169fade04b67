/**
 * The controller's side of the gateway (RouteService) against a real gateway on loopback:
 * what it pushes, and that its periodic full sync never ends a migration's hold.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { pino } from 'pino';
import { copyFile, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { connect } from 'node:net';
import { request } from 'undici';
import { RouteService } from '../../src/controller/routes.js';
import { MemoryStore, SqliteStore, storeIdentity } from '../../src/controller/store/index.js';
import type { ContainerRecord } from '../../src/controller/container-lock.js';
import { ConflictError } from '../../src/shared/errors.js';
import { LOOPBACK, TOKEN, echoUpstream, eventually, freePort, httpUpstream, withGateway } from './gateway-env.js';

const silent = pino({ level: 'silent' });

function record(lock?: ContainerRecord['lock'], hostPort = 8080): ContainerRecord {
  return {
    spec: { name: 'web', image: 'app', command: [], env: {}, ports: [{ hostPort, containerPort: 80, protocol: 'tcp' }], memoryBytes: 0 },
    node: 'node1',
    status: 'running',
    generation: 0,
    ip: '198.19.1.2',
    createdAt: new Date().toISOString(),
    ...(lock ? { lock } : {}),
  };
}

describe('RouteService', () => {
  it('exposes through the gateway at the node address and published port, and refuses what cannot work', async () => {
    await withGateway(async ({ gateway, client }) => {
      const store = new MemoryStore();
      await store.put('/containers/web', record());
      const routes = new RouteService(store, async () => '198.18.0.11', silent, { url: gateway.url, token: TOKEN, publicHost: '127.0.0.1', owner: 'store-a' });
      const listen = await freePort();
      const route = await routes.expose('web', { port: 80, listen });
      assert.deepEqual(route, { name: 'web', containerPort: 80, listenPort: listen, protocol: 'http' });
      const onGateway = await client.getRoute('web');
      assert.deepEqual(onGateway.upstream, { address: '198.18.0.11', port: 8080 });
      assert.deepEqual((await routes.endpointsByContainer()).get('web'), [`127.0.0.1:${listen}->80/http`]);
      await assert.rejects(routes.expose('nosuch', { port: 80 }), { code: 'CHIPMUNK_NOT_FOUND' });
      await store.put('/containers/db', { ...record(), spec: { ...record().spec, name: 'db' } });
      await assert.rejects(routes.expose('db', { port: 80, listen }), { code: 'CHIPMUNK_CONFLICT' });
      await routes.unexpose('web');
      assert.deepEqual(await client.listRoutes(), []);
      await store.close();
    });
  });

  it('a container with a cluster address routed to its node is reached there, at the container port: the upstream stays the same across a move', async () => {
    await withGateway(async ({ gateway, client }) => {
      const store = new MemoryStore();
      const withAddress = { ...record(), spec: { ...record().spec, address: '198.19.128.5' } };
      await store.put('/containers/web', withAddress);
      let routedTo = 'node1';
      const routes = new RouteService(store, async (node) => (node === 'node1' ? '198.18.0.11' : '198.18.0.12'), silent, { url: gateway.url, token: TOKEN, owner: 'store-a' }, async () => true, async (address, node) => address === '198.19.128.5' && node === routedTo);
      await routes.expose('web', { port: 80, listen: await freePort() });
      assert.deepEqual((await client.getRoute('web')).upstream, { address: '198.19.128.5', port: 80 });
      await store.put('/containers/web', { ...withAddress, node: 'node2' });
      routedTo = 'node2';
      await routes.refresh('web');
      assert.deepEqual((await client.getRoute('web')).upstream, { address: '198.19.128.5', port: 80 }, 'moved: the same upstream');
      routedTo = 'elsewhere';
      await routes.refresh('web');
      assert.deepEqual((await client.getRoute('web')).upstream, { address: '198.18.0.12', port: 8080 }, 'not routed (yet): the published port, as without an address');
      await routes.unexpose('web');
      await store.close();
    });
  });

  it("a failover's hold resets the TCP route's open connections at once (the container's copy and its connections are lost)", async () => {
    await withGateway(async ({ gateway }) => {
      const echo = await echoUpstream('E:');
      const store = new MemoryStore();
      await store.put('/containers/web', record(undefined, echo.upstream.port));
      const routes = new RouteService(store, async () => LOOPBACK, silent, { url: gateway.url, token: TOKEN, owner: 'store-a' });
      const listen = await freePort();
      await routes.expose('web', { port: 80, listen, protocol: 'tcp' });
      const socket = connect(listen, LOOPBACK);
      let received = '';
      socket.on('data', (d: Buffer) => (received += d.toString()));
      const closed = new Promise<string | undefined>((resolve) => {
        socket.on('error', (err: NodeJS.ErrnoException) => resolve(err.code));
        socket.on('close', () => resolve(undefined));
      });
      await eventually(() => received === 'E:', 'the echo answers through the route');
      assert.equal(await routes.holdNow('web', 'failover-1'), true);
      const outcome = await Promise.race([closed, new Promise<string>((resolve) => setTimeout(() => resolve('still open after 5 s'), 5_000))]);
      assert.equal(outcome, 'ECONNRESET', 'reset at once, not left to a dead host');
      socket.destroy();
      await echo.kill();
      await store.close();
    });
  });

  it("the periodic sync keeps a running migration's hold, and opens the route once the migration is recorded done", async () => {
    await withGateway(async ({ gateway, client }) => {
      const store = new MemoryStore();
      await store.put('/containers/web', record());
      const routes = new RouteService(store, async () => '198.18.0.11', silent, { url: gateway.url, token: TOKEN, owner: 'store-a' });
      await routes.expose('web', { port: 80, listen: await freePort() });

      await store.put('/containers/web', record({ id: 'm1', operation: 'migration', owner: 'controller-test', since: Date.now(), phase: 'transfer' }));
      await routes.hold('web', 'm1');
      routes.start(); // syncs at once
      await new Promise((r) => setTimeout(r, 300));
      routes.stop();
      assert.equal((await client.getRoute('web')).state, 'holding', 'a sync during the transfer must not release the held traffic');

      await store.put('/containers/web', record());
      routes.start();
      await new Promise((r) => setTimeout(r, 300));
      routes.stop();
      assert.equal((await client.getRoute('web')).state, 'open');
      await store.close();
    });
  });

  it("a controller on another (or a fresh) store leaves the first one's routes and request logs alone, and reports them", async () => {
    await withGateway(async ({ gateway, client }) => {
      const upstream = await httpUpstream((req, res) => void req.resume().on('end', () => res.end('ok')));
      const storeA = new MemoryStore();
      await storeA.put('/containers/web', { ...record(undefined, upstream.upstream.port), protection: { everyMs: 60_000 } });
      const ownerA = await storeIdentity(storeA);
      assert.equal(await storeIdentity(storeA), ownerA, 'made once, then kept');
      const a = new RouteService(storeA, async () => LOOPBACK, silent, { url: gateway.url, token: TOKEN, owner: ownerA });
      const listen = await freePort();
      await a.expose('web', { port: 80, listen });
      for (let n = 0; n < 3; n++) assert.equal((await request(`http://${LOOPBACK}:${listen}/`, { method: 'POST', body: 'x' })).statusCode, 200);
      const before = (await client.getRoute('web')).requestLog;
      assert.equal(before?.lastSeq, 3);

      // A second controller, on a fresh store: its own identity, no routes.
      const storeB = new MemoryStore();
      const ownerB = await storeIdentity(storeB);
      assert.notEqual(ownerB, ownerA);
      const warnings: string[] = [];
      const sink = new Writable({ write: (chunk, _enc, done) => void (warnings.push(String(chunk)), done()) });
      const b = new RouteService(storeB, async () => LOOPBACK, pino({ level: 'warn' }, sink), { url: gateway.url, token: TOKEN, owner: ownerB });
      b.start(); // syncs at once
      await eventually(() => warnings.some((w) => w.includes('does not own')), 'the foreign route reported');
      b.stop();
      const after = await client.getRoute('web');
      assert.equal(after.owner, ownerA);
      assert.deepEqual(after.requestLog, before, 'the route and its request log are intact');
      assert.match(warnings.join(''), new RegExp(`web \\(owner ${ownerA}\\)`));
      await storeB.put('/containers/web', record());
      await assert.rejects(b.expose('web', { port: 80, listen: await freePort() }), ConflictError);
      assert.equal((await client.getRoute('web')).owner, ownerA);

      // Only its owner removes it, and its log with it.
      await a.unexpose('web');
      assert.deepEqual(await client.listRoutes(), []);
      await upstream.kill();
      await storeA.close();
      await storeB.close();
    });
  });

  it("the sync releases a hold left by an operation that ended, but keeps one a failover's replay is still owed", async () => {
    await withGateway(async ({ gateway, client }) => {
      const store = new MemoryStore();
      await store.put('/containers/web', record());
      const routes = new RouteService(store, async () => '198.18.0.11', silent, { url: gateway.url, token: TOKEN, owner: 'store-a' });
      await routes.expose('web', { port: 80, listen: await freePort() });

      // A checkpoint whose controller died between hold and release: nothing runs any more. While
      // the container's node is dead the hold stays (never released towards a dead node).
      await client.hold('web', 'checkpoint-gone');
      const nodeDead = new RouteService(store, async () => '198.18.0.11', silent, { url: gateway.url, token: TOKEN, owner: 'store-a' }, async () => false);
      nodeDead.start();
      await new Promise((r) => setTimeout(r, 300));
      nodeDead.stop();
      assert.equal((await client.getRoute('web')).state, 'holding');
      routes.start();
      await eventually(async () => (await client.getRoute('web')).state === 'open', 'the leftover hold released');
      routes.stop();
      assert.equal((await client.getRoute('web')).migration?.outcome, 'released');

      // A failover restored the container but its replay is owed: it keeps the lock, and the hold stays.
      await store.put('/containers/web', record({ id: 'failover-1', operation: 'failover', owner: 'controller-test', since: Date.now() }));
      await client.hold('web', 'failover-1');
      routes.start();
      await new Promise((r) => setTimeout(r, 300));
      routes.stop();
      assert.equal((await client.getRoute('web')).state, 'holding', 'no copy gets traffic before its replay');
      await store.close();
    });
  });

  it('a controller restarted on an older copy of its store leaves the routes created after that copy alone', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'chipmunk-old-store-'));
    try {
      await withGateway(async ({ gateway, client }) => {
        const path = join(dir, 'controller.db');
        const store = SqliteStore.open(path);
        const owner = await storeIdentity(store);
        await store.put('/containers/web', record());
        await store.put('/containers/api', { ...record(), spec: { ...record().spec, name: 'api' } });
        const routes = new RouteService(store, async () => '198.18.0.11', silent, { url: gateway.url, token: TOKEN, owner });
        await routes.expose('web', { port: 80, listen: await freePort() });
        await store.close();
        await copyFile(path, join(dir, 'backup.db'));

        const reopened = SqliteStore.open(path);
        const again = new RouteService(reopened, async () => '198.18.0.11', silent, { url: gateway.url, token: TOKEN, owner });
        await again.expose('api', { port: 80, listen: await freePort() });
        again.start();
        await eventually(async () => (await client.getRoute('api')).storeRevision !== undefined, 'the sync to state the route revision');
        again.stop();
        await reopened.close();

        // The old copy: same owner, an older revision; it never saw 'api' created.
        const old = SqliteStore.open(join(dir, 'backup.db'));
        assert.equal(await storeIdentity(old), owner);
        const warnings: string[] = [];
        const sink = new Writable({ write: (chunk, _enc, done) => void (warnings.push(String(chunk)), done()) });
        const restarted = new RouteService(old, async () => '198.18.0.11', pino({ level: 'warn' }, sink), { url: gateway.url, token: TOKEN, owner });
        restarted.start();
        await eventually(() => warnings.some((w) => w.includes('does not own')), 'the route reported');
        restarted.stop();
        assert.deepEqual((await client.listRoutes()).map((r) => r.name), ['api', 'web'], "the newer route (and its log) survives the older store's sync");
        assert.match(warnings.join(''), /api \(this owner's, created at store revision \d+, which this store has not reached\)/);

        // Deleted from the store it knew: removed.
        await old.delete('/routes/web');
        restarted.start();
        await eventually(async () => (await client.listRoutes()).every((r) => r.name !== 'web'), 'the unexposed route removed');
        restarted.stop();
        await old.close();
      });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
