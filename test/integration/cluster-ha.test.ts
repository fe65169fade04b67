/**
 * `chipmunk cluster up --ha` on real test hosts: an etcd member and a controller on every node.
 * The host of the leading controller loses power (SIGKILL of everything on it, its container
 * included): another controller leads within seconds, the protected container comes back on
 * another node with every acknowledged request, and exactly one copy runs; the host returns as a
 * follower.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { request } from 'undici';
import { cliFails, cliOk, ps, runningCopies, startLocalCluster, stopLocalCluster, waitFor } from '../support/local-cluster.js';

const GATEWAY_PORT = 28095;

interface NodeRow {
  name: string;
  status: string;
  controller?: { role: 'leader' | 'follower'; term?: number };
}

before(async () => {
  await startLocalCluster(3, { ha: true, nodeLeaseMs: 1000 });
}, { timeout: 300_000 });

after(async () => {
  await stopLocalCluster();
}, { timeout: 120_000 });

async function leader(): Promise<{ node: string; term: number } | undefined> {
  const nodes = await cliOk<NodeRow[]>(['node', 'ls']);
  const row = nodes.find((n) => n.controller?.role === 'leader');
  return row && { node: row.name, term: row.controller!.term! };
}

async function increment(): Promise<number> {
  const res = await request(`http://127.0.0.1:${GATEWAY_PORT}/increment`, { method: 'POST', headersTimeout: 60_000, bodyTimeout: 60_000 });
  const text = await res.body.text();
  assert.equal(res.statusCode, 200, text);
  return (JSON.parse(text) as { counter: number }).counter;
}

test("the leader's host dies: another controller leads, the protected container on it comes back once with every acknowledged request", { timeout: 300_000 }, async () => {
  const nodes = await cliOk<NodeRow[]>(['node', 'ls']);
  assert.deepEqual(nodes.map((n) => n.status), ['ready', 'ready', 'ready']);
  assert.equal(nodes.filter((n) => n.controller?.role === 'leader').length, 1, 'one controller leads');
  assert.equal(nodes.filter((n) => n.controller?.role === 'follower').length, 2, 'the others follow');
  const before = (await leader())!;
  assert.ok(before.term > 0);
  assert.equal((await cliFails(['cluster', 'kill', 'controller'])).error.code, 'CHIPMUNK_CONFLICT', 'an HA cluster has no single controller to kill');

  await cliOk(['run', '--name', 'ha-app', '--node', before.node, '--checkpoint-every', '2s', '-e', 'MEMORY_MB=16', 'chipmunk/statefulapp']);
  await cliOk(['expose', 'ha-app', '--port', '8080', '--listen', String(GATEWAY_PORT)]);
  await waitFor(async () => (await increment().catch(() => 0)) > 0, 30_000, 'ha-app answers through the gateway');
  const checkpoints = await waitFor(async () => {
    const list = await cliOk<Array<{ id: string; replicas?: unknown[] }>>(['checkpoints', 'ha-app']);
    return list.length > 0 ? list : undefined;
  }, 30_000, 'a first checkpoint');
  assert.ok((checkpoints[0]!.replicas ?? []).length >= 2, `the checkpoint is on 2 replicas: ${JSON.stringify(checkpoints[0])}`);
  let acknowledged = await increment();
  for (let i = 0; i < 20; i++) acknowledged = await increment();

  await cliOk(['cluster', 'kill', before.node]);
  const killedAt = Date.now();
  const after = await waitFor(async () => {
    const now = await leader().catch(() => undefined);
    return now && now.node !== before.node ? now : undefined;
  }, 30_000, 'another controller to lead');
  const tookOverMs = Date.now() - killedAt;
  assert.ok(after.term > before.term, `the new term ${after.term} is above the old ${before.term}`);

  const counter = await increment();
  acknowledged++;
  assert.equal(counter, acknowledged, 'every acknowledged request survived the death of the leader and of the container host');
  const row = (await ps()).find((c) => c.name === 'ha-app');
  assert.notEqual(row?.node, before.node);
  assert.equal(row?.status, 'running');
  assert.deepEqual((await runningCopies('ha-app')).map((c) => c.node), [row!.node], 'exactly one running copy, counted from runc on every node');
  console.log(`# leader ${before.node} (term ${before.term}) -> ${after.node} (term ${after.term}) in ${tookOverMs} ms; ha-app back on ${row!.node}`);

  await cliOk(['cluster', 'revive', before.node]);
  await waitFor(async () => {
    const rows = await cliOk<NodeRow[]>(['node', 'ls']);
    const back = rows.find((n) => n.name === before.node);
    return back?.status === 'ready' && back.controller?.role === 'follower';
  }, 60_000, `${before.node} back as a follower`);
  assert.equal((await leader())?.node, after.node, 'the returning node does not take the lead back');
  assert.deepEqual((await runningCopies('ha-app')).map((c) => c.node), [row!.node], 'still one copy after the host returned');
});
