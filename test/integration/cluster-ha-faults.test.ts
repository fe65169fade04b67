/**
 * The leading controller lost in the middle of its work, on `chipmunk cluster up --ha` (an etcd
 * member, a controller and an agent on each of 3 test hosts) with real processes: its host is
 * killed (every process of it: etcd member, controller, agent, containers) while it is paused at
 * a step of a migration, a checkpoint or a failover (test/support/pauses.ts), or it is cut off from
 * etcd inside its test host (iptables). Then the other losses of part of the control plane: a
 * checkpoint replica's host with the container on it (the failover reads the other replica), and
 * one etcd member alone (nothing stops). Each time a client writes nonstop through the gateway, and
 * then: exactly one running copy (runc on every node), the controller's record agrees, and every
 * acknowledged write is there (a failed request may or may not have been applied).
 *
 * One cluster for the whole file; a killed host is revived at the end of its test. 3 nodes keep
 * an etcd majority through one dead host only: the failover test revives the container's host
 * before it kills the leader's.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { request } from 'undici';

import { clusterKill, clusterRevive } from '../../src/cluster/index.js';
import { ETCD_CLIENT_PORT, etcdStoreSpec, haControllerUrl, spawnNodeEtcd } from '../../src/cluster/ha.js';
import { readClusterState, writeClusterState } from '../../src/cluster/state.js';
import { netnsPath } from '../../src/cluster/testhost.js';
import { openStore } from '../../src/controller/store/index.js';
import { FencedStore } from '../../src/controller/store/fenced.js';
import { NotLeaderError } from '../../src/shared/errors.js';
import { TERM_HEADER } from '../../src/shared/term-fence.js';
import { steadyIncrements } from '../support/clients.js';
import { counterFailures, structuralFailures } from '../support/fault-checks.js';
import { setUp, tearDown } from '../support/fault-cells.js';
import { cli, clusterStateDir, controllerClient, http, leadingController, localCluster, runningCopies, startLocalCluster, stopLocalCluster, waitFor } from '../support/local-cluster.js';
import { armPause, haController, resumePause, waitForPause } from '../support/pauses.js';

const execFileP = promisify(execFile);
const NODE_LEASE_MS = 1_000;
/** The controllers' leader lease (`cluster up` default): a leader cut off stops within it. */
const LEADER_LEASE_MS = 2_000;
const AGENT_PORT = 7401;
const MEMORY_MB = 16;
/** From a kill to everything settled (new leader, operation finished or undone, one copy). */
const SETTLE_MS = 45_000;

before(async () => {
  await startLocalCluster(3, { ha: true, nodeLeaseMs: NODE_LEASE_MS });
}, { timeout: 300_000 });

after(async () => {
  if (process.env.CHIPMUNK_KEEP_CLUSTER === '1') return;
  await stopLocalCluster();
}, { timeout: 120_000 });

function log(line: string): void {
  console.log(`# ${line}`);
}

/** The leader (waits out an election), and the other nodes. */
async function roles(): Promise<{ leader: string; term: number; others: [string, string] }> {
  const leader = await waitFor(() => leadingController().catch(() => undefined), 30_000, 'a leading controller');
  const others = localCluster().nodes.filter((n) => n !== leader.node);
  assert.equal(others.length, 2);
  return { leader: leader.node, term: leader.term, others: others as [string, string] };
}

/** After a host was killed: another controller leads, under a newer term. */
async function newLeader(old: { leader: string; term: number }, killedAt: number): Promise<{ node: string; term: number; afterMs: number }> {
  const now = await waitFor(async () => {
    const seen = await leadingController().catch(() => undefined);
    return seen && seen.node !== old.leader ? seen : undefined;
  }, 30_000, `a controller other than ${old.leader}'s to lead`);
  assert.ok(now.term > old.term, `the new term ${now.term} is above the old ${old.term}`);
  return { node: now.node, term: now.term, afterMs: Date.now() - killedAt };
}

/**
 * Everything up again: every etcd member healthy (the next test kills a host: a member still
 * catching up would leave etcd without a majority), every node ready, a controller on each, one
 * of them leading.
 */
