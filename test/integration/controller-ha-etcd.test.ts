/**
 * Controllers sharing one etcd: one leads and alone does the background work; when it goes,
 * another takes over that work, starting with what the old one left locked.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import { request } from 'undici';
import { ApiClient } from '../../src/shared/http.js';
import type { ContainerView } from '../../src/shared/protocol.js';
import { startController, type RunningController } from '../../src/controller/index.js';
import { openStore } from '../../src/controller/store/index.js';
import { FakeCluster } from '../fakes/agents.js';
import { startEtcd, type EtcdCluster } from '../support/etcd.js';
import { waitFor } from '../support/wait.js';

const TOKEN = 'test-token';
let shared: Promise<EtcdCluster> | undefined;
const sharedEtcd = () => (shared ??= startEtcd());
after(async () => (await shared)?.stop());

describe('controllers on one etcd', () => {
  it('one leads and does the background work; when it closes another leads and settles the lock it left', async () => {
    const etcd = await sharedEtcd();
    const spec = `etcd://${etcd.endpoints}/ha-test`;
    const dirs: string[] = [];
    const cluster = new FakeCluster();
    cluster.add('node1');
    const start = async () => {
      const checkpointDir = await mkdtemp(join(tmpdir(), 'chipmunk-ha-checkpoints-'));
      dirs.push(checkpointDir);
      return startController({
        listen: { host: '127.0.0.1', port: 0 },
        token: TOKEN,
        storeSpec: spec,
        checkpointDir,
        leaderLeaseMs: 1000,
        nodeReadyWithinMs: 2000,
        logger: pino({ level: 'silent' }),
        agentFactory: cluster.resolver,
      });
    };
    const controllers: RunningController[] = [];
    const store = await openStore(spec);
    try {
      const a = await start();
      controllers.push(a);
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
      controllers.push(b);
      await waitFor(() => b.leader()?.term === a.leader()?.term && b.leader() !== undefined, 5000, 'the second to see the first lead');
      assert.equal(b.leading(), false);

      await sleep(1500);
      assert.deepEqual((await store.get<{ lock?: unknown }>('/containers/web'))?.value.lock, lock, 'the follower leaves it alone');

      const oldTerm = a.leader()!.term;
      await a.close();
      controllers.shift();
      await waitFor(() => b.leading(), 5000, 'the second controller to lead');
      assert.ok(b.leader()!.term > oldTerm);
      await waitFor(async () => (await store.get<{ lock?: unknown }>('/containers/web'))?.value.lock === undefined, 5000, 'the new leader to settle the lock');
    } finally {
      for (const c of controllers) await c.close();
      await store.close();
      for (const dir of dirs) await rm(dir, { recursive: true, force: true });
    }
  });
});
