// Cluster-wide container addresses (src/controller/addresses.ts) with fake agents: allocated
// from the controller's range at run, given to the agent in the spec, kept across migrations
// (two at once too), released with the container. Failover keeps it: controller-failover.test.ts.
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { AddressRoutes } from '../../src/controller/address-routes.js';
import { pino } from 'pino';
import { ContainerAddresses, DEFAULT_CONTAINER_RANGE, parseContainerRange } from '../../src/controller/addresses.js';
import { ContainerLocks, containerKey, type ContainerRecord } from '../../src/controller/container-lock.js';
import { ContainerService } from '../../src/controller/containers.js';
import { Fences } from '../../src/controller/fences.js';
import { MigrationOrchestrator } from '../../src/controller/migration.js';
import { NodeRegistry } from '../../src/controller/registry.js';
import { MemoryStore } from '../../src/controller/store/index.js';
import { InvalidInputError, StoreFailedError, UnavailableError } from '../../src/shared/errors.js';
import type { ContainerSpec } from '../../src/shared/protocol.js';
import { FakeCluster } from '../fakes/agents.js';

const silent = pino({ level: 'silent' });

function spec(name: string): ContainerSpec {
  return { name, image: 'counter', command: [], env: {}, ports: [], memoryBytes: 0 };
}

async function setup(range: string | null = DEFAULT_CONTAINER_RANGE) {
  const store = new MemoryStore();
  const cluster = new FakeCluster();
  for (const node of ['node1', 'node2']) cluster.add(node);
  const nodes = new NodeRegistry(store);
  for (const node of ['node1', 'node2']) await nodes.heartbeat(cluster.agent(node).registration());
  const locks = new ContainerLocks(store);
  const containers = new ContainerService(store, nodes, cluster.resolver, locks, new ContainerAddresses(store, range ? parseContainerRange(range) : undefined));
  const migrations = new MigrationOrchestrator({ store, nodes, agentFor: cluster.resolver, locks, fences: new Fences(store), log: silent });
  const record = async (name: string) => (await store.get<ContainerRecord>(containerKey(name)))!.value;
  return { store, cluster, nodes, containers, migrations, record };
}

