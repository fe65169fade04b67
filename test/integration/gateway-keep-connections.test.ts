// The gateway keeps its clients' open connections across moves: a whole chipmunk on the runc pair
// (bench/downtime/pair-cluster.ts: a controller with cluster addresses and address routes, two
// agents, and a gateway, all in this process; no local cluster). Containers are exposed WITHOUT a
// published port, so the gateway reaches them at their cluster address, which they keep.
// - TCP route: one client connection through the gateway sends a line every 10 ms to an echo
//   server across a lazy and a copy move: every reply in order, no reset, close or error.
// - HTTP route: one client keep-alive connection sends POST /increment every 10 ms across a lazy
//   and a copy move: no request fails, the counter is the number acknowledged.
// - Redis through a TCP route: INCR every 10 ms on one connection across a lazy and a copy move.
// - Failover (the container's host loses power; restored from a checkpoint): the client's
//   connection through the TCP route is reset at once (never left silent), a new one works.
// Needs root and `npm run setup`; runs on the runc pair's own network:
//   CHIPMUNK_RUNC_PAIR_NET=4 node --import tsx --test test/integration/gateway-keep-connections.test.ts
import assert from 'node:assert/strict';
import { Agent, request, type ClientRequest } from 'node:http';
import { createServer, type Socket } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { startPairCluster, type PairCluster } from '../../bench/downtime/pair-cluster.js';
import { ensureImage } from '../../src/devtools/images.js';
import type { MigrationMode } from '../../src/shared/protocol.js';
import { COMPAT_PROGRAMS, waitUntilServing } from '../support/compat-programs.js';
import { EchoClient, IncrClient } from '../support/kept-connection-clients.js';

const ECHO_PORT = 7007;
const APP_PORT = 8080;
const GATEWAY = '127.0.0.1';
const NODE_LEASE_MS = 3_000;
const redis = COMPAT_PROGRAMS.redis;
const timeout = 10 * 60_000;
let cluster: PairCluster;

before(async () => {
  for (const image of ['chipmunk/busybox', 'chipmunk/statefulapp', redis.image] as const) await ensureImage(image);
  cluster = await startPairCluster({ gateway: true, nodeLeaseMs: NODE_LEASE_MS });
});

after(async () => {
  await cluster?.close();
});

/** A loopback port free a moment ago, for a gateway route. */
async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, GATEWAY, resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Returns the downtime the migration's record says (frozen to restored), to set the client-seen gaps against. */
async function migrate(name: string, to: string, mode: MigrationMode): Promise<number> {
  let downtimeMs: number | undefined;
  for await (const line of await cluster.client.migrate(name, { to, mode })) {
    if ('error' in line) throw new Error(`migration of ${name} to ${to} failed: ${line.error.message}`);
    if ('summary' in line) downtimeMs = line.summary.downtimeMs;
  }
  const row = (await cluster.client.containers()).find((c) => c.name === name);
  assert.equal(row?.node, to, `${name} runs on ${to} after its ${mode} move`);
  assert.ok(downtimeMs !== undefined, `the ${mode} move of ${name} ended without a summary`);
  return downtimeMs;
}

/** Runs `name` on the source with a cluster address and exposes `port` (no published port) at a free gateway port. */
async function runExposed(name: string, image: string, command: string[], port: number, protocol: 'tcp' | 'http', env: Record<string, string> = {}, protected_ = false): Promise<number> {
  const view = await cluster.client.run({ spec: { name, image, command, env }, node: cluster.source, ...(protected_ ? { protection: { everyMs: 2_000 } } : {}) });
  assert.ok(view.address, `${name} got a cluster address`);
  const listen = await freePort();
  const route = await cluster.client.expose(name, { port, listen, protocol });
  assert.equal(route.listenPort, listen);
  return listen;
}

async function removeQuietly(name: string): Promise<void> {
  await cluster.client.unexpose(name).catch(() => undefined);
  await cluster.client.remove(name).catch(() => undefined);
}

/** Polls until `check` holds, bounded. */
async function until(check: () => Promise<boolean> | boolean, what: string, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await Promise.resolve().then(check).catch(() => false))) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(50);
  }
}

