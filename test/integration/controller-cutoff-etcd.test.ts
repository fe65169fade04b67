/**
 * A controller cut off from etcd by a firewall that drops its packets (no refusal: its store calls
 * hang until their deadline) must not take the nodes that talk to it down with it: an agent's
 * heartbeats and a client's reads go on through another controller, in time for the node lease.
 * Real etcd on loopback; the cut is a TCP proxy that stalls.
 */
import assert from 'node:assert/strict';
import { after, it } from 'node:test';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import { startHeartbeats } from '../../src/agent/heartbeat.js';
import { startController, type RunningController } from '../../src/controller/index.js';
import { ControllerClient } from '../../src/shared/controller-client.js';
import { FakeCluster } from '../fakes/agents.js';
import { startEtcd, type EtcdCluster } from '../support/etcd.js';
import { startTcpProxy } from '../support/tcp-proxy.js';
import { waitFor } from '../support/wait.js';

const TOKEN = 'test-token';
/** Heartbeats every 500 ms; a try may take 1 s. */
const NODE_LEASE_MS = 2_000;
/** Well past the store's 5 s deadline for one call, which a heartbeat used to wait out. */
const WATCH_MS = 6_000;

let etcd: EtcdCluster | undefined;
after(async () => etcd?.stop());

it("a controller cut off from etcd: the node's heartbeats and a client's reads go on through another controller; the node stays ready", { timeout: 60_000 }, async () => {
  etcd = await startEtcd();
  const proxy = await startTcpProxy(etcd.endpoints);
  const cluster = new FakeCluster();
  cluster.add('node1');
  const dirs: string[] = [];
  const controllers: RunningController[] = [];
  const start = async (endpoints: string) => {
    const checkpointDir = await mkdtemp(join(tmpdir(), 'chipmunk-cutoff-'));
    dirs.push(checkpointDir);
    const controller = await startController({
      listen: { host: '127.0.0.1', port: 0 },
      token: TOKEN,
      storeSpec: `etcd://${endpoints}/cutoff-test`,
      checkpointDir,
      leaderLeaseMs: 1000,
      nodeReadyWithinMs: NODE_LEASE_MS,
      logger: pino({ level: 'silent' }),
      agentFactory: cluster.resolver,
    });
    controllers.push(controller);
    return controller;
  };
  let heartbeats: { stop(): void } | undefined;
  try {
    // The one the node talks to first leads, and is the one cut off.
    const cutOff = await start(proxy.endpoint);
    await waitFor(() => cutOff.leading(), 5_000, 'the first controller to lead');
    const other = await start(etcd.endpoints);
    heartbeats = await startHeartbeats({
      controllerUrls: [cutOff.url, other.url],
      token: TOKEN,
      registration: cluster.agent('node1').registration(),
      onAnswer: async () => {},
      log: pino({ level: 'silent' }),
    });
    const viaOther = new ControllerClient({ urls: [other.url], token: TOKEN, timeoutMs: 5_000 });
    const status = async () => (await viaOther.nodes()).find((n) => n.name === 'node1')?.status;
    await waitFor(async () => (await status()) === 'ready', 5_000, 'node1 ready');
    await sleep(NODE_LEASE_MS); // heartbeats at the pace the controller gave

    proxy.stall();
    const client = new ControllerClient({ urls: [cutOff.url, other.url], token: TOKEN, timeoutMs: 10_000 });
    const read = client.nodes().then(
      (nodes) => ({ nodes }),
      (err: Error) => ({ err }),
    );
    const seen = new Set<string | undefined>();
    const until = Date.now() + WATCH_MS;
    while (Date.now() < until) {
      seen.add(await status());
      await sleep(100);
    }
    assert.deepEqual([...seen], ['ready'], 'node1 stayed ready while the controller it heartbeated to was cut off');
    const answer = await read;
    assert.ok('nodes' in answer, `a read through the cut-off controller went on to the other: ${'err' in answer ? answer.err.message : ''}`);
    assert.equal(answer.nodes.find((n) => n.name === 'node1')?.status, 'ready');
    assert.equal(client.url, other.url, 'the client sticks to the controller that answered');
    await waitFor(() => other.leading(), 5_000, 'the other controller to lead');
  } finally {
    heartbeats?.stop();
    proxy.restore();
    for (const controller of controllers.reverse()) await controller.close().catch(() => undefined);
    await proxy.close();
    for (const dir of dirs) await rm(dir, { recursive: true, force: true });
  }
});