describe('cluster-wide container addresses (controller, fake agents)', () => {
  it('each container gets its own address of the range, in its record, its view and the spec its agent runs', async () => {
    const env = await setup('198.19.128.0/24');
    const a = await env.containers.run({ spec: spec('a'), node: 'node1' });
    const b = await env.containers.run({ spec: spec('b'), node: 'node2' });
    assert.equal(a.address, '198.19.128.1');
    assert.equal(b.address, '198.19.128.2');
    assert.equal((await env.record('a')).spec.address, '198.19.128.1');
    assert.equal(env.cluster.agent('node2').containers.get('b')?.spec.address, '198.19.128.2');
  });

  it('two containers migrating at once both keep their addresses, and their new nodes are given them', async () => {
    const env = await setup();
    await env.containers.run({ spec: spec('a'), node: 'node1' });
    await env.containers.run({ spec: spec('b'), node: 'node1' });
    const before = [(await env.record('a')).spec.address, (await env.record('b')).spec.address];
    await Promise.all(['a', 'b'].map((name) => env.migrations.migrate(name, { to: 'node2' }, () => undefined)));
    for (const [i, name] of ['a', 'b'].entries()) {
      const rec = await env.record(name);
      assert.equal(rec.node, 'node2');
      assert.equal(rec.spec.address, before[i], `${name} keeps its address`);
      assert.equal(env.cluster.agent('node2').containers.get(name)?.spec.address, before[i]);
    }
  });

  it('removing a container releases its address for the next one; a run the agent refuses releases it too', async () => {
    const env = await setup('198.19.128.0/30');
    await env.containers.run({ spec: spec('a'), node: 'node1' });
    await env.containers.run({ spec: spec('b'), node: 'node1' });
    // A /30 has two addresses to hand out: both are taken.
    await assert.rejects(env.containers.run({ spec: spec('c'), node: 'node1' }), (err: unknown) => err instanceof UnavailableError && /no free address .*198\.19\.128\.0\/30/.test(err.message));
    await env.containers.remove('a');
    const c = await env.containers.run({ spec: spec('c'), node: 'node2' });
    assert.equal(c.address, '198.19.128.1', "a's address, released with it");
    env.cluster.agent('node1').failNext('run', new Error('no such image'));
    await env.containers.remove('b');
    await assert.rejects(env.containers.run({ spec: spec('d'), node: 'node1' }), /no such image/);
    const e = await env.containers.run({ spec: spec('e'), node: 'node1' });
    assert.equal(e.address, '198.19.128.2', 'the refused run gave its address back');
  });

  it('a client may not choose the address; a bad range is refused naming the flag; off gives none', async () => {
    const env = await setup();
    await assert.rejects(env.containers.run({ spec: { ...spec('a'), address: '198.19.128.9' }, node: 'node1' }), (err: unknown) => err instanceof InvalidInputError && /spec\.address/.test(err.message));
    assert.throws(() => parseContainerRange('198.19.128.0/33'), (err: unknown) => err instanceof InvalidInputError && /--container-range '198\.19\.128\.0\/33'/.test(err.message));
    const off = await setup(null);
    const a = await off.containers.run({ spec: spec('a'), node: 'node1' });
    assert.equal(a.address, undefined);
    assert.equal(off.cluster.agent('node1').containers.get('a')?.spec.address, undefined);
  });

  it("a migration routes the address to the target once its restore answered, before the commit; one that then fails routes it back where the record says", async () => {
    const store = new MemoryStore();
    const cluster = new FakeCluster();
    for (const node of ['node1', 'node2']) cluster.add(node);
    const nodes = new NodeRegistry(store);
    for (const node of ['node1', 'node2']) await nodes.heartbeat(cluster.agent(node).registration());
    const locks = new ContainerLocks(store);
    const containers = new ContainerService(store, nodes, cluster.resolver, locks, new ContainerAddresses(store, parseContainerRange('198.19.128.0/24')));
    const dir = await mkdtemp(join(tmpdir(), 'chipmunk-address-routes-'));
    try {
      const log = join(dir, 'calls');
      const script = join(dir, 'route.sh');
      await writeFile(script, `echo "$*" >> ${log}\n`);
      const calls = async () => (await readFile(log, 'utf8').catch(() => '')).trim().split('\n').filter(Boolean);
      const routes = new AddressRoutes(store, nodes, `/bin/sh ${script}`, silent);
      await routes.start();
      const migrations = new MigrationOrchestrator({ store, nodes, agentFor: cluster.resolver, locks, fences: new Fences(store), log: silent, addressRoutes: routes });
      const [node1, node2] = ['node1', 'node2'].map((n) => cluster.agent(n).registration().address);
      const phaseOf = async () => (await migrations.list())[0]?.phase;
      await containers.run({ spec: spec('a'), node: 'node1' });

      // The verify call waits: the address is routed to node2 while the record is not committed yet.
      const releaseVerify = cluster.agent('node2').hold('get');
      const moved = migrations.migrate('a', { to: 'node2' }, () => undefined);
      for (let i = 0; i < 200 && !(await calls()).includes(`198.19.128.1 ${node2}`); i++) await sleep(10);
      assert.deepEqual(await calls(), [`198.19.128.1 ${node1}`, `198.19.128.1 ${node2}`], 'routed to the target before the commit');
      assert.equal(await phaseOf(), 'verify');
      releaseVerify();
      await moved;
      await routes.settled();
      assert.deepEqual(await calls(), [`198.19.128.1 ${node1}`, `198.19.128.1 ${node2}`], 'the commit finds it routed: no second command');

      // The copy is gone by the time it is verified: rolled back, the address goes back to node1.
      const releaseAgain = cluster.agent('node1').hold('get');
      const failed = migrations.migrate('a', { to: 'node1' }, () => undefined);
      for (let i = 0; i < 200 && (await calls()).length < 3; i++) await sleep(10);
      assert.deepEqual((await calls()).slice(2), [`198.19.128.1 ${node1}`], 'routed ahead to node1');
      cluster.agent('node1').containers.delete('a');
      releaseAgain();
      await assert.rejects(failed);
      for (let i = 0; i < 200 && (await calls()).length < 4; i++) await sleep(10);
      await routes.settled();
      const record = (await store.get<ContainerRecord>(containerKey('a')))!.value;
      assert.equal(record.node, 'node2', 'rolled back to node2');
      assert.deepEqual((await calls()).slice(3), [`198.19.128.1 ${node2}`], 'the address follows the record back to node2');
      routes.stop();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('the address routes command runs at run, at each move and at removal, with the node address; a restarted controller runs it again', async () => {
    const env = await setup('198.19.128.0/24');
    const dir = await mkdtemp(join(tmpdir(), 'chipmunk-address-routes-'));
    try {
      const log = join(dir, 'calls');
      const script = join(dir, 'route.sh');
      await writeFile(script, `echo "$*" >> ${log}\n`);
      const calls = async () => (await readFile(log, 'utf8').catch(() => '')).trim().split('\n').filter(Boolean);
      const routes = new AddressRoutes(env.store, env.nodes, `/bin/sh ${script}`, silent);
      await routes.start();
      const [node1, node2] = ['node1', 'node2'].map((n) => env.cluster.agent(n).registration().address);
      await env.containers.run({ spec: spec('a'), node: 'node1' });
      await env.migrations.migrate('a', { to: 'node2' }, () => undefined);
      await env.containers.remove('a');
      const want = [`198.19.128.1 ${node1}`, `198.19.128.1 ${node2}`, '198.19.128.1'];
      for (let i = 0; i < 100 && (await calls()).length < want.length; i++) await sleep(20);
      await routes.settled();
      assert.deepEqual(await calls(), want);
      routes.stop();
      await env.containers.run({ spec: spec('b'), node: 'node2' });
      const restarted = new AddressRoutes(env.store, env.nodes, `/bin/sh ${script}`, silent);
      await restarted.start();
      await restarted.settled();
      restarted.stop();
      assert.deepEqual((await calls()).slice(want.length), [`198.19.128.1 ${node2}`], 'a restarted controller routes every address again');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('a leader whose first watch of the records the store refuses (its etcd member dead) still starts, and routes once the watch is made', async () => {
    const env = await setup('198.19.128.0/24');
    const dir = await mkdtemp(join(tmpdir(), 'chipmunk-address-routes-'));
    let refuse = true;
    const flaky = new Proxy(env.store, {
      get(target, prop) {
        if (prop === 'watch' && refuse) {
          refuse = false;
          return () => Promise.reject(new StoreFailedError('etcd: starting the watch on /containers/ failed: 14 UNAVAILABLE: connect ECONNREFUSED'));
        }
        const value: unknown = Reflect.get(target, prop, target);
        return typeof value === 'function' ? value.bind(target) : value;
      },
    });
    try {
      const log = join(dir, 'calls');
      const script = join(dir, 'route.sh');
      await writeFile(script, `echo "$*" >> ${log}\n`);
      const calls = async () => (await readFile(log, 'utf8').catch(() => '')).trim().split('\n').filter(Boolean);
      const routes = new AddressRoutes(flaky, env.nodes, `/bin/sh ${script}`, silent);
      await routes.start();
      await env.containers.run({ spec: spec('a'), node: 'node1' });
      const node1 = env.cluster.agent('node1').registration().address;
      for (let i = 0; i < 150 && (await calls()).length < 1; i++) await sleep(20);
      // The wait may have outlasted the nodes' one heartbeat (setup's).
      for (const node of ['node1', 'node2']) await env.nodes.heartbeat(env.cluster.agent(node).registration());
      await env.migrations.migrate('a', { to: 'node2' }, () => undefined);
      const node2 = env.cluster.agent('node2').registration().address;
      for (let i = 0; i < 150 && !(await calls()).includes(`198.19.128.1 ${node2}`); i++) await sleep(20);
      await routes.settled();
      routes.stop();
      assert.deepEqual(await calls(), [`198.19.128.1 ${node1}`, `198.19.128.1 ${node2}`], 'routed where it ran, then where it moved: the watch was made again');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
