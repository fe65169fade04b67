/**
 * The controller's protection logic against in-memory agents: the checkpoint cut (hold, checkpoint on the agent,
 * release, upload, trim), failover on lease expiry (newest good checkpoint, replay from its
 * position, fencing), and the container lock shared with migrations.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { pino } from 'pino';
import type { ContainerSpec, LogPosition } from '../../src/shared/protocol.js';
import { CheckpointService, type LoggedTraffic } from '../../src/controller/checkpoints.js';
import { ContainerLocks, containerKey, type ContainerRecord } from '../../src/controller/container-lock.js';
import { ContainerService } from '../../src/controller/containers.js';
import { ContainerAddresses, DEFAULT_CONTAINER_RANGE, parseContainerRange } from '../../src/controller/addresses.js';
import { FailoverService, type FailoverTraffic } from '../../src/controller/failover.js';
import { Fences, fenceKey } from '../../src/controller/fences.js';
import { MigrationOrchestrator } from '../../src/controller/migration.js';
import { recoverStaleLocks } from '../../src/controller/recovery.js';
import { NodeRegistry } from '../../src/controller/registry.js';
import { MemoryStore } from '../../src/controller/store/index.js';
import { FencedStore } from '../../src/controller/store/fenced.js';
import { FakeCluster } from '../fakes/agents.js';
import { ChipmunkError, ConflictError, UnavailableError } from '../../src/shared/errors.js';
import { waitFor } from '../support/wait.js';

const silent = pino({ level: process.env.DEBUG_LOG ? 'debug' : 'silent' });

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
  async hold(name: string) {
    this.calls.push(`hold ${name}`);
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
  /** Runs at each replay, before it answers (a fault to inject there). */
  onReplay?: (container: ContainerRecord) => Promise<void>;
  async replay(name: string, after: LogPosition, container: ContainerRecord) {
    this.calls.push(`replay ${name} after ${after.seq} -> ${container.node}`);
    await this.onReplay?.(container);
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
  const traffic = new FakeTraffic();
  const fences = new Fences(store);
  /** One controller instance: its lock owner and services. A second call is a restarted controller. */
  const controller = () => {
    const locks = new ContainerLocks(store);
    const containers = new ContainerService(store, nodes, cluster.resolver, locks, new ContainerAddresses(store, parseContainerRange(DEFAULT_CONTAINER_RANGE)));
    const checkpoints = new CheckpointService({ store, nodes, agentFor: cluster.resolver, locks, traffic: traffic satisfies LoggedTraffic, catalog: cluster.catalog, log: silent });
    const failovers = new FailoverService({ store, nodes, locks, fences, agentFor: cluster.resolver, nodeLeaseMs: leaseMs, checkpoints, catalog: cluster.catalog, traffic, log: silent });
    const migrations = new MigrationOrchestrator({ store, nodes, agentFor: cluster.resolver, locks, fences, log: silent, traffic, rescuer: failovers });
    return { locks, containers, checkpoints, failovers, migrations };
  };
  const first = controller();
  await first.containers.run({ spec: spec('web'), node: 'node1', protection: { everyMs: 60_000 } });
  const record = async () => (await store.get<ContainerRecord>(containerKey('web')))!.value;
  /** These nodes heartbeat every 50 ms until the returned function is called; the others' leases run out. */
  const keepAlive = (alive: string[]) => {
    const timer = setInterval(() => {
      for (const node of alive) void nodes.heartbeat(cluster.agent(node).registration());
    }, 50);
    return () => clearInterval(timer);
  };
  return { store, cluster, nodes, traffic, fences, controller, keepAlive, ...first, record };
}