async function clusterWhole(): Promise<void> {
  const nodes = localCluster().nodes;
  await waitFor(async () => (await Promise.all(nodes.map(etcdHealthy))).every(Boolean), 30_000, 'every etcd member healthy');
  await waitFor(async () => {
    const client = controllerClient();
    const [views, controllers] = await Promise.all([client.nodes(), client.controllers()]);
    return (
      nodes.every((n) => views.find((v) => v.name === n)?.status === 'ready') &&
      nodes.every((n) => controllers.some((c) => c.node === n)) &&
      controllers.filter((c) => c.leader).length === 1
    );
  }, 60_000, 'every node ready with its controller, one leading');
}

async function revive(node: string): Promise<void> {
  await clusterRevive(node, { stateDir: clusterStateDir() });
}

/** SIGKILL of every process of NODE's test host; DOWN remembers it for reviving. Returns when it died. */
async function killHost(node: string, down: Set<string>): Promise<number> {
  const { killedAt } = await clusterKill(node, { stateDir: clusterStateDir() });
  down.add(node);
  return killedAt;
}

/** Cleanup after a test, whatever happened: the pause let go, dead hosts back. */
async function restoreHosts(pausedOn: string, down: Set<string>): Promise<void> {
  await resumePause(pausedOn);
  for (const node of down) await revive(node);
  down.clear();
}

/** The structural invariants hold (one copy, the record agrees, route open, answers), within SETTLE_MS. */
async function settled(name: string, port: number): Promise<string> {
  let last: string[] = [];
  const found = await waitFor(async () => {
    const result = await structuralFailures(name, port);
    last = result.failures;
    return result.failures.length === 0 ? result.copy : undefined;
  }, SETTLE_MS, `${name} settled`).catch((err: Error) => {
    throw new Error(`${err.message}: ${last.join('; ')}`);
  });
  return found.node;
}

/** Still exactly one copy, on NODE, once the client stopped (the settle was not a passing moment). */
async function stillOneCopy(name: string, node: string): Promise<void> {
  assert.deepEqual((await runningCopies(name)).map((c) => c.node), [node], `one running copy of ${name}, on ${node}`);
}

/** Stops the client; then counter within [acknowledged, acknowledged + failed], and the app's file agrees. */
async function noWriteLost(client: ReturnType<typeof steadyIncrements>, port: number): Promise<{ ok: number; failed: number }> {
  const stats = await Promise.race([client.stop(), sleep(30_000).then(() => undefined)]);
  assert.ok(stats, 'the client got an answer to every request within 30 s after the settle');
  assert.ok(stats.ok > 0, 'some writes were acknowledged');
  const { failures } = await counterFailures(port, stats.ok, stats.failed);
  assert.deepEqual(failures, [], `no acknowledged write lost (${stats.ok} acknowledged, ${stats.failed} failed: ${stats.errors.slice(0, 3).join(' | ')})`);
  return { ok: stats.ok, failed: stats.failed };
}

/** One protected app on NODE behind the gateway at PORT, a client writing nonstop. */
async function protectedApp(name: string, node: string, port: number) {
  await setUp(name, node, port, MEMORY_MB);
  const client = steadyIncrements(`http://127.0.0.1:${port}`, 1, 240_000);
  await waitFor(() => client.stats.ok > 5, 15_000, `${name} acknowledging writes`);
  return client;
}

test("the leader's host dies while a migration on other nodes is paused at transfer: the new leader settles it, one copy, no write lost", { timeout: 180_000 }, async () => {
  const old = await roles();
  const [source, target] = old.others;
  const name = 'hf-mig';
  const port = 28101;
  const client = await protectedApp(name, source, port);
  const pausedOn = haController(old.leader);
  const down = new Set<string>();
  try {
    await armPause(pausedOn, 'migration:transfer');
    const migrate = cli(['migrate', name, '--to', target], { timeoutMs: 120_000 });
    await waitForPause([pausedOn], 45_000, `migration:transfer on ${old.leader}'s controller`);
    const killedAt = await killHost(old.leader, down);
    const now = await newLeader(old, killedAt);

    const node = await settled(name, port);
    const migration = await waitFor(async () => {
      const record = (await controllerClient().migrations()).filter((m) => m.name === name).sort((a, b) => b.startedAt - a.startedAt)[0];
      return record && (record.phase === 'done' || record.phase === 'failed') && !record.cleanupPending ? record : undefined;
    }, SETTLE_MS, `the migration of ${name} settled`);
    assert.equal(node, migration.phase === 'done' ? target : source, `the copy runs where the migration's outcome (${migration.phase}) says`);
    const ended = await Promise.race([migrate, sleep(10_000).then(() => undefined)]);
    assert.ok(ended, 'the migrate command ended');
    const counts = await noWriteLost(client, port);
    await stillOneCopy(name, node);
    log(`migration: leader ${old.leader} -> ${now.node} in ${now.afterMs} ms; migration ${migration.phase}, ${name} on ${node}; ${counts.ok} acknowledged, ${counts.failed} failed`);
  } finally {
    await client.stop();
    await restoreHosts(pausedOn, down);
    await tearDown(name, 30_000);
  }
  await clusterWhole();
});

