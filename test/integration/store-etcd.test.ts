/**
 * The StateStore contract against a real etcd (Debian's etcd-server, started here on loopback),
 * and what only a store on a server has: namespaces, a watch that rides out a lost connection,
 * leases timed by the server, an etcd member dying under the store.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Etcd3 } from 'etcd3';
import { pino } from 'pino';
import { request } from 'undici';
import { ApiClient } from '../../src/shared/http.js';
import type { ContainerView, NodeView } from '../../src/shared/protocol.js';
import { startController } from '../../src/controller/index.js';
import { FakeCluster } from '../fakes/agents.js';
import { StoreFailedError } from '../../src/shared/errors.js';
import { EtcdStore, openStore, type WatchEvent } from '../../src/controller/store/index.js';
import { describeStoreContract } from '../contract/store.contract.js';
import { startEtcd, type EtcdCluster } from '../support/etcd.js';
import { startTcpProxy } from '../support/tcp-proxy.js';
import { waitFor } from '../support/wait.js';

let shared: Promise<EtcdCluster> | undefined;
/** One etcd for the contract's tests, which run one at a time and each leave it empty. */
const sharedEtcd = () => (shared ??= startEtcd());
after(async () => (await shared)?.stop());

let fixtures = 0;
describeStoreContract(
  'EtcdStore',
  async (opts) => {
    const etcd = await sharedEtcd();
    const namespace = `/contract-${++fixtures}`;
    const open = () => EtcdStore.open([etcd.endpoints], { ...opts, namespace });
    let store = await open();
    return {
      store,
      reopen: async () => {
        await store.close();
        store = await open();
        return store;
      },
      cleanup: async () => {
        await store.close();
        await emptyEtcd(etcd.endpoints);
      },
    };
  },
  { serial: true, leaseGranularityMs: 1000, leaseExpiryLagMs: 1000, serverLeases: true },
);

/** Deletes every key and revokes every lease, so no lease of one test ends during the next. */
async function emptyEtcd(endpoints: string): Promise<void> {
  const admin = new Etcd3({ hosts: endpoints.split(',').map((e) => `http://${e}`) });
  try {
    const { leases } = await admin.leaseClient.leaseLeases();
    for (const { ID } of leases) await admin.leaseClient.leaseRevoke({ ID }).catch(() => {});
    await admin.delete().all();
  } finally {
    admin.close();
  }
}

function recorder() {
  const events: WatchEvent[] = [];
  return {
    events,
    onEvent: (ev: WatchEvent) => events.push(ev),
    summary: () => events.map((ev) => `${ev.type} ${ev.kv.key}@${ev.revision}`),
  };
}

