/**
 * `chipmunk cluster kill|revive`: power loss on one test host, and its return. (Issue 4 uses
 * these to test failover; here: that they do what they say.)
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { cliFails, cliOk, http, ps, runcList, startLocalCluster, stopLocalCluster, waitFor } from '../support/local-cluster.js';

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
