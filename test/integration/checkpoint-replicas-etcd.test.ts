/**
 * Checkpoint replicas with several controllers on one real etcd: each controller's checkpoint
 * store is a replica, a checkpoint goes to N = 2 of 3, and `chipmunk files` / `diff` sent to any
 * controller (a follower whose own replica lacks the checkpoint included) read it from a replica
 * that holds it; a replica retired with `chipmunk checkpoint-replicas retire` has its checkpoints
 * copied away first and is never read again, even by a failover under a new leader. The agents
 * are fakes whose checkpoint upload and restore do the real thing.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isDeepStrictEqual } from 'node:util';
import { pino } from 'pino';
import { CheckpointStoreClient } from '../../src/checkpoint-store/index.js';
import { startController, type ControllerOptions, type RunningController } from '../../src/controller/index.js';
import { ControllerClient } from '../../src/shared/controller-client.js';
import { ChipmunkError } from '../../src/shared/errors.js';
import type { CheckpointReplicaView } from '../../src/shared/replica-protocol.js';
import { FakeCluster } from '../fakes/agents.js';
import { freePorts, startEtcd, type EtcdCluster } from '../support/etcd.js';
import { makeCheckpointParts, withRealStoreIo, type CheckpointParts } from '../support/real-store-io.js';
import { waitFor } from '../support/wait.js';
import { runCli } from '../unit/run-cli.js';

const TOKEN = 'replicas-etcd-token';
let shared: Promise<EtcdCluster> | undefined;
const sharedEtcd = () => (shared ??= startEtcd());
after(async () => (await shared)?.stop());

/**
 * COUNT controllers on one etcd namespace, each on a port of its own with its own checkpoint
 * directory, over fake agents node1 and node2 that heartbeat to whichever controller answers.
 */
async function fleetOf(count: number, namespace: string, parts: CheckpointParts, extra: (urls: string[]) => Partial<ControllerOptions>, offered?: string[][]) {
  const etcd = await sharedEtcd();
  const cluster = new FakeCluster();
  for (const node of ['node1', 'node2']) cluster.add(node);
  const ports = await freePorts(count);
  const urls = ports.map((port) => `http://127.0.0.1:${port}`);
  const dirs = await Promise.all(urls.map(() => mkdtemp(join(tmpdir(), 'chipmunk-replicas-etcd-'))));
  const running: (RunningController | undefined)[] = urls.map(() => undefined);
  const agents = new ControllerClient({ urls, token: TOKEN, leaderWaitMs: 0, timeoutMs: 500 });
  const heartbeat = setInterval(() => {
    for (const node of ['node1', 'node2']) if (!cluster.agent(node).down) void agents.heartbeat(cluster.agent(node).registration()).catch(() => undefined);
  }, 100);
  return {
    cluster,
    urls,
    running,
    client: new ControllerClient({ urls, token: TOKEN }),
    async start(i: number): Promise<RunningController> {
      running[i] = await startController({
        listen: { host: '127.0.0.1', port: ports[i]! },
        advertiseUrl: urls[i],
        token: TOKEN,
        storeSpec: `etcd://${etcd.endpoints}/${namespace}`,
        checkpointDir: dirs[i],
        leaderLeaseMs: 1000,
        nodeReadyWithinMs: 1000,
        logger: pino({ level: 'silent' }),
        agentFactory: (node) => withRealStoreIo(cluster, cluster.agent(node.name), { token: TOKEN, parts, ...(offered ? { offered } : {}) }),
        ...extra(urls),
      });
      return running[i]!;
    },
    async stop(i: number): Promise<void> {
      await running[i]?.close();
      running[i] = undefined;
    },
    leader(): number {
      return running.findIndex((c) => c?.leading());
    },
    async close(): Promise<void> {
      clearInterval(heartbeat);
      for (let i = 0; i < count; i++) await this.stop(i);
      for (const dir of dirs) await rm(dir, { recursive: true, force: true });
    },
  };
}

