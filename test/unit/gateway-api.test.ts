import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { request } from 'undici';
import { ConflictError, InvalidInputError, NotFoundError, StaleTermError, UnauthorizedError } from '../../src/shared/errors.js';
import { GatewayClient, startGateway } from '../../src/gateway/index.js';
import type { RouteTableFile } from '../../src/gateway/protocol.js';
import { LOOPBACK, TOKEN, eventually, freePort, httpUpstream, withGateway } from './gateway-env.js';

async function rejectsWith<E extends Error>(promise: Promise<unknown>, errorClass: new (...args: never[]) => E, message?: RegExp): Promise<E> {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof errorClass, `expected ${errorClass.name}, got ${(err as Error).name}: ${(err as Error).message}`);
    if (message) assert.match(err.message, message);
    return err;
  }
  assert.fail(`expected ${errorClass.name}, but it succeeded`);
}

describe('gateway API', () => {
  it('requires the token everywhere but /healthz and /metrics', () =>
    withGateway(async ({ gateway }) => {
      assert.equal((await request(`${gateway.url}/healthz`)).statusCode, 200);
      const metrics = await request(`${gateway.url}/metrics`);
      assert.equal(metrics.statusCode, 200);
      assert.match(await metrics.body.text(), /chipmunk_gateway_requests_total/);

      const anonymous = await request(`${gateway.url}/v1/routes`);
      assert.equal(anonymous.statusCode, 401);
      assert.equal(((await anonymous.body.json()) as { code: string }).code, 'CHIPMUNK_UNAUTHORIZED');
      const wrong = new GatewayClient({ url: gateway.url, token: 'not-the-token' });
      await rejectsWith(wrong.putRoute('web', { protocol: 'http', listenPort: await freePort() }), UnauthorizedError);
    }));

  it('creates, shows, changes and removes routes', () =>
    withGateway(async ({ client }) => {
      const port = await freePort();
      const created = await client.putRoute('web', { protocol: 'http', listenPort: port, upstream: { address: LOOPBACK, port: 8080 } });
      assert.deepEqual(
        { name: created.name, state: created.state, generation: created.generation, held: created.held, upstream: created.upstream },
        { name: 'web', state: 'open', generation: 1, held: 0, upstream: { address: LOOPBACK, port: 8080 } },
      );
      const same = await client.putRoute('web', { protocol: 'http', listenPort: port, upstream: { address: LOOPBACK, port: 8080 } });
      assert.equal(same.generation, 1, 'an unchanged PUT changes nothing');
      const moved = await client.putRoute('web', { protocol: 'http', listenPort: port, upstream: { address: LOOPBACK, port: 8081 } });
      assert.equal(moved.generation, 2);

      const newPort = await freePort();
      await client.putRoute('web', { protocol: 'tcp', listenPort: newPort, upstream: { address: LOOPBACK, port: 8081 } });
      assert.deepEqual(
        (await client.listRoutes()).map((r) => [r.name, r.protocol, r.listenPort]),
        [['web', 'tcp', newPort]],
      );
      // The old port was let go.
      await listenOnce(port);

      await client.removeRoute('web');
      assert.deepEqual(await client.listRoutes(), []);
      await listenOnce(newPort);
      await rejectsWith(client.removeRoute('web'), NotFoundError);
    }));

  it('answers 404 for holds and releases of unknown routes, 409 for the wrong migration', () =>
    withGateway(async ({ client }) => {
      await rejectsWith(client.hold('ghost', 'm1'), NotFoundError, /no route for container 'ghost'/);
      await rejectsWith(client.release('ghost', 'm1', { address: LOOPBACK, port: 80 }), NotFoundError);

      await client.putRoute('web', { protocol: 'http', listenPort: await freePort(), upstream: { address: LOOPBACK, port: 8080 } });
      await rejectsWith(client.release('web', 'm1', { address: LOOPBACK, port: 8081 }), ConflictError, /is not held/);
      const held = await client.hold('web', 'm1', { timeoutMs: 60_000 });
      assert.equal(held.state, 'holding');
      assert.equal(held.migration?.id, 'm1');
      assert.ok((held.migration?.expiresAt ?? 0) - (held.migration?.heldAt ?? 0) <= 30_000, 'the hold is capped at the maximum hold');
      assert.equal((await client.hold('web', 'm1')).generation, held.generation, 'holding again for the same migration changes nothing');
      await rejectsWith(client.hold('web', 'm2'), ConflictError, /held by migration m1/);
      await rejectsWith(client.release('web', 'm2', { address: LOOPBACK, port: 8081 }), ConflictError, /held by migration m1/);

      const released = await client.release('web', 'm1', { address: LOOPBACK, port: 8081 });
      assert.equal(released.state, 'open');
      assert.equal(released.migration?.outcome, 'released');
      assert.deepEqual(released.upstream, { address: LOOPBACK, port: 8081 });
      assert.equal((await client.release('web', 'm1', { address: LOOPBACK, port: 8081 })).generation, released.generation, 'a resent release changes nothing');
    }));

  it("lets a failover take another operation's hold over (takeOver): held throughout, opened only by the new hold's release", () =>
    withGateway(async ({ client }) => {
      await client.putRoute('web', { protocol: 'http', listenPort: await freePort(), upstream: { address: LOOPBACK, port: 8080 } });
      await client.hold('web', 'checkpoint-1');
      const taken = await client.hold('web', 'failover-1', { drain: false, takeOver: true });
      assert.deepEqual([taken.state, taken.migration?.id], ['holding', 'failover-1']);
      await rejectsWith(client.release('web', 'checkpoint-1', { address: LOOPBACK, port: 8080 }), ConflictError, /held by migration failover-1/);
      assert.equal((await client.getRoute('web')).state, 'holding', "the checkpoint's late release does not open it");
      const released = await client.release('web', 'failover-1', { address: LOOPBACK, port: 8081 });
      assert.deepEqual([released.state, released.upstream], ['open', { address: LOOPBACK, port: 8081 }]);
    }));

  it('refuses a port in use, by another route or by another program', () =>
    withGateway(async ({ client }) => {
      const port = await freePort();
      await client.putRoute('web', { protocol: 'http', listenPort: port });
      await rejectsWith(client.putRoute('db', { protocol: 'tcp', listenPort: port }), ConflictError, new RegExp(`port ${port} is already the gateway port of container 'web'`));

      const squatter = createServer();
      await new Promise<void>((resolve) => squatter.listen(0, LOOPBACK, resolve));
      const taken = (squatter.address() as { port: number }).port;
      const err = await rejectsWith(client.putRoute('db', { protocol: 'tcp', listenPort: taken }), ConflictError, new RegExp(`port ${taken} is already in use on the gateway host`));
      assert.equal(err.status, 409);
      assert.deepEqual((await client.listRoutes()).map((r) => r.name), ['web'], 'the refused route was not added');
      await new Promise<void>((resolve) => squatter.close(() => resolve()));
    }));

  it('answers 400 for malformed routes', () =>
    withGateway(async ({ client, gateway }) => {
      await rejectsWith(client.putRoute('web', { protocol: 'http', listenPort: 0 }), InvalidInputError, /listenPort/);
      await rejectsWith(client.putRoute('web', { protocol: 'udp' as 'tcp', listenPort: 9000 }), InvalidInputError, /protocol/);
      await rejectsWith(client.putRoute('web', { protocol: 'tcp', listenPort: 9000, upstream: { address: LOOPBACK, port: 70_000 } }), InvalidInputError);
      await rejectsWith(client.putRoute('Bad Name!', { protocol: 'tcp', listenPort: 9000 }), InvalidInputError);
      await client.putRoute('web', { protocol: 'http', listenPort: await freePort() });
      await rejectsWith(client.hold('web', ''), InvalidInputError);
      const res = await request(`${gateway.url}/v1/routes/web/release`, {
        method: 'POST',
        headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
        body: JSON.stringify({ migrationId: 'm1' }),
      });
      assert.equal(res.statusCode, 400);
      assert.equal(((await res.body.json()) as { code: string }).code, 'CHIPMUNK_INVALID_INPUT');
    }));

  it("a sync replaces its owner's routes only: other owners' and unowned routes (and their logs) stay, and it never ends a hold", () =>
    withGateway(async ({ client }) => {
      const oldPort = await freePort();
      await client.putRoute('old', { protocol: 'tcp', listenPort: oldPort, owner: 'store-a' });
      await client.putRoute('kept', { protocol: 'http', listenPort: await freePort(), owner: 'store-a' });
      await client.putRoute('theirs', { protocol: 'http', listenPort: await freePort(), owner: 'store-b' });
      await client.putRoute('manual', { protocol: 'http', listenPort: await freePort() });
      const keptPort = (await client.getRoute('kept')).listenPort;
      const newPort = await freePort();
      const routes = await client.sync('store-a', [
        { name: 'kept', protocol: 'http', listenPort: keptPort, upstream: { address: LOOPBACK, port: 8080 }, hold: { migrationId: 'm7' } },
        { name: 'new', protocol: 'tcp', listenPort: newPort },
      ]);
      assert.deepEqual(
        routes.map((r) => [r.name, r.owner, r.state, r.migration?.id]),
        [
          ['kept', 'store-a', 'holding', 'm7'],
          ['manual', undefined, 'open', undefined],
          ['new', 'store-a', 'open', undefined],
          ['theirs', 'store-b', 'open', undefined],
        ],
      );
      await listenOnce(oldPort);

      // Only a release opens a held route: a sync without the hold leaves it held.
      const after = await client.sync('store-a', [{ name: 'kept', protocol: 'http', listenPort: keptPort, upstream: { address: LOOPBACK, port: 8080 } }]);
      assert.deepEqual(
        after.map((r) => [r.name, r.state]),
        [
          ['kept', 'holding'],
          ['manual', 'open'],
          ['theirs', 'open'],
        ],
      );
      await client.release('kept', 'm7', { address: LOOPBACK, port: 8080 });
      assert.equal((await client.getRoute('kept')).state, 'open');

      // Another owner's route is neither changed nor removed; an unowned one is claimed by a put.
      const theirs = await client.getRoute('theirs');
      await rejectsWith(client.sync('store-a', [{ name: 'theirs', protocol: 'http', listenPort: theirs.listenPort }]), ConflictError, /store-b/);
      await rejectsWith(client.putRoute('theirs', { protocol: 'http', listenPort: theirs.listenPort, owner: 'store-a' }), ConflictError, /belongs to the controller whose store is store-b/);
      await rejectsWith(client.removeRoute('theirs'), ConflictError, /store-b/);
      await rejectsWith(client.removeRoute('theirs', 'store-a'), ConflictError, /store-b/);
      assert.equal((await client.getRoute('theirs')).owner, 'store-b');
      await client.removeRoute('theirs', 'store-b');
      const manual = await client.putRoute('manual', { protocol: 'http', listenPort: (await client.getRoute('manual')).listenPort, owner: 'store-a' });
      assert.equal(manual.owner, 'store-a');
    }));

  it('keeps its routes, holds included, across a restart', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'chipmunk-gateway-restart-'));
    const stateFile = join(dir, 'state', 'routes.json');
    const a = await httpUpstream((_req, res) => res.end('from a'));
    const b = await httpUpstream((_req, res) => res.end('from b'));
    const listenPort = await freePort();
    try {
      await withGateway(
        async ({ client }) => {
          await client.putRoute('web', { protocol: 'http', listenPort, upstream: a.upstream });
          await client.hold('web', 'm1');
        },
        { stateFile },
      );
      const saved = JSON.parse(await readFile(stateFile, 'utf8')) as RouteTableFile;
      assert.equal(saved.version, 1);
      assert.deepEqual(
        saved.routes.map((r) => [r.name, r.state, r.listenPort]),
        [['web', 'holding', listenPort]],
      );

      await withGateway(
        async ({ client }) => {
          const [route] = await client.listRoutes();
          assert.equal(route.state, 'holding');
          assert.equal(route.migration?.id, 'm1');
          const held = request(`http://${LOOPBACK}:${listenPort}/`);
          await eventually(async () => (await client.getRoute('web')).held === 1, 'the restarted gateway to hold the request');
          await client.release('web', 'm1', b.upstream);
          assert.equal(await (await held).body.text(), 'from b');
        },
        { stateFile },
      );
    } finally {
      await a.kill();
      await b.kill();
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('refuses calls from a deposed controller leader, also after a restart', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'chipmunk-gateway-term-'));
    const stateFile = join(dir, 'routes.json');
    const start = () => startGateway({ apiListen: { host: LOOPBACK, port: 0 }, routeHost: LOOPBACK, token: TOKEN, stateFile, logger: pino({ level: 'silent' }) });
    const asLeader = (url: string, term: number) => new GatewayClient({ url, token: TOKEN, term: () => term });
    const listenPort = await freePort();
    const first = await start();
    try {
      await asLeader(first.url, 3).putRoute('web', { protocol: 'http', listenPort, upstream: { address: LOOPBACK, port: 1 } });
      await asLeader(first.url, 4).listRoutes();
      await rejectsWith(asLeader(first.url, 3).removeRoute('web'), StaleTermError, /newer controller leader \(term 4\)/);
    } finally {
      await first.close();
    }
    const second = await start();
    try {
      await rejectsWith(asLeader(second.url, 3).removeRoute('web'), StaleTermError, /term 4/);
      assert.deepEqual((await asLeader(second.url, 4).listRoutes()).map((r) => r.name), ['web'], 'the stale remove changed nothing');
    } finally {
      await second.close();
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('refuses to start on a corrupt state file', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'chipmunk-gateway-corrupt-'));
    const stateFile = join(dir, 'routes.json');
    try {
      await writeFile(stateFile, JSON.stringify({ version: 1, routes: [{ name: 'web', protocol: 'http', listenPort: 0 }] }));
      await rejectsWith(
        startGateway({ apiListen: { host: LOOPBACK, port: 0 }, token: TOKEN, stateFile, logger: pino({ level: 'silent' }) }),
        InvalidInputError,
        /is not a route table/,
      );
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('counts requests and holds in /metrics', () =>
    withGateway(async ({ client, gateway }) => {
      const a = await httpUpstream((_req, res) => res.end('ok'));
      const listenPort = await freePort();
      await client.putRoute('web', { protocol: 'http', listenPort, upstream: a.upstream });
      await (await request(`http://${LOOPBACK}:${listenPort}/`)).body.dump();
      await client.hold('web', 'm1');
      await client.release('web', 'm1', a.upstream);
      const text = await (await request(`${gateway.url}/metrics`)).body.text();
      assert.match(text, /chipmunk_gateway_requests_total\{route="web",status="200"\} 1/);
      assert.match(text, /chipmunk_gateway_hold_duration_seconds_count\{route="web",outcome="released"\} 1/);
      assert.match(text, /chipmunk_gateway_held\{route="web"\} 0/);
      await a.kill();
    }));
});

/** Proves a port is free again by listening on it. */
async function listenOnce(port: number): Promise<void> {
  const server = createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, LOOPBACK, resolve);
  });
  await new Promise<void>((resolve) => server.close(() => resolve()));
}
