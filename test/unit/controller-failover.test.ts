/**
 * The controller's protection logic against in-memory agents: the checkpoint cut (hold, snapshot,
 * release, upload, trim), failover on lease expiry (newest good checkpoint, replay from its
 * position, fencing), and the container lock shared with migrations.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { pino } from 'pino';
import type { ContainerSpec, LogPosition } from '../../src/shared/protocol.js';
import { CheckpointService, type LoggedTraffic } from '../../src/controller/checkpoints.js';
import { ContainerService, containerKey, type ContainerRecord } from '../../src/controller/containers.js';
import { FailoverService, fenceKey, pendingReplayKey, type FailoverTraffic } from '../../src/controller/failover.js';
import { ReplayFailedError } from '../../src/gateway/http-proxy.js';
import { NodeRegistry } from '../../src/controller/registry.js';
import { MemoryStore } from '../../src/controller/store/index.js';
import { FakeCluster } from '../fakes/agents.js';
import { waitFor } from '../support/wait.js';

const silent = pino({ level: 'silent' });

function spec(name: string): ContainerSpec {
  return { name, image: 'counter', command: [], env: {}, ports: [{ hostPort: 8080, containerPort: 80, protocol: 'tcp' }], memoryBytes: 0 };
}

/** The gateway as the services see it: a log position that grows, and every call recorded. */
class FakeTraffic implements FailoverTraffic {
  readonly calls: string[] = [];
  position = 0;
  logged = true;
  /** The route's current request log. */
  logId = 'log-1';
  /** Errors the next replays fail with, in order. */
  readonly replayFailures: Error[] = [];

  async cut(name: string) {
    this.calls.push(`cut ${name}`);
    return { held: true, logPosition: this.logged ? { logId: this.logId, seq: this.position } : null };
  }
  async holdNow(name: string) {
    this.calls.push(`holdNow ${name}`);
    return true;
  }
  async release(name: string, _holdId: string, container: ContainerRecord) {
    this.calls.push(`release ${name} -> ${container.node}`);
  }
  async trimLog(name: string, upTo: LogPosition) {
    this.calls.push(`trim ${name} ${upTo.seq}`);
  }
  async replay(name: string, after: LogPosition, container: ContainerRecord) {
    this.calls.push(`replay ${name} after ${after.seq} -> ${container.node}`);
    const failure = this.replayFailures.shift();
    if (failure) throw failure;
    return { replayed: this.position - after.seq, delivered: 0 };
  }
  async currentLogId() {
    return this.logged ? this.logId : undefined;
  }
  async refresh(name: string) {
    this.calls.push(`refresh ${name}`);
  }
}

async function setup(leaseMs = 60_000) {
  const store = new MemoryStore();
  const cluster = new FakeCluster();
  for (const node of ['node1', 'node2', 'node3']) cluster.add(node);
  const nodes = new NodeRegistry(store, leaseMs);
  for (const node of ['node1', 'node2', 'node3']) await nodes.heartbeat(cluster.agent(node).registration());
  const containers = new ContainerService(store, nodes, cluster.resolver);
  const traffic = new FakeTraffic();
  const checkpoints = new CheckpointService({ store, nodes, agentFor: cluster.resolver, traffic: traffic satisfies LoggedTraffic, catalog: cluster.catalog, storeUrl: () => 'http://controller', log: silent });
  const failovers = new FailoverService({ store, nodes, checkpoints, catalog: cluster.catalog, traffic, log: silent });
  await containers.run({ spec: spec('web'), node: 'node1', protection: { everyMs: 60_000 } });
  const record = async () => (await store.get<ContainerRecord>(containerKey('web')))!.value;
  return { store, cluster, nodes, containers, traffic, checkpoints, failovers, record };
}