test("the leader's host dies while a checkpoint is paused at upload: the new leader frees the lock and protection goes on", { timeout: 180_000 }, async () => {
  const old = await roles();
  const name = 'hf-ckpt';
  const port = 28102;
  const client = await protectedApp(name, old.others[0], port);
  const pausedOn = haController(old.leader);
  const down = new Set<string>();
  try {
    await armPause(pausedOn, 'checkpoint:upload');
    await waitForPause([pausedOn], 20_000, `checkpoint:upload on ${old.leader}'s controller`);
    const killedAt = await killHost(old.leader, down);
    const now = await newLeader(old, killedAt);

    // Checkpoints every 2 s: the lock the dead leader held must not stop the next ones.
    const next = await waitFor(async () => {
      const list = await controllerClient().checkpoints(name);
      return list.find((c) => c.time > killedAt);
    }, 20_000, `a checkpoint of ${name} taken after the kill`);
    const nextMs = Date.now() - killedAt;
    assert.ok((next.replicas ?? []).length >= 2, `the new checkpoint is on 2 replicas: ${JSON.stringify(next.replicas)}`);
    const node = await settled(name, port);
    const counts = await noWriteLost(client, port);
    await stillOneCopy(name, node);
    log(`checkpoint: leader ${old.leader} -> ${now.node} in ${now.afterMs} ms; next checkpoint listed ${nextMs} ms after the kill; ${counts.ok} acknowledged, ${counts.failed} failed`);
  } finally {
    await client.stop();
    await restoreHosts(pausedOn, down);
    await tearDown(name, 30_000);
  }
  await clusterWhole();
});

test("the leader's host dies during a failover (paused at replay): the new leader finishes it, one copy, no write lost", { timeout: 180_000 }, async () => {
  const old = await roles();
  const host = old.others[0];
  const name = 'hf-fo';
  const port = 28103;
  const client = await protectedApp(name, host, port);
  const pausedOn = haController(old.leader);
  const down = new Set<string>();
  try {
    await armPause(pausedOn, 'failover:replay');
    const lostAt = await killHost(host, down);
    await waitForPause([pausedOn], 30_000, `failover:replay on ${old.leader}'s controller`);
    // Two hosts down at once would take etcd's majority: the container's host returns first (its
    // etcd member back in the cluster), then the leader's goes.
    await revive(host);
    down.delete(host);
    await waitFor(() => etcdHealthy(host), 30_000, `${host}'s etcd member healthy again`);
    const killedAt = await killHost(old.leader, down);
    const now = await newLeader(old, killedAt);

    const node = await settled(name, port);
    const backMs = Date.now() - lostAt;
    // The interrupted failover is finished (its copy runs: replayed, released), or, if its copy
    // died with the leader's host, ends failed and a new one restores the container: none is left running.
    const failovers = await waitFor(async () => {
      const records = (await controllerClient().failovers()).filter((f) => f.name === name).sort((a, b) => b.detectedAt - a.detectedAt);
      return records.length > 0 && records.every((f) => f.outcome !== 'running') ? records : undefined;
    }, SETTLE_MS, `every failover of ${name} ended`);
    const failover = failovers[0]!;
    assert.equal(failover.outcome, 'done', `the last failover ended ${failover.outcome}: ${JSON.stringify(failover)}`);
    assert.equal(failover.to, node, 'the record names where the copy runs');
    const counts = await noWriteLost(client, port);
    await stillOneCopy(name, node);
    log(
      `failover: ${host} killed, leader ${old.leader} -> ${now.node} in ${now.afterMs} ms; ${name} settled on ${node} ${backMs} ms after its host died ` +
        `(${failovers.length} failover records, the last replayed ${failover.replayed ?? 0}); ${counts.ok} acknowledged, ${counts.failed} failed`,
    );
  } finally {
    await client.stop();
    await restoreHosts(pausedOn, down);
    await tearDown(name, 30_000);
  }
  await clusterWhole();
});