interface Move {
  mode: MigrationMode;
  since: number;
  until: number;
  /** Frozen to restored, as the migration's record says. */
  downtimeMs: number;
}

/** Which move a client's first error came in, for the assertion's message. */
function whenFailed(at: number | undefined, moves: Move[]): string {
  if (at === undefined) return '';
  const during = moves.find((m) => at >= m.since && at <= m.until);
  return during ? ` (first error ${at - during.since} ms into the ${during.mode} move)` : ' (first error outside the moves)';
}

/** Moves `name` lazily to the target, then back by copy; returns when each move began and ended. */
async function moveThereAndBack(name: string): Promise<Move[]> {
  const moves: Move[] = [];
  for (const [mode, to] of [['lazy', cluster.target], ['copy', cluster.source]] as const) {
    const since = Date.now();
    const downtimeMs = await migrate(name, to, mode);
    await sleep(500);
    moves.push({ mode, since, until: Date.now(), downtimeMs });
  }
  return moves;
}

describe('the gateway keeps open connections across moves (containers keep their cluster address)', { timeout }, () => {
  it('TCP route: one connection sending every 10 ms gets every echo in order across a lazy and a copy move; a new one works after', async () => {
    const name = 'gwkeep-echo';
    try {
      const listen = await runExposed(name, 'chipmunk/busybox', ['nc', '-ll', '-p', String(ECHO_PORT), '-e', '/bin/cat'], ECHO_PORT, 'tcp');
      const ep = { host: GATEWAY, port: listen };
      await until(async () => {
        const probe = await EchoClient.open(ep);
        await sleep(100);
        const answered = probe.replies.length > 0;
        await probe.stop();
        return answered;
      }, 'the echo answering through the gateway');
      const client = await EchoClient.open(ep);
      await sleep(300);
      const moves = await moveThereAndBack(name);
      const sent = await client.stop();
      assert.deepEqual(client.errors, [], `the connection must see no reset, close or error${whenFailed(client.firstErrorAt, moves)}`);
      client.assertAllInOrder(sent);
      for (const m of moves) console.log(`gateway TCP route, ${m.mode} move: the client's one connection kept, longest gap between echoes ${client.maxGapMs(m.since, m.until)} ms (recorded downtime ${m.downtimeMs} ms)`);
      console.log(`gateway TCP route: ${sent} lines echoed in order over one connection`);
      const fresh = await EchoClient.open(ep);
      await sleep(300);
      const freshSent = await fresh.stop();
      fresh.assertAllInOrder(freshSent);
      assert.ok(freshSent > 0);
    } finally {
      await removeQuietly(name);
    }
  });

  it('HTTP route: one keep-alive client connection sending every 10 ms sees no failed request across a lazy and a copy move', async () => {
    const name = 'gwkeep-http';
    try {
      const listen = await runExposed(name, 'chipmunk/statefulapp', [], APP_PORT, 'http', { MEMORY_MB: '16' });
      const agent = new Agent({ keepAlive: true, maxSockets: 1 });
      const sockets = new Set<Socket>();
      const post = (path: string, method = 'POST') =>
        new Promise<{ status: number; body: string }>((resolve, reject) => {
          const req: ClientRequest = request({ host: GATEWAY, port: listen, path, method, agent }, (res) => {
            let body = '';
            res.setEncoding('utf8');
            res.on('data', (d: string) => (body += d));
            res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
            res.on('error', reject);
          });
          req.on('socket', (s: Socket) => sockets.add(s));
          req.setTimeout(60_000, () => req.destroy(new Error('no answer in 60 s')));
          req.on('error', reject);
          req.end();
        });
      await until(async () => (await post('/health', 'GET')).status === 200, 'the app answering through the gateway');
      sockets.clear();
      let stop = false;
      const answers: number[] = [];
      const failures: string[] = [];
      const loop = (async () => {
        while (!stop) {
          try {
            const res = await post('/increment');
            if (res.status === 200) answers.push(Date.now());
            else failures.push(`${res.status} ${res.body.slice(0, 200)}`);
          } catch (err) {
            failures.push((err as Error).message);
          }
          await sleep(10);
        }
      })();
      await sleep(300);
      const moves = await moveThereAndBack(name);
      stop = true;
      await loop;
      assert.deepEqual(failures, [], 'no request failed');
      const state = JSON.parse((await post('/', 'GET')).body) as { counter: number };
      assert.equal(state.counter, answers.length, 'every acknowledged increment, and only those, is in the state');
      assert.equal(sockets.size, 1, 'the client kept its one connection to the gateway');
      agent.destroy();
      // Every silence that overlaps the move counts whole (as KeptConnectionClient.maxGapMs).
      const gap = (m: Move) => answers.reduce((g, t, i) => (i > 0 && t >= m.since && answers[i - 1]! <= m.until ? Math.max(g, t - answers[i - 1]!) : g), 0);
      for (const m of moves) console.log(`gateway HTTP route, ${m.mode} move: no failed request, longest gap between answers ${gap(m)} ms (recorded downtime ${m.downtimeMs} ms)`);
      console.log(`gateway HTTP route: ${answers.length} increments acknowledged over one client connection, counter ${state.counter}`);
    } finally {
      await removeQuietly(name);
    }
  });

  it('Redis through a TCP route: INCR every 10 ms on one connection, every reply in order across a lazy and a copy move', async () => {
    const name = 'gwkeep-redis';
    try {
      const listen = await runExposed(name, redis.image, redis.command, redis.containerPort, 'tcp');
      const ep = { host: GATEWAY, port: listen };
      await waitUntilServing(redis, ep, 60_000);
      const client = await IncrClient.open(ep, 'through-gateway');
      await sleep(300);
      const moves = await moveThereAndBack(name);
      const sent = await client.stop();
      assert.deepEqual(client.errors, [], `the connection must see no reset, close or error${whenFailed(client.firstErrorAt, moves)}`);
      client.assertEveryReplyInOrder(sent);
      for (const m of moves) console.log(`redis through the gateway, ${m.mode} move: connection kept, longest gap ${client.maxGapMs(m.since, m.until)} ms (recorded downtime ${m.downtimeMs} ms)`);
      console.log(`redis through the gateway: ${sent} INCRs answered in order on one connection`);
    } finally {
      await removeQuietly(name);
    }
  });

  // Last: it kills the source node.
  it("after a failover the TCP route's old connection is reset at once (never left silent), and a new one works", async () => {
    const name = 'gwkeep-failover';
    const listen = await runExposed(name, 'chipmunk/busybox', ['nc', '-ll', '-p', String(ECHO_PORT), '-e', '/bin/cat'], ECHO_PORT, 'tcp', {}, true);
    const ep = { host: GATEWAY, port: listen };
    await until(async () => (await cluster.client.checkpoints(name)).length > 0, `a checkpoint of ${name}`);
    const client = await EchoClient.open(ep);
    await sleep(300);
    assert.ok(client.replies.length > 0, 'the echo answers through the gateway');
    const killedAt = Date.now();
    await cluster.killNode(cluster.source);
    await until(() => client.errors.length > 0, 'the old connection to end', 60_000);
    const resetAfterMs = Date.now() - killedAt;
    await client.stop();
    assert.equal(client.errors[0], 'ECONNRESET', 'the old connection is reset, not ended as if whole, nor left silent');
    // Opened at once: the gateway holds it until the restored copy runs, then connects it.
    const fresh = await EchoClient.open(ep);
    await until(() => fresh.replies.length > 0, 'an echo on a new connection after the failover', 120_000);
    const freshSent = await fresh.stop();
    fresh.assertAllInOrder(freshSent);
    const failover = (await cluster.client.failovers()).find((f) => f.name === name);
    assert.equal(failover?.to, cluster.target, `${name} was failed over to ${cluster.target}`);
    console.log(`failover: the TCP route's old connection was reset ${resetAfterMs} ms after the host died (node lease ${NODE_LEASE_MS} ms); a new connection answered`);
  });
});