describe('checkpoints and failover (controller, fake agents)', () => {
  it('a checkpoint holds the route, snapshots, releases, then uploads with the cut position; the log is trimmed to the checkpoint before', async () => {
    const env = await setup();
    env.traffic.position = 7;
    const first = await env.checkpoints.checkpoint('web');
    assert.deepEqual(first.logPosition, { logId: 'log-1', seq: 7 });
    env.traffic.position = 12;
    const second = await env.checkpoints.checkpoint('web');
    assert.deepEqual(second.logPosition, { logId: 'log-1', seq: 12 });
    assert.deepEqual(env.traffic.calls, ['cut web', 'release web -> node1', 'cut web', 'release web -> node1', 'trim web 7']);
    const calls = env.cluster.calls.filter((c) => c.startsWith('node1.'));
    assert.deepEqual(calls.slice(-3), ['node1.snapshot', 'node1.uploadSnapshot', 'node1.discardSnapshot']);
    assert.equal((await env.record()).busy, undefined, 'the lock is released');
    assert.deepEqual((await env.checkpoints.list('web')).map((c) => c.id), [second.id, first.id]);
  });

  it('a failed snapshot releases the route and the lock, and stores nothing', async () => {
    const env = await setup();
    env.cluster.agent('node1').failNext('snapshot', new Error('criu dump failed'));
    await assert.rejects(env.checkpoints.checkpoint('web'), /criu dump failed/);
    assert.deepEqual(env.traffic.calls, ['cut web', 'release web -> node1']);
    assert.equal((await env.record()).busy, undefined);
    assert.deepEqual(await env.checkpoints.list('web'), []);
  });

  it("a node whose lease ends: its protected container runs elsewhere from the newest checkpoint, the log replayed from that cut, and its old node fenced", async () => {
    const env = await setup(300);
    env.traffic.position = 3;
    const ckpt = await env.checkpoints.checkpoint('web');
    env.traffic.position = 9;
    await env.failovers.start();
    // node2 and node3 keep heartbeating; node1 stops (its container dies with it).
    env.cluster.agent('node1').containers.clear();
    const beat = setInterval(() => {
      for (const node of ['node2', 'node3']) void env.nodes.heartbeat(env.cluster.agent(node).registration());
    }, 50);
    try {
      const done = await waitFor(async () => (await env.failovers.list()).find((f) => f.outcome !== 'running'), 10_000, 'the failover');
      assert.equal(done.outcome, 'done', JSON.stringify(done));
      assert.equal(done.checkpoint, ckpt.id);
      assert.ok(done.to === 'node2' || done.to === 'node3');
      const record = await env.record();
      assert.equal(record.node, done.to);
      assert.equal(record.busy, undefined);
      assert.equal(env.cluster.runningCopies('web'), 1);
      assert.ok(record.generation > 0);
      assert.deepEqual(env.traffic.calls.slice(-3), ['holdNow web', `replay web after 3 -> ${done.to}`, `release web -> ${done.to}`], 'replayed before live traffic');
      assert.deepEqual((await env.store.get(fenceKey('node1', 'web')))?.value, { name: 'web', generation: record.generation });
      assert.deepEqual(await env.failovers.fenceFor('node1'), [{ name: 'web', generation: record.generation }]);
      await env.failovers.forgetFences('web');
      assert.deepEqual(await env.failovers.fenceFor('node1'), [], 'removing the container drops its fences');
    } finally {
      clearInterval(beat);
      env.failovers.stop();
    }
  });

  it('a corrupt newest checkpoint is skipped and reported; the one before is used', async () => {
    const env = await setup();
    env.traffic.position = 2;
    const older = await env.checkpoints.checkpoint('web');
    env.traffic.position = 5;
    const newer = await env.checkpoints.checkpoint('web');
    env.cluster.catalog.find('web', newer.id)!.corrupt = true;
    env.cluster.agent('node1').containers.clear();
    const done = await env.failovers.failover('web', 'node1');
    assert.equal(done.checkpoint, older.id);
    assert.equal(env.traffic.calls.find((c) => c.startsWith('replay')), `replay web after 2 -> ${done.to}`);
  });

  it('without any checkpoint the failover fails clearly and the route stays held (nothing goes back to the dead node)', async () => {
    const env = await setup();
    await assert.rejects(env.failovers.failover('web', 'node1'), (err: Error & { code?: string }) => err.code === 'CHIPMUNK_FAILOVER_FAILED' && /no checkpoint/.test(err.message));
    assert.ok(!env.traffic.calls.some((c) => c.startsWith('release')), env.traffic.calls.join(', '));
    assert.equal((await env.record()).node, 'node1');
    assert.equal((await env.failovers.list())[0]?.outcome, 'failed');
  });

  it('restore --from rolls back on the same node, with a checkpoint of the state before and one after', async () => {
    const env = await setup();
    const target = await env.checkpoints.checkpoint('web');
    await env.checkpoints.checkpoint('web');
    const res = await env.checkpoints.restoreFrom('web', target.id);
    assert.equal(res.restoredFrom, target.id);
    const ids = (await env.checkpoints.list('web')).map((c) => c.id);
    assert.equal(ids[0], res.checkpoint, 'the newest checkpoint is the restored state');
    assert.ok(ids.includes(res.safetyCheckpoint));
    const record = await env.record();
    assert.equal(record.node, 'node1');
    assert.equal(env.cluster.runningCopies('web'), 1);
    await assert.rejects(env.checkpoints.restoreFrom('web', 'ffffffffffffffff'), (err: Error & { code?: string }) => err.code === 'CHIPMUNK_NOT_FOUND');
  });

  it('a failed replay leaves the route held and is recorded; the retry goes on, and only then is the route released', async () => {
    const env = await setup();
    env.traffic.position = 3;
    await env.checkpoints.checkpoint('web');
    env.traffic.position = 9;
    env.cluster.agent('node1').containers.clear();
    const refused = () => new ReplayFailedError('replaying request 5 to web failed after 8 attempts (ECONNREFUSED)', { seq: 5, written: false });
    env.traffic.replayFailures.push(refused(), refused(), refused());
    await assert.rejects(env.failovers.failover('web', 'node1'), (err: Error & { code?: string }) => err.code === 'CHIPMUNK_FAILOVER_FAILED' && /route stays held/.test(err.message));
    const sinceHold = env.traffic.calls.slice(env.traffic.calls.indexOf('holdNow web'));
    assert.ok(!sinceHold.some((c) => c.startsWith('release')), `never released to the copy that did not catch up: ${sinceHold.join(', ')}`);
    const [failed] = await env.failovers.list();
    assert.equal(failed?.outcome, 'failed');
    assert.match(failed?.replayError?.message ?? '', /request 5/);
    const owed = (await env.store.get<{ holdId: string; attempts: number; after: { seq: number } }>(pendingReplayKey('web')))?.value;
    assert.equal(owed?.after.seq, 3);
    assert.equal(owed?.attempts, 3);
    const record = await env.record();
    assert.equal(record.node, failed?.to, 'the container runs at the target');
    assert.equal(record.busy, undefined);

    await env.failovers.retryOwedReplays();
    assert.deepEqual(env.traffic.calls.slice(-2), [`replay web after 3 -> ${failed?.to}`, `release web -> ${failed?.to}`]);
    assert.equal(await env.store.get(pendingReplayKey('web')), undefined);
    const [done] = await env.failovers.list();
    assert.equal(done?.outcome, 'done');
    assert.equal(done?.replayError, undefined);
  });

  it("skips checkpoints cut in an earlier request log, or restores one without a replay when nothing better exists, saying so", async () => {
    const env = await setup();
    env.traffic.position = 3;
    const older = await env.checkpoints.checkpoint('web');
    // Unprotected and protected again: a new log, whose seqs start over.
    env.traffic.logId = 'log-2';
    env.traffic.position = 1;
    const newer = await env.checkpoints.checkpoint('web');
    env.cluster.agent('node1').containers.clear();
    const done = await env.failovers.failover('web', 'node1');
    assert.equal(done.checkpoint, newer.id);
    assert.deepEqual(done.logPosition, { logId: 'log-2', seq: 1 });
    assert.match(done.skipped.find((s) => s.checkpoint === older.id)?.reason ?? '', /in request log log-1, not in the route's current log log-2/);

    // Only a checkpoint of an earlier log left: restored, but nothing replayed from a position of another log.
    const env2 = await setup();
    env2.traffic.position = 3;
    const only = await env2.checkpoints.checkpoint('web');
    env2.traffic.logId = 'log-2';
    env2.traffic.position = 8;
    env2.cluster.agent('node1').containers.clear();
    const fallback = await env2.failovers.failover('web', 'node1');
    assert.equal(fallback.outcome, 'done');
    assert.equal(fallback.checkpoint, only.id);
    assert.ok(!env2.traffic.calls.some((c) => c.startsWith('replay')), env2.traffic.calls.join(', '));
    assert.match(fallback.noReplay ?? '', /without a replay/);
    assert.equal(env2.traffic.calls.at(-1), `release web -> ${fallback.to}`);
  });

  it('a replay that may have applied a request it could not confirm is not retried into that copy: the checkpoint is restored again elsewhere and replayed there', async () => {
    const env = await setup();
    env.traffic.position = 3;
    const ckpt = await env.checkpoints.checkpoint('web');
    env.traffic.position = 9;
    env.cluster.agent('node1').containers.clear();
    env.traffic.replayFailures.push(new ReplayFailedError('replaying request 5 to web failed after 1 attempts (socket closed): it may have been applied', { seq: 5, written: true }));
    await assert.rejects(env.failovers.failover('web', 'node1'), /replay is retried into a copy restored again/);
    const [failed] = await env.failovers.list();
    const first = failed!.to!;
    assert.equal(env.traffic.calls.filter((c) => c.startsWith('replay')).length, 1, 'no second try into the uncertain copy');
    assert.equal((await env.store.get<{ uncertain?: boolean }>(pendingReplayKey('web')))?.value.uncertain, true);

    await env.failovers.retryOwedReplays();
    const record = await env.record();
    assert.notEqual(record.node, first, 'restored again on another node');
    assert.notEqual(record.node, 'node1');
    assert.deepEqual(env.traffic.calls.slice(-2), [`replay web after ${ckpt.logPosition!.seq} -> ${record.node}`, `release web -> ${record.node}`]);
    assert.deepEqual((await env.store.get(fenceKey(first, 'web')))?.value, { name: 'web', generation: record.generation }, 'the uncertain copy is fenced');
    assert.equal(await env.store.get(pendingReplayKey('web')), undefined);
    const [done] = await env.failovers.list();
    assert.equal(done?.outcome, 'done');
    assert.equal(done?.to, record.node);
  });
});