test('the leader cut off from etcd inside its test host: it stops acting within its lease, another leads, its term is refused; back, it follows', { timeout: 180_000 }, async () => {
  const old = await roles();
  const name = 'hf-cut';
  const port = 28104;
  // On the leader's own host: its agent and container must not notice the control plane's trouble.
  const client = await protectedApp(name, old.leader, port);
  const [copyBefore] = await runningCopies(name);
  const reachable = old.others.map((n) => haControllerUrl(localCluster().address(n)));
  const store = await openStore(etcdStoreSpec(localCluster().state.nodes));
  let cut = false;
  try {
    const campaign = (await store.list('/election/controller/')).find((kv) => kv.createRevision === old.term);
    assert.ok(campaign, `the leader's campaign key (term ${old.term}) is in etcd`);
    const underOldTerm = new FencedStore(store, () => ({ key: campaign.key, modRevision: old.term }));
    const probe = '/fence-probe/old-term';
    await underOldTerm.put(probe, { by: old.leader }); // goes through while the term stands
    await store.delete(probe);
    await cutFromEtcd(old.leader);
    cut = true;
    const cutAt = Date.now();

    // Its own API says at once that it does not lead: it answers a mutation with NOT_LEADER, not by acting.
    const stoppedMs = await stopsLeading(old.leader, cutAt, 10_000);
    assert.ok(stoppedMs < LEADER_LEASE_MS + 500, `it stopped leading ${stoppedMs} ms after the cut, within its ${LEADER_LEASE_MS} ms lease`);
    const now = await waitFor(async () => {
      const seen = await leadingController(reachable).catch(() => undefined);
      return seen && seen.node !== old.leader ? seen : undefined;
    }, 20_000, 'another controller to lead');
    const ledMs = Date.now() - cutAt;
    assert.ok(now.term > old.term);
    const controllers = await controllerClient(reachable).controllers();
    assert.equal(controllers.filter((c) => c.leader).length, 1, 'one leader');

    // A write under the old term is refused by etcd, and a call carrying it by the agents.
    await assert.rejects(underOldTerm.put(probe, { by: old.leader }), (err: unknown) => err instanceof NotLeaderError, 'a store write fenced by the old term is refused');
    assert.equal(await store.get(probe), undefined, 'and wrote nothing');
    await waitFor(async () => (await agentAnswer(old.leader, old.term)) === 'CHIPMUNK_STALE_TERM', 15_000, `${old.leader}'s agent to refuse a command under the old term ${old.term}`);
    assert.equal(await agentAnswer(old.leader, now.term), 'CHIPMUNK_NOT_FOUND', 'the new term is let through (to the agent, which has no such container)');

    // The container served on: same incarnation, on its node, still acknowledging writes.
    const okAt = client.stats.ok;
    await waitFor(() => client.stats.ok > okAt + 5, 15_000, `${name} acknowledging writes while its host's controller is cut off`);
    assert.deepEqual(await runningCopies(name), [copyBefore], 'the same single copy runs (no failover, no second copy)');
    const record = (await controllerClient(reachable).containers()).find((c) => c.name === name);
    assert.equal(record?.node, old.leader);
    assert.equal(record?.status, 'running');

    await restoreEtcd(old.leader);
    cut = false;
    await waitFor(async () => {
      const all = await controllerClient(reachable).controllers();
      return all.some((c) => c.node === old.leader && !c.leader) && all.find((c) => c.leader)?.node === now.node;
    }, 30_000, `${old.leader}'s controller back as a follower`);
    await settled(name, port);
    const counts = await noWriteLost(client, port);
    await stillOneCopy(name, old.leader);
    log(`cut off: ${old.leader} stopped leading ${stoppedMs} ms after the cut, ${now.node} led after ${ledMs} ms (term ${old.term} -> ${now.term}); ${counts.ok} acknowledged, ${counts.failed} failed`);
  } finally {
    await client.stop();
    if (cut) await restoreEtcd(old.leader).catch(() => undefined);
    await store.close();
    await tearDown(name, 30_000);
  }
  await clusterWhole();
});

