/**
 * The controller's side of checkpoints on several hosts, end to end over real HTTP: two real
 * controllers, each serving its checkpoint store, peers of each other (so N defaults to 2). The
 * agents are the fakes, except that their checkpoint upload and their restore from the store do
 * the real thing (the agent's uploadCheckpoint of real part directories, fetchTreeFromAny over the
 * replicas the controller hands them). A checkpoint lands on both stores and is listed with both;
 * with the first replica's copy damaged, a failover restores from the second. (Re-replication,
 * which would repair that copy, is slowed down here: test/unit/checkpoint-replicas.test.ts has it.)
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import type { CheckpointSummary } from '../../src/checkpoint-store/index.js';
import type { FailoverRecord } from '../../src/controller/failover.js';
import { startController, type RunningController } from '../../src/controller/index.js';
import { ApiClient } from '../../src/shared/http.js';
import { FakeCluster } from '../fakes/agents.js';
import { makeCheckpointParts, withRealStoreIo, type CheckpointParts } from '../support/real-store-io.js';
import { runCli } from './run-cli.js';

const TOKEN = 'controller-replicas-token';

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

describe('controller with two checkpoint store replicas', () => {
  let parts: CheckpointParts;
  const cluster = new FakeCluster();
  /** The store each restore read a part from, in order. */
  const readFrom: string[] = [];
  let first: RunningController;
  let second: RunningController;
  let client: ApiClient;
  let heartbeat: NodeJS.Timeout | undefined;
  /** The nodes that heartbeat (every 100 ms; the lease is 1 s). */
  let alive = ['node1', 'node2'];

  const putNode = (url: string, node: string) =>
    new ApiClient({ baseUrl: url, token: TOKEN }).put(`/v1/nodes/${node}`, cluster.agent(node).registration());

  before(async () => {
    parts = await makeCheckpointParts();
    for (const node of ['node1', 'node2']) cluster.add(node);
    const [p1, p2] = [await freePort(), await freePort()];
    const [u1, u2] = [`http://127.0.0.1:${p1}`, `http://127.0.0.1:${p2}`];
    const saved = process.env.CHIPMUNK_ENABLE_FAULTS;
    process.env.CHIPMUNK_ENABLE_FAULTS = '1';
    const common = { token: TOKEN, storeSpec: 'memory:', logger: pino({ level: 'silent' }), nodeReadyWithinMs: 1_000, replicateEveryMs: 600_000 };
    try {
      first = await startController({ ...common, listen: { host: '127.0.0.1', port: p1 }, checkpointStorePeers: [u2], agentFactory: (node) => withRealStoreIo(cluster, cluster.agent(node.name), { token: TOKEN, parts, readFrom }) });
      second = await startController({ ...common, listen: { host: '127.0.0.1', port: p2 }, checkpointStorePeers: [u1] });
    } finally {
      if (saved === undefined) delete process.env.CHIPMUNK_ENABLE_FAULTS;
      else process.env.CHIPMUNK_ENABLE_FAULTS = saved;
    }
    client = new ApiClient({ baseUrl: first.url, token: TOKEN });
    for (const node of alive) await putNode(first.url, node);
    heartbeat = setInterval(() => {
      for (const node of alive) void putNode(first.url, node).catch(() => undefined);
    }, 100);
  });

  after(async () => {
    clearInterval(heartbeat);
    await first?.close();
    await second?.close();
    await parts?.remove();
  });

  it('commits each checkpoint on both controllers\' stores and lists both', async () => {
    await client.post('/v1/containers', { spec: { name: 'web', image: 'counter' }, node: 'node1', protection: { everyMs: 600_000 } });
    const taken = await client.post<CheckpointSummary>('/v1/containers/web/checkpoint');
    assert.deepEqual(taken.replicas, [
      { url: first.url, state: 'intact' },
      { url: second.url, state: 'intact' },
    ]);
    // The scheduler checkpoints a newly protected container at once too: wait for that one, so
    // that no checkpoint is taken behind the next test's back (the next is due in 10 minutes).
    let listed: CheckpointSummary[] = [];
    for (let i = 0; i < 100 && listed.length < 2; i++) {
      await sleep(50);
      listed = await client.get<CheckpointSummary[]>('/v1/containers/web/checkpoints');
    }
    assert.equal(listed.length, 2, 'the manual and the scheduled checkpoint');
    assert.ok(listed.some((c) => c.id === taken.id));
    for (const c of listed) assert.deepEqual(c.replicas, taken.replicas, 'the scheduled checkpoint is on both replicas too');
    // The peer's own store holds them under the same ids.
    const onPeer = await new ApiClient({ baseUrl: second.url, token: TOKEN }).get<CheckpointSummary[]>('/v1/checkpoints/web');
    assert.deepEqual(onPeer.map((c) => c.id), listed.map((c) => c.id));
  });

  it("fails a container over from the second replica when the first one's copy is damaged", async () => {
    const [newest] = await client.get<CheckpointSummary[]>('/v1/containers/web/checkpoints');
    await client.post('/v1/debug/faults', { corruptChunkOf: { container: 'web', checkpoint: newest!.id } });
    // node1 dies: only node2 heartbeats on.
    cluster.agent('node1').down = true;
    alive = ['node2'];
    let record: FailoverRecord | undefined;
    for (let i = 0; i < 150 && record?.outcome !== 'done'; i++) {
      await sleep(100);
      record = (await client.get<FailoverRecord[]>('/v1/failovers')).find((r) => r.name === 'web');
      if (record?.outcome === 'failed') assert.fail(`failover failed: ${JSON.stringify(record.error)}`);
    }
    assert.equal(record?.outcome, 'done');
    assert.equal(record!.to, 'node2');
    assert.equal(record!.checkpoint, newest!.id, 'the newest checkpoint, not an older one: the second replica had it intact');
    assert.deepEqual(readFrom, [second.url], "the first replica's damaged copy fell through to the second");
    assert.deepEqual(record!.readFrom, [second.url], 'the failover record names the replica the restore read from');
    const listed = await client.get<CheckpointSummary[]>('/v1/containers/web/checkpoints');
    assert.deepEqual(listed.find((c) => c.id === newest!.id)!.replicas, [
      { url: first.url, state: 'corrupt' },
      { url: second.url, state: 'intact' },
    ]);
  });

  it('`chipmunk checkpoints NAME` shows where each checkpoint is, and --json lists the replicas', async () => {
    const env = { CHIPMUNK_CONTROLLER: first.url, CHIPMUNK_TOKEN: TOKEN };
    const json = await runCli(['checkpoints', 'web', '--json'], env);
    assert.equal(json.code, 0, json.stderr);
    const [listed] = JSON.parse(json.stdout) as CheckpointSummary[];
    assert.deepEqual(listed!.replicas, [
      { url: first.url, state: 'corrupt' },
      { url: second.url, state: 'intact' },
    ]);
    const table = await runCli(['checkpoints', 'web'], env);
    assert.equal(table.code, 0, table.stderr);
    assert.match(table.stdout, /REPLICAS/);
    const host = (url: string) => url.replace('http://', '');
    assert.ok(table.stdout.includes(`${host(first.url)} (corrupt), ${host(second.url)}`), table.stdout);
  });
});
