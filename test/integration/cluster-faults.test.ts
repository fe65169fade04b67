/**
 * `chipmunk cluster kill|revive`: power loss on one test host and its return, a crash and restart
 * of the controller or the gateway. (Failover tests and the fault harness use these; here: that
 * they do what they say.)
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { request as undiciRequest } from 'undici';
import { readClusterState } from '../../src/cluster/index.js';
import { clusterStateDir, cliFails, cliOk, http, ps, runcList, startLocalCluster, stopLocalCluster, waitFor } from '../support/local-cluster.js';

before(async () => {
  await startLocalCluster(2);
}, { timeout: 300_000 });

after(async () => {
  await stopLocalCluster();
}, { timeout: 120_000 });

test('kill takes every process of a test host down at once; revive brings its agent back', { timeout: 120_000 }, async () => {
  await cliOk(['run', '--name', 'victim', '--node', 'node1', '-e', 'MEMORY_MB=8', 'chipmunk/statefulapp']);
  await waitFor(async () => (await runcList('node1')).some((c) => c.status === 'running'), 30_000, 'victim running');
  // `chipmunk stats` reads the container's cgroups through its node's agent.
  const stats = await waitFor(async () => {
    const s = await cliOk<{ memoryBytes: number; cpuUsageNs: number; pids: number }>(['stats', 'victim']);
    return s.memoryBytes > 8 * 2 ** 20 ? s : undefined;
  }, 30_000, 'the app touched its 8 MB');
  assert.ok(stats.cpuUsageNs > 0 && stats.pids >= 1);
  assert.equal((await cliFails(['stats', 'nosuch'])).error.code, 'CHIPMUNK_NOT_FOUND');

  const killed = await cliOk<{ node: string; killedPids: number[] }>(['cluster', 'kill', 'node1']);
  assert.equal(killed.node, 'node1');
  assert.ok(killed.killedPids.length >= 2, `agent and container killed (${killed.killedPids.join(', ')})`);
  await assert.rejects(http('node1', 7401, '/healthz', 'GET', { timeoutMs: 1_000 }), 'the agent is gone');
  assert.ok((await runcList('node1')).every((c) => c.status !== 'running'), 'no container of node1 runs');
  assert.equal((await http('node2', 7401, '/healthz')).status, 200, 'the other node is untouched');
  const status = async () => (await ps()).find((c) => c.name === 'victim')?.status;
  assert.equal(await status(), 'unknown', 'ps does not claim a container of a dead node runs');

  const revived = await cliOk<{ node: string; agentPid: number }>(['cluster', 'revive', 'node1']);
  assert.equal(revived.node, 'node1');
  assert.equal((await http('node1', 7401, '/healthz')).status, 200);
  await waitFor(async () => {
    const nodes = await cliOk<Array<{ name: string; status: string }>>(['node', 'ls']);
    return nodes.find((n) => n.name === 'node1')?.status === 'ready';
  }, 30_000, 'node1 ready again');

  assert.equal(await status(), 'stopped', 'after the power loss the container is known and stopped (no failover yet)');
  assert.equal((await cliFails(['cluster', 'revive', 'node1'])).error.code, 'CHIPMUNK_CONFLICT', 'a running node cannot be revived');
  assert.equal((await cliFails(['cluster', 'kill', 'node9'])).error.code, 'CHIPMUNK_NOT_FOUND');
});

test('kill and revive the controller and the gateway: the cluster works after, routes and containers intact', { timeout: 180_000 }, async () => {
  const port = 28190;
  const viaGateway = async (path: string, method: 'GET' | 'POST' = 'GET') => {
    const res = await undiciRequest(`http://127.0.0.1:${port}${path}`, { method, headersTimeout: 10_000 });
    return { status: res.statusCode, body: (await res.body.json()) as { counter: number } };
  };
  await cliOk(['run', '--name', 'daemons', '--node', 'node2', '-p', `${port}:8080`, '-e', 'MEMORY_MB=8', 'chipmunk/statefulapp']);
  await cliOk(['expose', 'daemons', '--port', '8080', '--listen', String(port)]);
  await waitFor(async () => (await viaGateway('/').catch(() => undefined))?.status === 200, 30_000, 'daemons answers through the gateway');
  for (let i = 0; i < 3; i++) assert.equal((await viaGateway('/increment', 'POST')).status, 200);

  const before = await readClusterState(clusterStateDir());
  const killed = await cliOk<{ target: string; killedPids: number[] }>(['cluster', 'kill', 'controller']);
  assert.deepEqual(killed.killedPids, [before!.controllerPid]);
  await assert.rejects(http('198.18.0.1', 7400, '/healthz', 'GET', { timeoutMs: 1_000 }), 'the controller is gone');
  assert.equal((await viaGateway('/increment', 'POST')).status, 200, 'the data path does not need the controller');
  assert.equal((await cliFails(['cluster', 'kill', 'controller'])).error.code, 'CHIPMUNK_CONFLICT', 'a dead controller cannot be killed again');
  const controller = await cliOk<{ pid: number }>(['cluster', 'revive', 'controller']);
  assert.equal((await readClusterState(clusterStateDir()))!.controllerPid, controller.pid, 'cluster.json names the new controller');
  assert.equal((await http('198.18.0.1', 7400, '/healthz')).status, 200);
  const row = (await ps()).find((c) => c.name === 'daemons');
  assert.equal(row?.node, 'node2');
  assert.equal(row?.status, 'running', 'the restarted controller knows the container from its store');
  assert.equal((await cliFails(['cluster', 'revive', 'controller'])).error.code, 'CHIPMUNK_CONFLICT', 'a running controller cannot be revived');

  await cliOk(['cluster', 'kill', 'gateway']);
  await assert.rejects(viaGateway('/'), 'nothing listens on the route while the gateway is dead');
  const gateway = await cliOk<{ pid: number }>(['cluster', 'revive', 'gateway']);
  assert.equal((await readClusterState(clusterStateDir()))!.gatewayPid, gateway.pid);
  const after = await waitFor(async () => (await viaGateway('/').catch(() => undefined))?.body, 30_000, 'the route answers again');
  assert.equal(after.counter, 4, 'the route leads to the same container, its state intact');
  // And the control plane drives the revived gateway: a new route works.
  await cliOk(['unexpose', 'daemons']);
  await cliOk(['expose', 'daemons', '--port', '8080', '--listen', String(port)]);
  await waitFor(async () => (await viaGateway('/').catch(() => undefined))?.body.counter === 4, 30_000, 'the route set up anew answers');
  await cliOk(['rm', 'daemons']);
});