describe('checkpoint replicas on several controllers sharing etcd', () => {
  it('`chipmunk files` and `diff` sent to a follower whose replica lacks the checkpoint read it from one that holds it', async () => {
    const parts = await makeCheckpointParts();
    const fleet = await fleetOf(3, 'browse-test', parts, (urls) => ({ checkpointStorePeers: urls }));
    try {
      const a = await fleet.start(0);
      await waitFor(() => a.leading(), 5000, 'the first controller to lead');
      for (const i of [1, 2]) await fleet.start(i);
      await waitFor(() => fleet.running.every((c) => c!.leader()?.term === a.leader()?.term), 5000, 'every controller to see the leader');
      await waitFor(async () => (await fleet.client.nodes()).filter((n) => n.status === 'ready').length === 2, 5000, 'both nodes ready');
      await fleet.client.run({ spec: { name: 'web', image: 'counter' }, node: 'node1', protection: { everyMs: 600_000 } });
      const first = await waitFor(async () => (await fleet.client.checkpoints('web'))[0], 10_000, 'the first (scheduled) checkpoint');
      await writeFile(join(parts.work, 'files/upper/hello.txt'), 'hello from the second checkpoint\n');
      const second = await fleet.client.checkpoint('web');
      // The leader's own replica first, then the next peer: the third controller holds neither.
      assert.deepEqual(second.replicas?.map((r) => r.url), fleet.urls.slice(0, 2));
      const third = fleet.urls[2]!;
      assert.deepEqual(await new CheckpointStoreClient({ baseUrl: third, token: TOKEN }).list('web'), [], "the third controller's own replica lacks them");

      const env = { CHIPMUNK_CONTROLLER: third, CHIPMUNK_TOKEN: TOKEN };
      const file = await runCli(['files', 'web', '/hello.txt', '--at', second.id], env);
      assert.equal(file.code, 0, file.stderr);
      assert.equal(file.stdout, 'hello from the second checkpoint\n');
      const listing = await runCli(['files', 'web', '/', '--at', second.id, '--json'], env);
      assert.equal(listing.code, 0, listing.stderr);
      assert.deepEqual((JSON.parse(listing.stdout) as { entries: { name: string }[] }).entries.map((e) => e.name), ['hello.txt']);
      const diff = await runCli(['diff', 'web', first.id, second.id], env);
      assert.equal(diff.code, 0, diff.stderr);
      assert.equal(diff.stdout, 'A /hello.txt\n');

      // The first holder goes (it led): the other holder answers, whoever leads now.
      await fleet.stop(0);
      await waitFor(() => fleet.leader() > 0, 5000, 'another controller to lead');
      const again = await runCli(['files', 'web', '/hello.txt', '--at', second.id], env);
      assert.equal(again.code, 0, again.stderr);
      assert.equal(again.stdout, 'hello from the second checkpoint\n');
      const missing = await runCli(['files', 'web', '/nope', '--at', second.id], env);
      assert.notEqual(missing.code, 0);
      assert.match(missing.stderr, /no \/nope in checkpoint/);
    } finally {
      await fleet.close();
      await parts.remove();
    }
  });

  it('with no peers named, the replicas are the controllers running on etcd: one that joins later takes copies and new checkpoints', async () => {
    const parts = await makeCheckpointParts();
    const fleet = await fleetOf(3, 'discovery-test', parts, () => ({ replicateEveryMs: 300 }));
    const [a, b, c] = fleet.urls as [string, string, string];
    try {
      const leader = await fleet.start(0);
      await waitFor(() => leader.leading(), 5000, 'the first controller to lead');
      await fleet.start(1);
      await waitFor(async () => (await fleet.client.controllers()).length === 2, 5000, 'the second controller to campaign');
      await waitFor(async () => (await fleet.client.nodes()).filter((n) => n.status === 'ready').length === 2, 5000, 'both nodes ready');
      await fleet.client.run({ spec: { name: 'web', image: 'counter' }, node: 'node1' });
      const first = await waitFor(() => fleet.client.checkpoint('web').catch(() => undefined), 5000, 'a checkpoint once the leader knows the second store');
      assert.deepEqual(first.replicas?.map((r) => r.url), [a, b], 'N is 2 with etcd, and the second replica is the store the other controller published');

      await fleet.stop(1);
      await assert.rejects(fleet.client.checkpoint('web'), (err: unknown) => err instanceof ChipmunkError && err.code === 'CHIPMUNK_UNAVAILABLE' && /only 1 of the 2 checkpoint store replicas/.test(err.message));

      // A controller never named anywhere: it publishes its store, the leader copies the checkpoint there.
      await fleet.start(2);
      const placed = await waitFor(async () => {
        const listed = (await fleet.client.checkpoints('web')).find((x) => x.id === first.id);
        return listed?.replicas?.some((r) => r.url === c && r.state === 'intact') && listed.replicas;
      }, 10_000, 'the checkpoint to be copied to the new controller');
      assert.deepEqual(placed, [
        { url: a, state: 'intact' },
        { url: b, state: 'unreachable' },
        { url: c, state: 'intact' },
      ]);
      const next = await fleet.client.checkpoint('web');
      assert.deepEqual(next.replicas?.map((r) => r.url), [a, c]);
    } finally {
      await fleet.close();
      await parts.remove();
    }
  });

  it('`checkpoint-replicas retire` copies what a replica holds to the others, refuses bad input changing nothing, and no failover reads from it afterwards', async () => {
    const parts = await makeCheckpointParts();
    const offered: string[][] = [];
    const fleet = await fleetOf(3, 'retire-test', parts, () => ({ replicateEveryMs: 300 }), offered);
    const cli = (args: string[]) => runCli(args, { CHIPMUNK_CONTROLLER: fleet.urls.join(','), CHIPMUNK_TOKEN: TOKEN });
    const sorted = (urls: string[] | undefined) => [...(urls ?? [])].sort();
    try {
      const leader = await fleet.start(0);
      await waitFor(() => leader.leading(), 5000, 'the first controller to lead');
      for (const i of [1, 2]) await fleet.start(i);
      await waitFor(async () => (await fleet.client.controllers()).length === 3, 5000, 'every controller to campaign');
      await waitFor(async () => (await fleet.client.nodes()).filter((n) => n.status === 'ready').length === 2, 5000, 'both nodes ready');
      await fleet.client.run({ spec: { name: 'web', image: 'counter' }, node: 'node1', protection: { everyMs: 600_000 } });
      const first = await waitFor(async () => (await fleet.client.checkpoints('web'))[0], 10_000, 'the first (scheduled) checkpoint');
      // On 2 of the 3 (the leader's own first): the second holder is retired, the first keeps its copy, the third takes one.
      const [keeper, retiree] = first.replicas!.map((r) => r.url) as [string, string];
      const spare = fleet.urls.find((url) => url !== keeper && url !== retiree)!;

      // Every controller's replica, which controller serves it, what it holds (once every campaign
      // is seen: on a loaded machine a 1 s lease may lapse and its campaign be made again).
      const row = (r: CheckpointReplicaView) => JSON.stringify([r.url, r.status, r.reachable, r.checkpoints, r.stored, r.controller !== undefined]);
      const expected = sorted([[keeper, 'active', true, 1, 1, true], [retiree, 'active', true, 1, 1, true], [spare, 'active', true, 0, 0, true]].map((r) => JSON.stringify(r)));
      await waitFor(async () => JSON.stringify(sorted((await fleet.client.checkpointReplicas()).map(row))) === JSON.stringify(expected), 5000, `the replica listing to be ${expected.join(' ')}`);
      const ls = await cli(['checkpoint-replicas', '--json']);
      assert.equal(ls.code, 0, ls.stderr);
      const listed = JSON.parse(ls.stdout) as CheckpointReplicaView[];
      for (const holder of [keeper, retiree]) assert.ok(listed.map(row).includes(expected.find((r) => r.includes(holder))!), `${holder} listed by the CLI: ${ls.stdout}`);
      const table = await cli(['checkpoint-replicas']);
      assert.match(table.stdout, /^URL\s+CONTROLLER\s+STATUS\s+REACHABLE\s+CHECKPOINTS\s+SIZE/);

      // Bad input: an unknown URL, something that is no URL. Nothing changes.
      const unknown = await cli(['checkpoint-replicas', 'retire', 'http://127.0.0.1:1']);
      assert.equal(unknown.code, 1);
      assert.match(unknown.stderr, /is no checkpoint replica of this cluster .*\(CHIPMUNK_NOT_FOUND\)/);
      const notUrl = await cli(['checkpoint-replicas', 'retire', 'node2']);
      assert.equal(notUrl.code, 2, 'a word that is no URL is a usage error');
      assert.ok((await fleet.client.checkpointReplicas()).every((r) => r.status === 'active'), 'nothing retiring or retired');

      // Whichever controller the CLI reaches, the leader does it. (On a loaded machine a lapsed
      // leader lease may have made a new leader checkpoint again: count what lived there.)
      const retired = await cli(['checkpoint-replicas', 'retire', retiree]);
      assert.equal(retired.code, 0, retired.stderr);
      assert.match(retired.stdout, new RegExp(`${retiree} is retired: [1-9]\\d* checkpoint\\(s\\) lived on it`));
      for (const listed of await fleet.client.checkpoints('web')) {
        assert.deepEqual(sorted(listed.replicas!.map((r) => r.url)), sorted([keeper, spare]), 'copied to the spare before the retiree was retired');
        assert.ok(listed.replicas!.every((r) => r.state === 'intact'));
      }
      // Now only 2 are active: retiring either would leave too few for N = 2.
      const tooFew = await cli(['checkpoint-replicas', 'retire', keeper, '--json']);
      assert.equal(tooFew.code, 1);
      assert.equal((JSON.parse(tooFew.stdout) as { error: { code: string } }).error.code, 'CHIPMUNK_CONFLICT');
      assert.match(tooFew.stderr, /would leave [01] active checkpoint replica/);
      const status = async () => Object.fromEntries((await fleet.client.checkpointReplicas()).map((r) => [r.url, r.status]));
      await waitFor(async () => isDeepStrictEqual(await status(), { [keeper]: 'active', [spare]: 'active', [retiree]: 'retired' }), 5000, 'keeper and spare active, the retiree retired');
      const again = await cli(['checkpoint-replicas', 'retire', retiree]);
      assert.equal(again.code, 0, again.stderr);
      assert.match(again.stdout, /was already retired/);
      const next = await waitFor(() => fleet.client.checkpoint('web').catch(() => undefined), 10_000, 'a checkpoint on the two active replicas');
      assert.deepEqual(sorted(next.replicas?.map((r) => r.url)), sorted([keeper, spare]), 'a new checkpoint skips the retired replica');

      // The leader goes, then node1: whoever leads now (the retiree's controller included: it still
      // runs, its replica is just not used) fails web over from a copy that is not the retiree's.
      const gone = fleet.leader();
      await fleet.stop(gone);
      await waitFor(() => fleet.leader() >= 0 && fleet.leader() !== gone, 10_000, 'another controller to lead');
      fleet.cluster.agent('node1').down = true;
      fleet.cluster.agent('node1').containers.clear();
      const failover = await waitFor(async () => (await fleet.client.failovers()).find((f) => f.name === 'web' && f.outcome !== 'running'), 20_000, 'the failover of web');
      assert.equal(failover.outcome, 'done', JSON.stringify(failover));
      assert.ok(offered.length > 0, 'the failover restored from the store');
      for (const stores of offered) {
        assert.ok(!stores.includes(retiree), `a restore was handed the retired replica: ${stores.join(', ')}`);
        assert.notEqual(stores[0], fleet.urls[gone], 'the intact replica that answers comes first');
      }
    } finally {
      await fleet.close();
      await parts.remove();
    }
  });
});
