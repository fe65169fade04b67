/**
 * Controllers sharing one etcd: one leads and alone does the background work; when it goes,
 * another takes over that work, starting with what the old one left locked.
 */
import { after, describe, it } from 'node:test';
import { once } from 'node:events';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import { request } from 'undici';
import { ControllerClient } from '../../src/shared/controller-client.js';
import { ApiClient } from '../../src/shared/http.js';
import { ChipmunkError } from '../../src/shared/errors.js';
import { TERM_HEADER } from '../../src/shared/term-fence.js';
import { ANSWERED_BY_HEADER, FORWARDED_BY_HEADER } from '../../src/controller/forward.js';
import type { ContainerView } from '../../src/shared/protocol.js';
import { startController, type ControllerOptions, type RunningController } from '../../src/controller/index.js';
import { openStore } from '../../src/controller/store/index.js';
import { FakeCluster } from '../fakes/agents.js';
import { startEtcd, type EtcdCluster } from '../support/etcd.js';
import { startTcpProxy } from '../support/tcp-proxy.js';
import { waitFor } from '../support/wait.js';

const TOKEN = 'test-token';
let shared: Promise<EtcdCluster> | undefined;
const sharedEtcd = () => (shared ??= startEtcd());
after(async () => (await shared)?.stop());

/**
 * Controllers sharing one etcd namespace, each with its own checkpoint directory; `close` closes
 * those still open (in start order) and removes their directories.
 */
function controllersOn(spec: string, extra: Partial<ControllerOptions> = {}) {
  const dirs: string[] = [];
  const open: RunningController[] = [];
  return {
    open,
    async start(more: Partial<ControllerOptions> = {}): Promise<RunningController> {
      const checkpointDir = await mkdtemp(join(tmpdir(), 'chipmunk-ha-checkpoints-'));
      dirs.push(checkpointDir);
      const controller = await startController({
        listen: { host: '127.0.0.1', port: 0 },
        token: TOKEN,
        storeSpec: spec,
        checkpointDir,
        leaderLeaseMs: 1000,
        logger: pino({ level: 'silent' }),
        ...extra,
        ...more,
      });
      open.push(controller);
      return controller;
    },
    /** Closes one now (a controller that stops), so the others see it go. */
    async stop(controller: RunningController): Promise<void> {
      await controller.close();
      open.splice(open.indexOf(controller), 1);
    },
    async close(): Promise<void> {
      for (const c of open) await c.close();
      for (const dir of dirs) await rm(dir, { recursive: true, force: true });
    },
  };
}

