/**
 * The controller's side of the gateway (RouteService) against a real gateway on loopback:
 * what it pushes, and that its periodic full sync never ends a migration's hold.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { pino } from 'pino';
import { RouteService } from '../../src/controller/routes.js';
import { MemoryStore } from '../../src/controller/store/index.js';
import type { ContainerRecord } from '../../src/controller/containers.js';
import { TOKEN, freePort, withGateway } from './gateway-env.js';

const silent = pino({ level: 'silent' });

function record(migration?: ContainerRecord['migration']): ContainerRecord {
  return {
    spec: { name: 'web', image: 'app', command: [], env: {}, ports: [{ hostPort: 8080, containerPort: 80, protocol: 'tcp' }], memoryBytes: 0 },
    node: 'node1',
    status: 'running',
    generation: 0,
    ip: '198.19.1.2',
    createdAt: new Date().toISOString(),
    ...(migration ? { migration } : {}),
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

  it("the periodic sync keeps a running migration's hold, and opens the route once the migration is recorded done", async () => {
    await withGateway(async ({ gateway, client }) => {
      const store = new MemoryStore();
      await store.put('/containers/web', record());
      const routes = new RouteService(store, async () => '198.18.0.11', silent, { url: gateway.url, token: TOKEN, owner: 'store-a' });
      await routes.expose('web', { port: 80, listen: await freePort() });

      await store.put('/containers/web', record({ id: 'm1', phase: 'transfer' }));
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
});