test("a checkpoint replica's host dies with the container on it: the failover restores from the other replica, one copy, no write lost", { timeout: 180_000 }, async () => {
  const old = await roles();
  const url = (node: string) => haControllerUrl(localCluster().address(node));
  // The leader commits each checkpoint on its own store and the first other active one that
  // answers, in the controllers' campaign order (as `checkpoint-replicas` lists them): the
  // container's host is that one, so it holds a replica.
  const replicaSet = await controllerClient().checkpointReplicas();
  const host = replicaSet.find((r) => r.status === 'active' && r.reachable && r.node !== undefined && r.node !== old.leader)?.node;
  assert.ok(host, `a replica on a node other than the leader ${old.leader}: ${JSON.stringify(replicaSet)}`);
  const name = 'hf-replica';
  const port = 28105;
  const client = await protectedApp(name, host, port);
  const down = new Set<string>();
  try {
    const newest = await waitFor(async () => (await controllerClient().checkpoints(name))[0], 10_000, `a checkpoint of ${name}`);
    const replicas = (newest.replicas ?? []).map((r) => r.url).sort();
    assert.deepEqual(replicas, [url(old.leader), url(host)].sort(), `the newest checkpoint is on the leader's replica and on ${host}'s, the container's host`);
    const lostAt = await killHost(host, down);

    const node = await settled(name, port);
    const backMs = Date.now() - lostAt;
    const failover = await waitFor(async () => {
      const records = (await controllerClient().failovers()).filter((f) => f.name === name && f.outcome !== 'running');
      return records.sort((a, b) => b.detectedAt - a.detectedAt)[0];
    }, SETTLE_MS, `the failover of ${name} ended`);
    assert.equal(failover.outcome, 'done', `the failover ended ${failover.outcome}: ${JSON.stringify(failover)}`);
    assert.equal(failover.to, node, 'the record names where the copy runs');
    assert.deepEqual(failover.readFrom, [url(old.leader)], `the restore read the checkpoint from the replica left (the leader's), not from ${host}'s`);
    const restored = (await controllerClient().checkpoints(name)).find((c) => c.id === failover.checkpoint);
    assert.ok(restored?.replicas?.some((r) => r.url === url(host)), `it restored a checkpoint ${host}'s replica also held: ${JSON.stringify(restored)}`);
    const counts = await noWriteLost(client, port);
    await stillOneCopy(name, node);
    log(`replica host: ${host} killed (container and a replica on it), ${name} back on ${node} ${backMs} ms later from ${failover.readFrom?.join(', ')}; ${counts.ok} acknowledged, ${counts.failed} failed`);
  } finally {
    await client.stop();
    for (const node of down) await revive(node);
    await tearDown(name, 30_000);
  }
  await clusterWhole();
});