describe('controllers on one etcd', () => {
  it('one leads and does the background work; when it closes another leads and settles the lock it left', async () => {
    const etcd = await sharedEtcd();
    const spec = `etcd://${etcd.endpoints}/ha-test`;
    const cluster = new FakeCluster();
    cluster.add('node1');
    const fleet = controllersOn(spec, { nodeReadyWithinMs: 2000, agentFactory: cluster.resolver });
    const start = () => fleet.start();
    const store = await openStore(spec);
    try {
      const a = await start();
      await waitFor(() => a.leading(), 5000, 'the first controller to lead');
      const res = await request(`${a.url}/v1/nodes/node1`, {
        method: 'PUT',
        headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
        body: JSON.stringify(cluster.agent('node1').registration()),
      });
      assert.equal(res.statusCode, 200, await res.body.text());
      const client = new ApiClient({ baseUrl: a.url, token: TOKEN, peer: 'controller' });
      await client.post<ContainerView>('/v1/containers', { spec: { name: 'web', image: 'counter', ports: [] } });

      // A checkpoint a controller that died left half-done: only a leader settles such a lock.
      const record = await store.get<{ lock?: unknown }>('/containers/web');
      const lock = { id: 'checkpoint-gone', operation: 'checkpoint', owner: 'controller-gone', since: Date.now() };
      await store.put('/containers/web', { ...record!.value, lock }, { expectModRevision: record!.modRevision });
      // Started after the lock was left: a controller that did not wait for leadership would settle it at once.
      const b = await start();
      await waitFor(() => b.leader()?.term === a.leader()?.term && b.leader() !== undefined, 5000, 'the second to see the first lead');
      assert.equal(b.leading(), false);

      await sleep(1500);
      assert.deepEqual((await store.get<{ lock?: unknown }>('/containers/web'))?.value.lock, lock, 'the follower leaves it alone');

      const oldTerm = a.leader()!.term;
      await fleet.stop(a);
      await waitFor(() => b.leading(), 5000, 'the second controller to lead');
      assert.ok(b.leader()!.term > oldTerm);
      await waitFor(async () => (await store.get<{ lock?: unknown }>('/containers/web'))?.value.lock === undefined, 5000, 'the new leader to settle the lock');
    } finally {
      await fleet.close();
      await store.close();
    }
  });

  it('a follower passes mutations on to the leader, streams included; answers reads, heartbeats and its checkpoint replica itself', async () => {
    const etcd = await sharedEtcd();
    const spec = `etcd://${etcd.endpoints}/forward-test`;
    const cluster = new FakeCluster();
    cluster.add('node1');
    cluster.add('node2');
    const fleet = controllersOn(spec, { agentFactory: cluster.resolver });
    try {
      const leader = await fleet.start({ node: 'node1' });
      await waitFor(() => leader.leading(), 5000, 'the first controller to lead');
      const follower = await fleet.start({ node: 'node2' });
      await waitFor(() => follower.leader()?.term === leader.leader()?.term, 5000, 'the follower to see the leader');
      assert.equal(follower.leading(), false);
      const listed = await new ControllerClient({ urls: [follower.url], token: TOKEN }).controllers();
      assert.deepEqual(
        listed.map(({ url, node, leader: leads, term }) => ({ url, node, leads, term })),
        [
          { url: leader.url, node: 'node1', leads: true, term: leader.leader()!.term },
          { url: follower.url, node: 'node2', leads: false, term: undefined },
        ],
        'any controller lists the controllers, the leader with its term',
      );

      for (const name of ['node1', 'node2']) {
        const res = await request(`${follower.url}/v1/nodes/${name}`, {
          method: 'PUT',
          headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
          body: JSON.stringify(cluster.agent(name).registration()),
        });
        assert.equal(res.statusCode, 200, await res.body.text());
        assert.equal(res.headers[ANSWERED_BY_HEADER], undefined, 'the follower answers heartbeats itself');
      }
      const viaFollower = new ApiClient({ baseUrl: follower.url, token: TOKEN, peer: 'controller' });
      const leaderId = leader.leader()!.id;
      const run = await request(`${follower.url}/v1/containers`, {
        method: 'POST',
        headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
        body: JSON.stringify({ spec: { name: 'web', image: 'counter', ports: [] }, node: 'node1' }),
      });
      const web = (await run.body.json()) as ContainerView;
      assert.deepEqual([run.statusCode, run.headers[ANSWERED_BY_HEADER]], [201, leaderId], 'the leader ran it');
      assert.deepEqual([web.name, web.node, web.status], ['web', 'node1', 'running']);
      await assert.rejects(
        viaFollower.post('/v1/containers', { spec: { name: 'web', image: 'counter', ports: [] } }),
        (err: unknown) => err instanceof ChipmunkError && err.status === 409,
        "the leader's error comes back as it answered it",
      );

      const res = await viaFollower.stream('POST', '/v1/containers/web/migrate', { to: 'node2' });
      assert.match(String(res.headers['content-type']), /^application\/x-ndjson/);
      assert.equal(res.headers[ANSWERED_BY_HEADER], leaderId);
      const lines = (await res.body.text()).trimEnd().split('\n').map((line) => JSON.parse(line) as { phase?: string; summary?: { to: string } });
      assert.deepEqual(lines.slice(0, -1).map((l) => l.phase), ['prepare', 'dump', 'transfer', 'verify', 'cleanup', 'done']);
      assert.equal(lines.at(-1)?.summary?.to, 'node2');
      assert.equal(cluster.runningCopies('web'), 1);
      assert.deepEqual(await viaFollower.get<unknown[]>('/v1/containers/web/checkpoints'), []);

      const unauthenticated = await request(`${follower.url}/v1/containers/web/stop`, { method: 'POST' });
      assert.equal(unauthenticated.statusCode, 401, 'nothing unauthenticated is passed on');
      await unauthenticated.body.dump();
      const looped = await request(`${follower.url}/v1/containers/web/stop`, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}`, [FORWARDED_BY_HEADER]: 'controller-x' } });
      const body = (await looped.body.json()) as { code: string; message: string };
      assert.deepEqual([looped.statusCode, body.code], [503, 'CHIPMUNK_NOT_LEADER'], 'it reached no leader: a client may send it again');
      assert.match(body.message, /election is under way/);
      assert.equal((await viaFollower.get<ContainerView[]>('/v1/containers'))[0].status, 'running', 'the looped stop did not happen');
    } finally {
      await fleet.close();
    }
  });

  it('a controller that stepped down mid-migration writes nothing more; leading again under a new term, it settles the migration', async () => {
    const etcd = await sharedEtcd();
    const namespace = '/fence-test';
    const proxy = await startTcpProxy(etcd.endpoints);
    const checkpointDir = await mkdtemp(join(tmpdir(), 'chipmunk-ha-checkpoints-'));
    const cluster = new FakeCluster();
    cluster.add('node1');
    cluster.add('node2');
    const store = await openStore(`etcd://${etcd.endpoints}${namespace}`);
    const faultsBefore = process.env.CHIPMUNK_ENABLE_FAULTS;
    process.env.CHIPMUNK_ENABLE_FAULTS = '1';
    const a = await startController({
      listen: { host: '127.0.0.1', port: 0 },
      token: TOKEN,
      storeSpec: `etcd://${proxy.endpoint}${namespace}`,
      checkpointDir,
      leaderLeaseMs: 1000,
      nodeReadyWithinMs: 30_000,
      logger: pino({ level: 'silent' }),
      agentFactory: cluster.resolver,
    });
    try {
      await waitFor(() => a.leading(), 5000, 'a to lead');
      const term = a.leader()!.term;
      const viaA = new ApiClient({ baseUrl: a.url, token: TOKEN, peer: 'controller' });
      for (const name of ['node1', 'node2']) {
        const res = await request(`${a.url}/v1/nodes/${name}`, {
          method: 'PUT',
          headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
          body: JSON.stringify(cluster.agent(name).registration()),
        });
        assert.equal(res.statusCode, 200, await res.body.text());
      }
      await viaA.post('/v1/containers', { spec: { name: 'web', image: 'counter', ports: [] }, node: 'node1' });

      // The migration stops right after preparing the target: its next step records the dump phase.
      await viaA.post('/v1/debug/faults', { pauseAt: 'migration:prepare', pauseMaxMs: 30_000 });
      const migrating = viaA.stream('POST', '/v1/containers/web/migrate', { to: 'node2' }).then((res) => res.body.text());
      await waitFor(async () => (await viaA.get<{ reached: boolean }>('/v1/debug/faults')).reached, 5000, 'the migration to pause');

      proxy.cut();
      await waitFor(() => !a.leading(), 2000, 'a to step down');
      await sleep(2000); // its lease has ended on etcd too
      proxy.restore();
      await viaA.post('/v1/debug/faults/resume', {});
      type Line = { phase?: string; error?: { code: string; details?: { cause?: { code: string } } } };
      const lines = (await migrating).trimEnd().split('\n').map((line) => JSON.parse(line) as Line);
      const error = lines.at(-1)?.error;
      assert.deepEqual([error?.code, error?.details?.cause?.code], ['CHIPMUNK_MIGRATION_FAILED', 'CHIPMUNK_NOT_LEADER'], `the migration ends refused: ${JSON.stringify(error)}`);
      assert.ok(!lines.some((l) => l.phase === 'dump'), 'nothing was frozen');

      await waitFor(() => a.leading(), 5000, 'a to lead again');
      assert.ok(a.leader()!.term > term, 'under a new term');
      const [migration] = await store.list<{ id: string }>('/migrations/');
      await waitFor(async () => (await store.get<{ phase: string }>(migration.key))?.value.phase === 'failed', 10_000, 'the migration to be settled');
      await waitFor(async () => (await store.get<{ lock?: unknown }>('/containers/web'))?.value.lock === undefined, 10_000, 'the lock to be released');
      assert.equal((await store.get<{ node: string }>('/containers/web'))?.value.node, 'node1');
      assert.equal(cluster.runningCopies('web'), 1);
    } finally {
      if (faultsBefore === undefined) delete process.env.CHIPMUNK_ENABLE_FAULTS;
      else process.env.CHIPMUNK_ENABLE_FAULTS = faultsBefore;
      await a.close();
      await store.close();
      await proxy.close();
      await rm(checkpointDir, { recursive: true, force: true });
    }
  });

  it("sends the leader's term with its calls to agents; a follower that never led sends none", async () => {
    const etcd = await sharedEtcd();
    const spec = `etcd://${etcd.endpoints}/term-test`;
    // Stands in for an agent: answers every call with an error, noting the term header it came with.
    const seen: { method: string; url: string; term: string | undefined }[] = [];
    const agent = createServer((req, res) => {
      seen.push({ method: req.method!, url: req.url!, term: req.headers[TERM_HEADER] as string | undefined });
      res.writeHead(500, { 'content-type': 'application/json' }).end(JSON.stringify({ code: 'CHIPMUNK_INTERNAL', message: 'a stand-in' }));
    });
    agent.listen(0, '127.0.0.1');
    await once(agent, 'listening');
    const agentUrl = `http://127.0.0.1:${(agent.address() as AddressInfo).port}`;
    const fleet = controllersOn(spec);
    const start = () => fleet.start();
    try {
      const leader = await start();
      await waitFor(() => leader.leading(), 5000, 'the first controller to lead');
      const follower = await start();
      await waitFor(() => follower.leader()?.term === leader.leader()?.term, 5000, 'the follower to see the leader');
      const heartbeat = await request(`${follower.url}/v1/nodes/node1`, {
        method: 'PUT',
        headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
        body: JSON.stringify({ name: 'node1', address: '127.0.0.1', url: agentUrl, capabilities: { lazyMigration: true, softDirty: true, cgroupMode: 'v2' } }),
      });
      assert.equal(heartbeat.statusCode, 200, await heartbeat.body.text());

      const viaFollower = new ApiClient({ baseUrl: follower.url, token: TOKEN, peer: 'controller' });
      await viaFollower.get('/v1/containers'); // the follower reads the agent itself
      await viaFollower.post('/v1/containers', { spec: { name: 'web', image: 'counter', ports: [] } }).catch(() => undefined); // the leader runs it
      const term = String(leader.leader()!.term);
      await waitFor(() => seen.some((call) => call.method === 'POST'), 5000, 'the leader to call the agent');
      for (const call of seen) {
        if (call.method === 'POST') assert.equal(call.term, term, `${call.method} ${call.url} carries the leader's term`);
      }
      assert.ok(seen.some((call) => call.method === 'GET' && call.term === undefined), 'the follower, which never led, reads without a term');
    } finally {
      await fleet.close();
      agent.close();
    }
  });
});