describe('checkpoints and failover (controller, fake agents)', () => {
  it('a checkpoint holds the route, checkpoints on the agent, releases, then uploads with the cut position; the log is trimmed to the checkpoint before', async () => {
    const env = await setup();
    env.traffic.position = 7;
    const first = await env.checkpoints.checkpoint('web');
    assert.deepEqual(first.logPosition, { logId: 'log-1', seq: 7 });
    env.traffic.position = 12;
    const second = await env.checkpoints.checkpoint('web');
    assert.deepEqual(second.logPosition, { logId: 'log-1', seq: 12 });
    assert.deepEqual(env.traffic.calls, ['cut web', 'release web -> node1', 'cut web', 'release web -> node1', 'trim web 7']);
    const calls = env.cluster.calls.filter((c) => c.startsWith('node1.'));
    assert.deepEqual(calls.slice(-3), ['node1.checkpoint', 'node1.uploadCheckpoint', 'node1.discardCheckpoint']);
    assert.equal((await env.record()).lock, undefined, 'the lock is released');
    assert.deepEqual((await env.checkpoints.list('web')).map((c) => c.id), [second.id, first.id]);
  });

  it('a failed checkpoint on the agent releases the route and the lock, and stores nothing', async () => {
    const env = await setup();
    env.cluster.agent('node1').failNext('checkpoint', new Error('criu dump failed'));
    await assert.rejects(env.checkpoints.checkpoint('web'), /criu dump failed/);
    assert.deepEqual(env.traffic.calls, ['cut web', 'release web -> node1']);
    assert.equal((await env.record()).lock, undefined);
    assert.deepEqual(await env.checkpoints.list('web'), []);
  });

  it('a scheduled checkpoint that fails is tried again within seconds, not a whole period (10 minutes) later', async () => {
    const env = await setup();
    await env.locks.update('web', (record) => ({ ...record!, protection: { everyMs: 600_000 } }));
    env.cluster.agent('node1').failNext('checkpoint', new Error('criu dump failed'));
    env.checkpoints.start();
    try {
      const [taken] = await waitFor(async () => {
        const list = await env.checkpoints.list('web');
        return list.length > 0 ? list : undefined;
      }, 5_000, 'a checkpoint after the failed one');
      assert.ok(taken);
      const attempts = env.cluster.calls.filter((c) => c === 'node1.checkpoint').length;
      assert.equal(attempts, 2, 'the failed attempt, then the one that worked');
    } finally {
      env.checkpoints.stop();
    }
  });

  it('a leader that just started cuts no checkpoint for a node lease: a node that died with the old leader still has its lease, and a cut there would hold the route and the lock for nothing (found on the HA cluster: the failover waited 5 s for the lock)', async () => {
    const env = await setup(1_000);
    // Made by a new leader: node1 (the old leader's host) died right after its last heartbeat.
    const checkpoints = new CheckpointService({ store: env.store, nodes: env.nodes, agentFor: env.cluster.resolver, locks: env.locks, traffic: env.traffic, catalog: env.cluster.catalog, log: silent, quietAfterStartMs: 1_000 });
    assert.equal(await env.nodes.isReady('node1'), true, 'its lease still runs');
    checkpoints.start();
    try {
      await new Promise((resolve) => setTimeout(resolve, 1_600));
      assert.deepEqual(env.cluster.calls.filter((c) => c === 'node1.checkpoint'), [], 'no checkpoint on the dead node');
      // A live node's container is checkpointed once the quiet time is over.
      const stopHeartbeats = env.keepAlive(['node1']);
      try {
        await waitFor(async () => ((await checkpoints.list('web')).length > 0 ? true : undefined), 3_000, 'a checkpoint once node1 heartbeats');
      } finally {
        stopHeartbeats();
      }
    } finally {
      checkpoints.stop();
    }
  });

  it("an operation whose lock release was refused while its controller had stepped down for a moment leaves a lock the next start of its leader work recovers (found on the HA cluster: a failover cut by a leader flap kept the container down for good)", async () => {
    const env = await setup();
    let leading = true;
    const fenced = new FencedStore(env.store, () => (leading ? { key: '/test-fence', modRevision: 0 } : undefined));
    const locks = new ContainerLocks(fenced);
    const held = await locks.acquire('web', 'checkpoint');
    assert.deepEqual(await locks.stale(), [], 'its operation still runs');
    leading = false;
    await assert.rejects(locks.releaseIfHeld(held), /does not lead/);
    leading = true;
    assert.deepEqual((await locks.stale()).map((l) => l.lock.id), [held.lock.id], 'left by an operation that ended: stale');
    await recoverStaleLocks({ locks, nodes: env.nodes, agentFor: env.cluster.resolver, traffic: env.traffic, failovers: env.failovers, log: silent });
    assert.equal((await env.record()).lock, undefined, 'recovered and released');
  });

  it("a node whose lease ends: its protected container runs elsewhere from the newest checkpoint, the log replayed from that cut, and its old node fenced", async () => {
    const env = await setup(300);
    const address = (await env.record()).spec.address;
    assert.ok(address, 'the container has a cluster address');
    env.traffic.position = 3;
    const ckpt = await env.checkpoints.checkpoint('web');
    env.traffic.position = 9;
    await env.failovers.start();
    // node2 and node3 keep heartbeating; node1 stops (its container dies with it).
    env.cluster.agent('node1').containers.clear();
    const stopBeating = env.keepAlive(['node2', 'node3']);
    try {
      const done = await waitFor(async () => (await env.failovers.list()).find((f) => f.outcome !== 'running'), 10_000, 'the failover');
      assert.equal(done.outcome, 'done', JSON.stringify(done));
      assert.equal(done.checkpoint, ckpt.id);
      assert.ok(done.to === 'node2' || done.to === 'node3');
      const record = await env.record();
      assert.equal(record.node, done.to);
      assert.equal(record.lock, undefined);
      assert.equal(env.cluster.runningCopies('web'), 1);
      assert.ok(record.generation > 0);
      assert.equal(record.spec.address, address, 'the failed-over container keeps its address');
      assert.equal(env.cluster.agent(done.to!).containers.get('web')?.spec.address, address, 'its new node was given that address');
      assert.deepEqual(env.traffic.calls.slice(-3), ['holdNow web', `replay web after 3 -> ${done.to}`, `release web -> ${done.to}`], 'replayed before live traffic');
      assert.deepEqual((await env.store.get(fenceKey('node1', 'web')))?.value, { name: 'web', generation: record.generation });
      assert.deepEqual(await env.fences.forNode('node1'), [{ name: 'web', generation: record.generation }]);
      await env.fences.forget('web');
      assert.deepEqual(await env.fences.forNode('node1'), [], 'removing the container drops its fences');
    } finally {
      stopBeating();
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

  it('a checkpoint cut before the route logged (protected, then exposed): the failover replays the whole log onto it, nothing acknowledged since is lost', async () => {
    const env = await setup();
    env.traffic.logged = false;
    const before = await env.checkpoints.checkpoint('web');
    assert.equal(before.logPosition, null);
    // The route starts logging (the container is exposed) and 4 requests are answered; the host dies before the next checkpoint.
    env.traffic.logged = true;
    env.traffic.position = 4;
    env.cluster.agent('node1').containers.clear();
    const done = await env.failovers.failover('web', 'node1');
    assert.equal(done.checkpoint, before.id);
    assert.equal(done.noReplay, undefined, done.noReplay);
    assert.deepEqual(env.traffic.calls.slice(-3), ['holdNow web', `replay web after 0 -> ${done.to}`, `release web -> ${done.to}`]);
  });

  it('but not when a checkpoint was cut in that log (even a corrupt one): the log may be trimmed, so the older checkpoint is restored without a replay, and the record says so', async () => {
    const env = await setup();
    env.traffic.logged = false;
    const before = await env.checkpoints.checkpoint('web');
    env.traffic.logged = true;
    env.traffic.position = 2;
    const inLog = await env.checkpoints.checkpoint('web');
    env.cluster.catalog.find('web', inLog.id)!.corrupt = true;
    env.cluster.agent('node1').containers.clear();
    const done = await env.failovers.failover('web', 'node1');
    assert.equal(done.checkpoint, before.id);
    assert.match(done.noReplay ?? '', /without a replay/);
    assert.ok(!env.traffic.calls.some((c) => c.startsWith('replay')), env.traffic.calls.join(', '));
  });

  it('protect and expose start the route log under the container lock: they wait for a checkpoint in progress', async () => {
    const env = await setup();
    const release = env.cluster.agent('node1').hold('checkpoint');
    const checkpointing = env.checkpoints.checkpoint('web');
    while ((await env.record()).lock?.operation !== 'checkpoint') await new Promise((resolve) => setTimeout(resolve, 5));
    const order: string[] = [];
    const protecting = env.checkpoints.protect('web', { everyMs: 5_000 }).then(() => order.push('protect'));
    const exposing = env.checkpoints.startingLog('web', 'expose', async () => order.push('expose'));
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(order.length, 0, 'both wait while the checkpoint holds the lock');
    release();
    await checkpointing.then(() => order.push('checkpoint'));
    await Promise.all([protecting, exposing]);
    assert.equal(order[0], 'checkpoint');
    assert.deepEqual(order.slice(1).sort(), ['expose', 'protect']);
    assert.equal((await env.record()).lock, undefined);
    assert.deepEqual((await env.record()).protection, { everyMs: 5_000 });
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

  it('issue 8 item 3: the source host of a protected container dies mid-migration; it is restored from its checkpoint', async () => {
    const env = await setup(300);
    env.traffic.position = 4;
    const ckpt = await env.checkpoints.checkpoint('web');
    env.traffic.position = 6;
    const releaseRestore = env.cluster.agent('node2').hold('restore');
    const migration = env.migrations.migrate('web', { to: 'node2' });
    await waitFor(async () => env.cluster.callIndex('node2.restore') >= 0 || undefined, 5_000, 'the restore call');
    // node1 dies while node2 fetches: its agent and its page server are gone, its lease ends.
    env.cluster.agent('node1').down = true;
    env.cluster.agent('node1').containers.clear();
    await env.store.delete('/liveness/node1');
    releaseRestore();
    await assert.rejects(migration, (err: Error & { details?: Record<string, unknown> }) => err.details?.rescued === true && /runs on node[23] again/.test(err.message));
    const record = await env.record();
    assert.notEqual(record.node, 'node1');
    assert.equal(record.lock, undefined);
    assert.equal(record.status, 'running');
    assert.equal(env.cluster.runningCopies('web'), 1);
    const [failover] = await env.failovers.list();
    assert.equal(failover.outcome, 'done');
    assert.equal(failover.checkpoint, ckpt.id);
    assert.ok(env.traffic.calls.includes(`replay web after 4 -> ${record.node}`), env.traffic.calls.join(', '));
  });

  it('issue 8 item 4: a checkpoint a crashed controller left locked is released at the next start, and protection goes on', async () => {
    const env = await setup();
    const release = env.cluster.agent('node1').hold('checkpoint');
    void env.checkpoints.checkpoint('web').catch(() => undefined);
    await waitFor(async () => ((await env.record()).lock ? true : undefined), 5_000, 'the checkpoint lock');
    // The controller dies here; a new one starts.
    const next = env.controller();
    await recoverStaleLocks({ locks: next.locks, nodes: env.nodes, agentFor: env.cluster.resolver, traffic: env.traffic, failovers: next.failovers, log: silent });
    assert.equal((await env.record()).lock, undefined, 'the stale lock is gone');
    assert.ok(env.traffic.calls.includes('release web -> node1'), 'the held route is released');
    release();
    const ckpt = await next.checkpoints.checkpoint('web');
    assert.ok(ckpt.id);
    await next.containers.stop('web');
    assert.equal((await env.record()).status, 'stopped');
  });

  it('issue 8 item 4: a failover a crashed controller left after the restore is finished: replayed, then released', async () => {
    const env = await setup();
    env.traffic.position = 2;
    await env.checkpoints.checkpoint('web');
    env.traffic.position = 5;
    env.cluster.agent('node1').containers.clear();
    // The controller dies right before the replay.
    const stopped = new Error('controller killed');
    const replay = env.traffic.replay.bind(env.traffic);
    env.traffic.replay = async () => {
      throw stopped;
    };
    await assert.rejects(env.failovers.failover('web', 'node1'), /controller killed/);
    env.traffic.replay = replay;
    // What a killed controller leaves: the lock (its finally never ran) on the new node.
    const [failover] = await env.failovers.list();
    const to = failover.to!;
    await env.store.put(containerKey('web'), { ...(await env.record()), node: to, lock: { id: failover.lockId!, operation: 'failover', owner: 'controller-dead', since: Date.now() } });
    await env.store.put(`/failovers/${failover.id}`, { ...failover, outcome: 'running' });
    env.traffic.calls.length = 0;
    const next = env.controller();
    await recoverStaleLocks({ locks: next.locks, nodes: env.nodes, agentFor: env.cluster.resolver, traffic: env.traffic, failovers: next.failovers, log: silent });
    assert.deepEqual(env.traffic.calls, [`replay web after 2 -> ${to}`, `release web -> ${to}`], 'replayed before traffic is released');
    assert.equal((await env.record()).lock, undefined);
    assert.equal(env.cluster.runningCopies('web'), 1);
  });

  it('issue 8 item 4: a restore --from cut by a crash, with the container running nowhere, is restored from its newest checkpoint', async () => {
    const env = await setup();
    env.traffic.position = 1;
    const ckpt = await env.checkpoints.checkpoint('web');
    env.cluster.agent('node1').containers.clear();
    await env.store.put(containerKey('web'), { ...(await env.record()), lock: { id: 'restore-dead', operation: 'restore', owner: 'controller-dead', since: Date.now() } });
    const next = env.controller();
    await recoverStaleLocks({ locks: next.locks, nodes: env.nodes, agentFor: env.cluster.resolver, traffic: env.traffic, failovers: next.failovers, log: silent });
    const record = await env.record();
    assert.equal(record.lock, undefined);
    assert.equal(env.cluster.runningCopies('web'), 1);
    assert.equal((await next.failovers.list()).at(-1)?.checkpoint, ckpt.id);
  });

  it('issue 8 item 5: a controller that starts judges no node before agents had a lease to heartbeat, and fails over a node that died while it was down', async () => {
    const env = await setup(400);
    await env.checkpoints.checkpoint('web');
    await env.containers.run({ spec: spec('db'), node: 'node2', protection: { everyMs: 60_000 } });
    await env.checkpoints.checkpoint('db');
    // While no controller ran, every lease ran out; node1 died, node2 and node3 are fine.
    for (const node of ['node1', 'node2', 'node3']) await env.store.delete(`/liveness/${node}`);
    env.cluster.agent('node1').containers.clear();
    const next = env.controller();
    await next.failovers.start();
    const stopBeating = env.keepAlive(['node2', 'node3']);
    try {
      const done = await waitFor(async () => (await next.failovers.list()).find((f) => f.outcome === 'done'), 10_000, 'the failover of web');
      assert.equal(done.name, 'web');
      await new Promise((resolve) => setTimeout(resolve, 500));
      const failovers = await next.failovers.list();
      assert.deepEqual(failovers.map((f) => f.name), ['web'], 'db on the healthy node2 is not failed over');
      assert.equal(env.cluster.runningCopies('web'), 1);
      assert.equal(env.cluster.runningCopies('db'), 1);
    } finally {
      stopBeating();
      next.failovers.stop();
    }
  });

  it('a follower that answered heartbeats for more than a lease before it leads judges dead nodes at once; one just started waits a lease', async () => {
    const env = await setup(2_000);
    await env.checkpoints.checkpoint('web');
    await env.store.delete('/liveness/node1');
    env.cluster.agent('node1').containers.clear();
    const stopBeating = env.keepAlive(['node2', 'node3']);
    const justStarted = env.controller();
    const longFollower = env.controller();
    try {
      await justStarted.failovers.reconcile();
      await justStarted.failovers.start();
      await justStarted.failovers.reconcile();
      assert.deepEqual(await justStarted.failovers.list(), [], 'a controller that listens only now judges nobody yet');
      justStarted.failovers.stop();
      await longFollower.failovers.start(Date.now() - 2_500);
      await longFollower.failovers.reconcile();
      const done = await waitFor(async () => (await longFollower.failovers.list()).find((f) => f.outcome === 'done'), 1_500, 'the failover of web');
      assert.equal(done.name, 'web');
      assert.equal(env.cluster.runningCopies('web'), 1);
    } finally {
      stopBeating();
      justStarted.failovers.stop();
      longFollower.failovers.stop();
    }
  });

  it('a liveness watch the store refuses at start does not stop failover: start() goes on, the periodic pass fails the node over, and the watch is made again (found on the HA cluster)', async () => {
    const env = await setup(400);
    await env.checkpoints.checkpoint('web');
    let watches = 0;
    const realWatch = env.store.watch.bind(env.store);
    env.store.watch = (async (...args: Parameters<typeof env.store.watch>) => {
      watches++;
      if (watches === 1) throw new Error('connect ECONNREFUSED 198.18.0.13:2379');
      return realWatch(...args);
    }) as typeof env.store.watch;
    const next = env.controller();
    await next.failovers.start(Date.now() - 1_000);
    await env.store.delete('/liveness/node1');
    env.cluster.agent('node1').containers.clear();
    const stopBeating = env.keepAlive(['node2', 'node3']);
    try {
      const done = await waitFor(async () => (await next.failovers.list()).find((f) => f.outcome === 'done'), 10_000, 'the failover of web');
      assert.equal(done.name, 'web');
      assert.equal(env.cluster.runningCopies('web'), 1);
      await waitFor(async () => (watches >= 2 ? true : undefined), 2_000, 'the watch made again');
    } finally {
      stopBeating();
      next.failovers.stop();
    }
  });

  it('issue 8 item 6: a failed replay never releases traffic to the new copy; it is retried, and only then released', async () => {
    const env = await setup(400);
    env.traffic.position = 2;
    await env.checkpoints.checkpoint('web');
    env.traffic.position = 6;
    env.cluster.agent('node1').containers.clear();
    const replay = env.traffic.replay.bind(env.traffic);
    let failing = true;
    env.traffic.replay = async (...args: Parameters<typeof replay>) => {
      if (failing) throw new Error('gateway unreachable');
      return replay(...args);
    };
    await assert.rejects(env.failovers.failover('web', 'node1'), /gateway unreachable/);
    const sinceHold = env.traffic.calls.slice(env.traffic.calls.indexOf('holdNow web'));
    assert.ok(!sinceHold.some((c) => c.startsWith('release')), `no release after a failed replay: ${sinceHold.join(', ')}`);
    assert.equal((await env.record()).lock?.operation, 'failover', 'the lock stays: no checkpoint may cut the unreplayed copy');
    assert.equal((await env.failovers.list())[0].replayPending, true);
    assert.equal((await env.store.list('/failover-replays/')).length, 1, 'the owed replay is indexed');
    failing = false;
    const stopBeating = env.keepAlive(['node2', 'node3']);
    await env.failovers.start();
    // The reconcile loop (every half lease) reads the index of owed replays, not every failover record.
    const list = env.store.list.bind(env.store);
    let failoverListings = 0;
    env.store.list = (async (prefix: string) => {
      if (prefix === '/failovers/') failoverListings++;
      return list(prefix);
    }) as typeof env.store.list;
    try {
      // Past the start grace (one lease), the reconcile loop retries the replay.
      await waitFor(async () => ((await env.record()).lock ? undefined : true), 5_000, 'the retried replay');
      assert.equal(failoverListings, 0);
      assert.deepEqual(await list('/failover-replays/'), [], 'the index entry went with the replay owed');
      const to = (await env.record()).node;
      assert.deepEqual(env.traffic.calls.slice(-2), [`replay web after 2 -> ${to}`, `release web -> ${to}`]);
      assert.equal((await env.record()).lock, undefined);
      const [record] = await env.failovers.list();
      assert.equal(record.outcome, 'done');
      assert.equal(record.replayPending, false);
    } finally {
      stopBeating();
      env.failovers.stop();
    }
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

    // Only a checkpoint of an earlier log left: restored, and nothing replayed from a position of
    // another log; the new log began after it (protect starts a log under the container's lock),
    // so the whole new log is replayed.
    const env2 = await setup();
    env2.traffic.position = 3;
    const only = await env2.checkpoints.checkpoint('web');
    env2.traffic.logId = 'log-2';
    env2.traffic.position = 8;
    env2.cluster.agent('node1').containers.clear();
    const fallback = await env2.failovers.failover('web', 'node1');
    assert.equal(fallback.outcome, 'done');
    assert.equal(fallback.checkpoint, only.id);
    assert.deepEqual(fallback.logPosition, { logId: 'log-2', seq: 0 });
    assert.equal(fallback.noReplay, undefined);
    assert.deepEqual(env2.traffic.calls.slice(-2), [`replay web after 0 -> ${fallback.to}`, `release web -> ${fallback.to}`]);
  });

  it('a replay whose new node died is not tried again there: it is owed at once, and its retry restores elsewhere (found by the fault matrix: failover replay target-host)', async () => {
    const env = await setup(400);
    env.traffic.position = 2;
    await env.checkpoints.checkpoint('web');
    env.traffic.position = 6;
    env.cluster.agent('node1').containers.clear();
    env.traffic.replayFailures.push(new UnavailableError('connect EHOSTUNREACH'), new UnavailableError('connect EHOSTUNREACH'), new UnavailableError('connect EHOSTUNREACH'));
    // The node it was restored on dies during the first replay.
    env.traffic.onReplay = async (container) => {
      env.traffic.onReplay = undefined;
      env.cluster.agent(container.node).down = true;
      await env.store.delete(`/liveness/${container.node}`);
    };
    await assert.rejects(env.failovers.failover('web', 'node1'), /EHOSTUNREACH/);
    assert.equal(env.traffic.calls.filter((c) => c.startsWith('replay ')).length, 1, 'one replay, not three into a dead node');
    const [record] = await env.failovers.list();
    assert.equal(record?.replayPending, true);
  });

  it('a replay that may have applied a request twice is not replayed again: that copy goes and the container is restored again, replayed in full', async () => {
    const env = await setup(400);
    env.traffic.position = 2;
    await env.checkpoints.checkpoint('web');
    env.traffic.position = 6;
    env.cluster.agent('node1').containers.clear();
    env.traffic.replayFailures.push(new ChipmunkError('CHIPMUNK_UNAVAILABLE', 'replaying request 4 to web: the connection broke after the request was written', { details: { seq: 4, written: true } }));
    await assert.rejects(env.failovers.failover('web', 'node1'), /connection broke/);
    const [first] = await env.failovers.list();
    assert.equal(first.replayPending, true);
    assert.equal(env.traffic.calls.filter((c) => c.startsWith('replay')).length, 1, 'not replayed again into a copy of unknown state');
    const stopBeating = env.keepAlive(['node2', 'node3']);
    await env.failovers.start();
    try {
      await waitFor(async () => ((await env.record()).lock ? undefined : true), 5_000, 'the second restore');
      const record = await env.record();
      assert.notEqual(record.node, first.to, 'restored again elsewhere');
      assert.equal(env.cluster.runningCopies('web'), 1, 'the uncertain copy is gone');
      assert.deepEqual(env.traffic.calls.slice(-2), [`replay web after 2 -> ${record.node}`, `release web -> ${record.node}`]);
      const again = (await env.failovers.list()).find((f) => f.id !== first.id);
      assert.equal(again?.outcome, 'done');
      assert.match(again?.reason ?? '', /may have applied a request twice/);
    } finally {
      stopBeating();
      env.failovers.stop();
    }
  });

  it('issue 8 item 4: a failover cut by a crash during its restore adopts the copy that restore made: no second copy, replayed, released', async () => {
    const env = await setup();
    env.traffic.position = 2;
    const ckpt = await env.checkpoints.checkpoint('web');
    env.traffic.position = 5;
    env.cluster.agent('node1').containers.clear();
    const container = await env.record();
    // What the killed controller left: its lock, its record naming the restore under way, and the copy that restore made on node2.
    await env.cluster.agent('node2').restore('failover-dead-1', { migrationId: 'failover-dead-1', mode: 'copy', spec: container.spec, generation: 2, source: { node: 'node3', url: 'http://node3' }, checkpoint: { storeUrl: 'http://controller', id: ckpt.id } });
    await env.store.put(containerKey('web'), { ...container, lock: { id: 'failover-dead', operation: 'failover', owner: 'controller-dead', since: Date.now() } });
    await env.store.put('/failovers/failover-dead', {
      id: 'failover-dead', name: 'web', from: 'node1', skipped: [], detectedAt: Date.now(), timings: {}, outcome: 'running', lockId: 'failover-dead',
      attempt: { to: 'node2', checkpoint: ckpt.id, logPosition: ckpt.logPosition, generation: 2 },
    });
    env.traffic.calls.length = 0;
    const next = env.controller();
    await recoverStaleLocks({ locks: next.locks, nodes: env.nodes, agentFor: env.cluster.resolver, traffic: env.traffic, failovers: next.failovers, log: silent });
    assert.equal(env.cluster.runningCopies('web'), 1, 'the copy the restore made is the container: no second one');
    const record = await env.record();
    assert.deepEqual([record.node, record.generation, record.lock], ['node2', 2, undefined]);
    assert.deepEqual(env.traffic.calls, ['replay web after 2 -> node2', 'release web -> node2']);
    assert.deepEqual(await env.fences.forNode('node1'), [{ name: 'web', generation: 2 }]);
  });

  it('a lazy copy that did not get all its memory (its source died mid-transfer) is removed after the commit, and the container restored from its checkpoint (found by the fault matrix)', async () => {
    const env = await setup();
    env.traffic.position = 2;
    await env.checkpoints.checkpoint('web');
    env.traffic.position = 5;
    env.cluster.agent('node2').lazyPagesFailure = 'the lazy-pages daemon ended with code 1';
    await assert.rejects(env.migrations.migrate('web', { to: 'node2', mode: 'lazy' }), (err: ChipmunkError) => err.details.rescued === true && /did not get all of its memory from node1/.test(err.message));
    const record = await env.record();
    assert.notEqual(record.node, 'node2');
    assert.equal(record.lock, undefined);
    assert.equal(env.cluster.agent('node2').containers.has('web'), false, 'the incomplete copy is gone');
    assert.equal(env.cluster.runningCopies('web'), 1);
    assert.deepEqual(env.traffic.calls.slice(-2), [`replay web after 2 -> ${record.node}`, `release web -> ${record.node}`]);
    const [failover] = await env.failovers.list();
    assert.match(failover.reason ?? '', /did not get all of its memory/);
    assert.equal((await env.migrations.list())[0].phase, 'failed');
  });

  it('an unprotected lazy copy that did not get all its memory is lost, said so, and its copy removed', async () => {
    const env = await setup();
    await env.checkpoints.unprotect('web');
    env.cluster.agent('node2').lazyPagesFailure = 'the lazy-pages daemon ended with code 1';
    await assert.rejects(env.migrations.migrate('web', { to: 'node2', mode: 'lazy' }), /is lost: .*did not get all of its memory/);
    const record = await env.record();
    assert.deepEqual([record.status, record.lock], ['lost', undefined]);
    assert.equal(env.cluster.runningCopies('web'), 0);
    assert.deepEqual((await env.fences.forNode('node1')).map((f) => f.name), ['web'], "the source's dumped incarnation goes when its node answers");
  });

  it('a target whose agent dies during the restore gets the same checkpoint restored on the next node, and is fenced (found by the fault matrix)', async () => {
    const env = await setup();
    env.traffic.position = 2;
    await env.checkpoints.checkpoint('web');
    env.cluster.agent('node1').containers.clear();
    env.cluster.agent('node2').failNext('restore', new UnavailableError('agent node2 is unreachable at http://10.0.0.2:7070 (UND_ERR_SOCKET)'));
    const done = await env.failovers.failover('web', 'node1');
    assert.equal(done.outcome, 'done');
    assert.ok(env.cluster.callIndex('node2.restore') >= 0 && env.cluster.callIndex('node2.restore') < env.cluster.callIndex('node3.restore'), 'node2 was tried first');
    assert.equal((await env.record()).node, 'node3');
    assert.equal(env.cluster.runningCopies('web'), 1);
    assert.deepEqual(env.traffic.calls.slice(-2), ['replay web after 2 -> node3', 'release web -> node3']);
    assert.deepEqual(await env.fences.forNode('node2'), [{ name: 'web', generation: (await env.record()).generation }], 'a copy the cut-short restore may have left on node2 goes');
  });

  it('a target that refuses the restore (it still has a copy of that name) gets the same checkpoint restored on the next node, not the checkpoint passed over', async () => {
    const env = await setup();
    env.traffic.position = 2;
    await env.checkpoints.checkpoint('web');
    env.cluster.agent('node1').containers.clear();
    env.cluster.agent('node2').failNext('restore', new ConflictError("node node2 already has a container named 'web'", { name: 'web' }));
    const done = await env.failovers.failover('web', 'node1');
    assert.equal(done.outcome, 'done');
    assert.equal(done.checkpoint, '0000000000000001', 'the only checkpoint was used');
    assert.equal((await env.record()).node, 'node3');
    assert.equal(env.cluster.runningCopies('web'), 1);
  });

  it('a container whose failover failed is restored once its node is back without it (its host restarted) (found by the fault matrix)', async () => {
    const env = await setup(400);
    env.traffic.position = 2;
    await env.checkpoints.checkpoint('web');
    env.cluster.agent('node1').containers.clear();
    for (const node of ['node2', 'node3']) env.cluster.agent(node).failNext('restore', new UnavailableError(`agent ${node} is unreachable (ECONNREFUSED)`));
    await assert.rejects(env.failovers.failover('web', 'node1'), /no checkpoint of web could be restored/);
    assert.equal((await env.record()).node, 'node1');
    // node1 heartbeats again: its host restarted, the container is gone from it.
    const stopBeating = env.keepAlive(['node1', 'node2', 'node3']);
    await env.failovers.start();
    try {
      await waitFor(async () => ((await env.record()).node !== 'node1' && !(await env.record()).lock ? true : undefined), 5_000, 'the owed failover');
      assert.equal(env.cluster.runningCopies('web'), 1);
      const record = await env.record();
      assert.deepEqual(env.traffic.calls.slice(-2), [`replay web after 2 -> ${record.node}`, `release web -> ${record.node}`]);
      assert.deepEqual(await env.fences.forNode('node1'), [{ name: 'web', generation: record.generation }]);
      assert.deepEqual(await env.store.list('/failover-owed/'), []);
    } finally {
      stopBeating();
      env.failovers.stop();
    }
  });

  it('a failover that failed while its node was only cut off is not owed once the node is back running the container', async () => {
    const env = await setup(400);
    env.traffic.position = 2;
    await env.checkpoints.checkpoint('web');
    for (const node of ['node2', 'node3']) env.cluster.agent(node).failNext('restore', new UnavailableError(`agent ${node} is unreachable (ECONNREFUSED)`));
    await assert.rejects(env.failovers.failover('web', 'node1'), /no checkpoint of web could be restored/);
    const stopBeating = env.keepAlive(['node1', 'node2', 'node3']);
    await env.failovers.start();
    try {
      await waitFor(async () => ((await env.store.list('/failover-owed/')).length === 0 ? true : undefined), 5_000, 'the owed entry dropped');
      const record = await env.record();
      assert.deepEqual([record.node, record.lock, env.cluster.runningCopies('web')], ['node1', undefined, 1]);
    } finally {
      stopBeating();
      env.failovers.stop();
    }
  });

  it('a failover whose new node dies during the replay and comes back without the copy restores the container again (found by the fault matrix: the retry waited for itself)', async () => {
    const { env, first } = await failedOverWithReplayOwed();
    // The node it was restored on was killed and revived: it heartbeats, and has no copy any more.
    env.cluster.agent(first.to!).containers.clear();
    const stopBeating = env.keepAlive(['node2', 'node3']);
    await env.failovers.start();
    try {
      await waitFor(async () => ((await env.record()).lock ? undefined : true), 8_000, 'the restore again');
      const record = await env.record();
      assert.equal(env.cluster.runningCopies('web'), 1);
      assert.deepEqual(env.traffic.calls.slice(-2), [`replay web after 2 -> ${record.node}`, `release web -> ${record.node}`]);
      const again = (await env.failovers.list()).find((f) => f.id !== first.id);
      assert.equal(again?.outcome, 'done');
      assert.match(again?.reason ?? '', /no longer runs/);
    } finally {
      stopBeating();
      env.failovers.stop();
    }
  });

  it('a failover whose new node dies before the replay restores the container again elsewhere (found by the fault matrix)', async () => {
    const { env, first } = await failedOverWithReplayOwed();
    const dead = first.to!;
    const alive = ['node2', 'node3'].find((n) => n !== dead)!;
    // The node it was restored on dies too: only `alive` keeps heartbeating.
    env.cluster.agent(dead).containers.clear();
    env.cluster.agent(dead).down = true;
    await env.store.delete(`/liveness/${dead}`);
    const stopBeating = env.keepAlive([alive]);
    await env.failovers.start();
    try {
      await waitFor(async () => ((await env.record()).lock ? undefined : true), 8_000, 'the second restore');
      const record = await env.record();
      assert.equal(record.node, alive);
      assert.equal(env.cluster.runningCopies('web'), 1);
      assert.deepEqual(env.traffic.calls.slice(-2), [`replay web after 2 -> ${alive}`, `release web -> ${alive}`]);
    } finally {
      stopBeating();
      env.failovers.stop();
    }
  });

  it('a failover whose new node dies during the replay, with both dead nodes back holding stopped copies, restores the container on the node that stayed up (found by the fault matrix: failover replay target-host)', async () => {
    const { env, first } = await failedOverWithReplayOwed();
    const dead = first.to!;
    const alive = ['node2', 'node3'].find((n) => n !== dead)!;
    // Both hosts were killed and revived: their agents still list the copies they ran, stopped.
    for (const node of ['node1', dead]) {
      const stale = { ...(await env.cluster.agent(dead).get('web')), status: 'stopped' as const, generation: node === 'node1' ? 0 : first.attempt!.generation };
      env.cluster.agent(node).containers.set('web', stale);
    }
    const stopBeating = env.keepAlive(['node1', 'node2', 'node3']);
    await env.failovers.start();
    try {
      await waitFor(async () => ((await env.record()).lock ? undefined : true), 8_000, 'the restore again');
      const record = await env.record();
      assert.equal(env.cluster.runningCopies('web'), 1);
      assert.equal(env.cluster.agent(record.node).containers.get('web')?.status, 'running');
      assert.deepEqual(env.traffic.calls.slice(-2), [`replay web after 2 -> ${record.node}`, `release web -> ${record.node}`]);
      assert.equal(record.node, alive, 'not on a node that still held a stale copy');
    } finally {
      stopBeating();
      env.failovers.stop();
    }
  });
});

/**
 * node1 died after a checkpoint at log position 2 (6 requests logged since): the failover restored
 * web elsewhere, and every replay attempt failed, so the replay is owed. Returns that failover.
 */
async function failedOverWithReplayOwed() {
  const env = await setup(400);
  env.traffic.position = 2;
  await env.checkpoints.checkpoint('web');
  env.traffic.position = 6;
  env.cluster.agent('node1').containers.clear();
  env.traffic.replayFailures.push(new Error('upstream unreachable'), new Error('upstream unreachable'), new Error('upstream unreachable'));
  await assert.rejects(env.failovers.failover('web', 'node1'), /upstream unreachable/);
  const [first] = await env.failovers.list();
  return { env, first: first! };
}