describe('EtcdStore on a real etcd', { concurrency: false }, () => {
  it('fails to open with a clear error when no etcd answers', async () => {
    const proxy = await startTcpProxy('127.0.0.1:9'); // a port with nothing behind it
    proxy.cut();
    const started = Date.now();
    try {
      await assert.rejects(
        openStore(`etcd://${proxy.endpoint}`),
        (err) => err instanceof StoreFailedError && err.message.includes(`cannot reach etcd at ${proxy.endpoint}`) && /check that etcd runs/.test(err.message),
      );
      assert.ok(Date.now() - started < 15_000, `gave up after ${Date.now() - started} ms`);
    } finally {
      await proxy.close();
    }
  });

  it('keeps namespaces apart: keys, lists and watches', async () => {
    const etcd = await sharedEtcd();
    const a = await openStore(`etcd://${etcd.endpoints}/ns-a`);
    const b = await openStore(`etcd://${etcd.endpoints}/ns-b/`);
    try {
      const seenByB = recorder();
      await b.watch('/', {}, seenByB.onEvent);
      await a.put('/k', 'a');
      await b.put('/k', 'b');
      assert.equal((await a.get('/k'))?.value, 'a');
      assert.deepEqual((await b.list('')).map((kv) => [kv.key, kv.value]), [['/k', 'b']]);
      await waitFor(() => seenByB.events.length >= 1, 2000, 'b to see its own put');
      await sleep(100);
      assert.deepEqual(seenByB.events.map((ev) => [ev.kv.key, ev.kv.value]), [['/k', 'b']]);
    } finally {
      await a.close();
      await b.close();
      await emptyEtcd(etcd.endpoints);
    }
  });

  it('lists more keys than one page, all as of one revision', async () => {
    const etcd = await sharedEtcd();
    const store = await openStore(`etcd://${etcd.endpoints}`);
    try {
      // etcd takes at most 128 ops per transaction.
      for (let batch = 0; batch < 11; batch++) {
        const ops = Array.from({ length: 100 }, (_, i) => ({ type: 'put' as const, key: `/many/${String(batch * 100 + i).padStart(4, '0')}`, value: batch * 100 + i }));
        await store.txn({ compare: [], ops });
      }
      const listed = await store.list<number>('/many/');
      assert.equal(listed.length, 1100);
      assert.deepEqual(listed.map((kv) => kv.value), Array.from({ length: 1100 }, (_, i) => i));
      assert.equal(new Set(listed.map((kv) => kv.key)).size, 1100, 'no key twice at a page boundary');
    } finally {
      await store.close();
      await emptyEtcd(etcd.endpoints);
    }
  });

  it('a watch etcd does not create in time fails with a store error (it used to throw a ReferenceError that crashed a starting controller)', async () => {
    const etcd = await sharedEtcd();
    const proxy = await startTcpProxy(etcd.endpoints);
    const store = await openStore(`etcd://${proxy.endpoint}`);
    try {
      proxy.stall();
      await assert.rejects(store.watch('/never/', {}, () => {}), (err: unknown) => err instanceof StoreFailedError);
    } finally {
      proxy.restore();
      await store.close();
      await proxy.close();
    }
  });

  it('resumes a watch cut off from etcd at the first change it missed: every change once, in order', async () => {
    const etcd = await sharedEtcd();
    const proxy = await startTcpProxy(etcd.endpoints);
    const store = await openStore(`etcd://${proxy.endpoint}`);
    const direct = await openStore(`etcd://${etcd.endpoints}`);
    try {
      const seen = recorder();
      await store.watch('/resume/', { onFailed: (err) => assert.fail(`the watch failed: ${err.message}`) }, seen.onEvent);
      const expected = [`put /resume/a@${await store.put('/resume/a', 1)}`, `put /resume/b@${await store.put('/resume/b', 1)}`];
      await waitFor(() => seen.events.length >= 2, 2000, 'the first two events');

      proxy.cut();
      expected.push(`put /resume/c@${await direct.put('/resume/c', 1)}`);
      await direct.delete('/resume/a');
      expected.push(`delete /resume/a@${await direct.currentRevision()}`);
      const txn = await direct.txn({ compare: [], ops: [{ type: 'put', key: '/resume/b', value: 2 }, { type: 'put', key: '/resume/d', value: 1 }] });
      expected.push(`put /resume/b@${txn.revision}`, `put /resume/d@${txn.revision}`);
      await sleep(300);
      proxy.restore();

      expected.push(`put /resume/e@${await direct.put('/resume/e', 1)}`);
      // On a time-out the comparison below shows what came.
      await waitFor(() => seen.events.length >= expected.length, 10_000).catch(() => {});
      await sleep(200);
      assert.deepEqual(seen.summary(), expected);
    } finally {
      await store.close();
      await direct.close();
      await proxy.close();
      await emptyEtcd(etcd.endpoints);
    }
  });

  it('ends a watch through onFailed when the history it must resume from was compacted meanwhile', async () => {
    const etcd = await sharedEtcd();
    const proxy = await startTcpProxy(etcd.endpoints);
    const store = await openStore(`etcd://${proxy.endpoint}`);
    const direct = await EtcdStore.open([etcd.endpoints], { historyRevisions: 1 });
    try {
      const seen = recorder();
      let failure: StoreFailedError | undefined;
      await store.watch('/gone/', { onFailed: (err) => (failure = err) }, seen.onEvent);
      await store.put('/gone/a', 1);
      await waitFor(() => seen.events.length >= 1, 2000, 'the first event');

      proxy.cut();
      for (let i = 0; i < 4; i++) await direct.put('/gone/b', i); // compacts as it goes: one revision kept
      proxy.restore();

      await waitFor(() => failure, 10_000, 'the watch to fail');
      assert.match(failure!.message, /compacted/);
      assert.match(failure!.message, /list .* again/);
      assert.equal(seen.events.length, 1, 'nothing is delivered from history that is gone');
    } finally {
      await store.close();
      await direct.close();
      await proxy.close();
      await emptyEtcd(etcd.endpoints);
    }
  });

  it("keeps a lease on the server across a reopen: the next client keeps it alive, and it ends one TTL after the last keep-alive", async () => {
    const etcd = await sharedEtcd();
    const first = await openStore(`etcd://${etcd.endpoints}`);
    const lease = await first.grantLease(1000);
    await first.put('/srv/a', 1, { lease });
    await first.close();

    const second = await openStore(`etcd://${etcd.endpoints}`);
    try {
      for (let i = 0; i < 4; i++) {
        await sleep(500);
        await second.keepAlive(lease);
      }
      const lastKeepAlive = Date.now();
      assert.equal((await second.get('/srv/a'))?.lease, lease, 'the lease outlived 2 s of keep-alives from the reopened store');
      await waitFor(async () => (await second.get('/srv/a')) === undefined, 4000, 'the lease to end');
      const ended = Date.now() - lastKeepAlive;
      assert.ok(ended >= 900, `the lease ended ${ended} ms after the last keep-alive, before its 1 s TTL`);
    } finally {
      await second.close();
      await emptyEtcd(etcd.endpoints);
    }
  });

  it('keeps calling a member after many keep-alives at once (a keep-alive ends its stream; that is no failure of the member)', async () => {
    const etcd = await sharedEtcd();
    const store = await openStore(`etcd://${etcd.endpoints}/keepalive-burst`);
    try {
      const leases = await Promise.all(Array.from({ length: 4 }, () => store.grantLease(2000)));
      // Agents' heartbeats and campaigns keep leases alive side by side; five at once opened the member's circuit breaker.
      await Promise.all(leases.flatMap((lease) => [store.keepAlive(lease), store.keepAlive(lease)]));
      await sleep(50);
      await store.put('/after-burst', 1);
      assert.equal((await store.get('/after-burst'))?.value, 1);
    } finally {
      await store.close();
      await emptyEtcd(etcd.endpoints);
    }
  });

  it("refuses a lease shorter than the etcd's shortest, naming the election timeout", async () => {
    const slow = await startEtcd({ electionTimeoutMs: 1000, heartbeatMs: 100 }); // shortest lease: 2 s
    const store = await openStore(`etcd://${slow.endpoints}`);
    try {
      await assert.rejects(store.grantLease(1000), (err) => err instanceof StoreFailedError && /1 s lease 2 s long/.test(err.message) && /--election-timeout/.test(err.message));
      assert.ok(await store.grantLease(2000));
    } finally {
      await store.close();
      await slow.stop();
    }
  });

  it('goes on through the death of one of three etcd members: writes, reads, watches', async () => {
    const cluster = await startEtcd({ members: 3 });
    const store = await openStore(`etcd://${cluster.endpoints}`);
    try {
      const seen = recorder();
      await store.watch('/ha/', {}, seen.onEvent);
      const revisions = [await store.put('/ha/0', 0)];
      await cluster.members[0].kill();
      for (let i = 1; i <= 10; i++) revisions.push(await store.put(`/ha/${i}`, i));
      assert.equal((await store.list('/ha/')).length, 11);
      await waitFor(() => seen.events.length >= 11, 10_000).catch(() => {});
      assert.deepEqual(seen.events.map((ev) => ev.revision), revisions);
    } finally {
      await store.close();
      await cluster.stop();
    }
  });

  it('runs a controller on etcd: nodes heartbeat into etcd leases, containers run, a silent node turns unreachable', async () => {
    const etcd = await sharedEtcd();
    const checkpointDir = await mkdtemp(join(tmpdir(), 'chipmunk-etcd-checkpoints-'));
    const cluster = new FakeCluster();
    cluster.add('node1');
    cluster.add('node2');
    const controller = await startController({
      listen: { host: '127.0.0.1', port: 0 },
      token: 'test-token',
      storeSpec: `etcd://${etcd.endpoints}/controller-test`,
      checkpointDir,
      nodeReadyWithinMs: 1000,
      logger: pino({ level: 'silent' }),
      agentFactory: cluster.resolver,
    });
    const client = new ApiClient({ baseUrl: controller.url, token: 'test-token', peer: 'controller' });
    const heartbeat = async (name: string) => {
      const res = await request(`${controller.url}/v1/nodes/${name}`, {
        method: 'PUT',
        headers: { authorization: 'Bearer test-token', 'content-type': 'application/json' },
        body: JSON.stringify(cluster.agent(name).registration()),
      });
      assert.equal(res.statusCode, 200, await res.body.text());
    };
    try {
      await heartbeat('node1');
      await heartbeat('node2');
      const web = await client.post<ContainerView>('/v1/containers', { spec: { name: 'web', image: 'counter', ports: [] }, node: 'node2' });
      assert.deepEqual([web.node, web.status], ['node2', 'running']);

      const lastNode2 = Date.now();
      const beating = setInterval(() => void heartbeat('node1').catch(() => {}), 250);
      try {
        await waitFor(async () => (await client.get<NodeView[]>('/v1/nodes')).find((n) => n.name === 'node2')?.status === 'unreachable', 5000, 'node2 to turn unreachable');
        assert.ok(Date.now() - lastNode2 >= 900, 'node2 turned unreachable before its 1 s lease ran out');
        assert.equal((await client.get<NodeView[]>('/v1/nodes')).find((n) => n.name === 'node1')?.status, 'ready');
      } finally {
        clearInterval(beating);
      }
      const admin = await openStore(`etcd://${etcd.endpoints}`);
      try {
        assert.ok((await admin.list('/controller-test/containers/')).length === 1, 'the container record lives in etcd under the namespace');
      } finally {
        await admin.close();
      }
    } finally {
      await controller.close();
      await rm(checkpointDir, { recursive: true, force: true });
      await emptyEtcd(etcd.endpoints);
    }
  });
});