test("one etcd member killed (the leader's host's own): nothing stops, same leader and term, checkpoints go on, no node failed over", { timeout: 120_000 }, async () => {
  const old = await roles();
  // As it stands now: a revived host's etcd member has a new pid.
  const state = (await readClusterState(clusterStateDir()))!;
  const member = state.nodes.find((n) => n.name === old.leader)!;
  const respawn = async () => {
    await spawnNodeEtcd(state, member, clusterStateDir());
    await writeClusterState(clusterStateDir(), state);
  };
  const name = 'hf-etcd';
  const port = 28106;
  const client = await protectedApp(name, old.others[0], port);
  const [copyBefore] = await runningCopies(name);
  const failoversBefore = (await controllerClient().failovers()).length;
  let memberDown = false;
  try {
    process.kill(member.etcdPid!, 'SIGKILL');
    memberDown = true;
    const killedAt = Date.now();
    const failedAt = client.stats.failed;
    // Two leases and more: a node whose heartbeats stopped reaching etcd would have been judged dead by now.
    await sleep(4 * NODE_LEASE_MS + LEADER_LEASE_MS);
    const next = await waitFor(async () => (await controllerClient().checkpoints(name)).find((c) => c.time > killedAt), 20_000, `a checkpoint of ${name} taken after the kill`);
    assert.ok((next.replicas ?? []).length >= 2, `on 2 replicas: ${JSON.stringify(next.replicas)}`);
    const now = await roles();
    assert.deepEqual([now.leader, now.term], [old.leader, old.term], 'the same controller leads under the same term');
    const views = await controllerClient().nodes();
    assert.deepEqual(views.map((v) => v.status), views.map(() => 'ready'), 'every node stayed ready');
    assert.equal((await controllerClient().failovers()).length, failoversBefore, 'no failover');
    assert.deepEqual(await runningCopies(name), [copyBefore], 'the same single copy runs');
    assert.equal(client.stats.failed, failedAt, 'no request failed');
    log(`etcd member ${old.leader} killed: ${old.leader} led on under term ${old.term}; next checkpoint ${next.time - killedAt} ms after the kill`);

    await respawn();
    memberDown = false;
    const counts = await noWriteLost(client, port);
    await stillOneCopy(name, copyBefore!.node);
    log(`etcd member: ${counts.ok} acknowledged, ${counts.failed} failed`);
  } finally {
    await client.stop();
    if (memberDown) await respawn();
    await tearDown(name, 30_000);
  }
  await clusterWhole();
});

/** Drops, inside NODE's test host, every packet its processes send to an etcd client port: its controller's line to etcd. */
const CUT_RULE = ['OUTPUT', '-p', 'tcp', '--dport', String(ETCD_CLIENT_PORT), '-j', 'DROP'];

async function iptables(node: string, args: string[]): Promise<void> {
  const netns = localCluster().state.nodes.find((n) => n.name === node)!.netns;
  await execFileP('nsenter', [`--net=${netnsPath(netns)}`, 'iptables', ...args]);
}

async function cutFromEtcd(node: string): Promise<void> {
  await iptables(node, ['-I', ...CUT_RULE]);
}

async function restoreEtcd(node: string): Promise<void> {
  await iptables(node, ['-D', ...CUT_RULE]);
}

async function etcdHealthy(node: string): Promise<boolean> {
  const res = await request(`http://${localCluster().address(node)}:${ETCD_CLIENT_PORT}/health`, { headersTimeout: 2_000, bodyTimeout: 2_000 }).catch(() => undefined);
  if (!res) return false;
  return ((await res.body.json().catch(() => ({}))) as { health?: string }).health === 'true';
}

/** What NODE's controller answers to a mutation sent to it directly (a checkpoint of a container that does not exist): its error code. */
async function mutationAnswer(node: string): Promise<string> {
  const res = await http<{ code?: string }>(node, 7400, '/v1/containers/hf-none/checkpoint', 'POST', { token: localCluster().token, body: {}, timeoutMs: 1_000 }).catch(() => undefined);
  return res?.body?.code ?? (res ? `HTTP ${res.status}` : 'no answer');
}

/**
 * When NODE's controller first answered a mutation with NOT_LEADER (ms after SINCE). Asked every
 * 100 ms without waiting for earlier answers: until it steps down, a mutation waits on its store.
 */
function stopsLeading(node: string, since: number, timeoutMs: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const poll = setInterval(() => {
      void mutationAnswer(node).then((code) => {
        if (code !== 'CHIPMUNK_NOT_LEADER') return;
        clearInterval(poll);
        clearTimeout(deadline);
        resolve(Date.now() - since);
      });
    }, 100);
    const deadline = setTimeout(() => {
      clearInterval(poll);
      reject(new Error(`${node}'s controller still acts as the leader ${timeoutMs} ms after it was cut off from etcd`));
    }, timeoutMs);
  });
}

/**
 * What NODE's agent answers to a command that carries TERM (a stop of a container it does not
 * have, so a let-through one changes nothing): 'ok' or its error code. Reads are answered
 * whatever their term (term-fence.ts): only commands are fenced.
 */
async function agentAnswer(node: string, term: number): Promise<string> {
  const res = await http<{ code?: string }>(node, AGENT_PORT, '/v1/containers/hf-none/stop', 'POST', { token: localCluster().token, headers: { [TERM_HEADER]: String(term) } });
  return res.status === 200 ? 'ok' : (res.body?.code ?? `HTTP ${res.status}`);
}
