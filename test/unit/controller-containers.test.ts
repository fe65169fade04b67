/**
 * ContainerService.run against fake agents: the name reserved first, the record written through
 * the container lock's compare-and-swap loop, so a write that comes in while the agent starts the
 * container (a protect) is kept instead of failing the run.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { ContainerSpec } from '../../src/shared/protocol.js';
import { ContainerLocks, containerKey, type ContainerRecord } from '../../src/controller/container-lock.js';
import { ContainerAddresses, parseContainerRange } from '../../src/controller/addresses.js';
import { ContainerService } from '../../src/controller/containers.js';
import { NodeRegistry } from '../../src/controller/registry.js';
import { MemoryStore } from '../../src/controller/store/index.js';
import { ConflictError } from '../../src/shared/errors.js';
import { FakeCluster } from '../fakes/agents.js';

function spec(name: string): ContainerSpec {
  return { name, image: 'counter', command: [], env: {}, ports: [], memoryBytes: 0 };
}

async function setup() {
  const store = new MemoryStore();
  const cluster = new FakeCluster();
  cluster.add('node1');
  const nodes = new NodeRegistry(store, 60_000);
  await nodes.heartbeat(cluster.agent('node1').registration());
  const locks = new ContainerLocks(store);
  // A /30: two addresses to hand out, so a released one is the next one given.
  const containers = new ContainerService(store, nodes, cluster.resolver, locks, new ContainerAddresses(store, parseContainerRange('198.19.128.0/30')));
  const record = async (name: string) => (await store.get<ContainerRecord>(containerKey(name)))?.value;
  return { store, cluster, nodes, locks, containers, record };
}

describe('containers: run', () => {
  it('keeps a write that came in while the agent started the container (no store conflict)', async () => {
    const env = await setup();
    const release = env.cluster.agent('node1').hold('run');
    const running = env.containers.run({ spec: spec('web'), node: 'node1' });
    while (!(await env.record('web'))) await new Promise((resolve) => setTimeout(resolve, 5));
    await env.locks.update('web', (current) => ({ ...current!, protection: { everyMs: 2_000 } }));
    release();
    const view = await running;
    assert.equal(view.status, 'running');
    const record = await env.record('web');
    assert.deepEqual([record?.status, record?.protection], ['running', { everyMs: 2_000 }]);
  });

  it('refuses a name in use, and removes its reservation when the agent refuses', async () => {
    const env = await setup();
    await env.containers.run({ spec: spec('web'), node: 'node1' });
    await assert.rejects(env.containers.run({ spec: spec('web'), node: 'node1' }), (err) => err instanceof ConflictError && /already in use \(on node node1\)/.test(err.message));
    await assert.rejects(env.containers.run({ spec: { ...spec('db'), image: 'missing/db' }, node: 'node1' }), /unknown image/);
    assert.equal(await env.record('db'), undefined);
  });

  it('says so when the container was removed while it started, and leaves no copy behind', async () => {
    const env = await setup();
    const release = env.cluster.agent('node1').hold('run');
    const running = env.containers.run({ spec: spec('web'), node: 'node1' });
    while (!(await env.record('web'))) await new Promise((resolve) => setTimeout(resolve, 5));
    await env.store.delete(containerKey('web'));
    release();
    await assert.rejects(running, (err) => err instanceof ConflictError && /was removed while it started/.test(err.message));
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(env.cluster.runningCopies('web'), 0);
  });

  it('a run whose container was removed while it started leaves the address alone once another container holds it', async () => {
    const env = await setup();
    const release = env.cluster.agent('node1').hold('run');
    const running = env.containers.run({ spec: spec('web'), node: 'node1' });
    while (!(await env.record('web'))) await new Promise((resolve) => setTimeout(resolve, 5));
    await env.containers.remove('web');
    env.cluster.add('node2');
    await env.nodes.heartbeat(env.cluster.agent('node2').registration());
    const db = await env.containers.run({ spec: spec('db'), node: 'node2' });
    assert.equal(db.address, '198.19.128.1', "web's address, released by its removal");
    release();
    await assert.rejects(running, /was removed while it started/);
    assert.equal((await env.store.get<{ container: string }>('/addresses/198.19.128.1'))?.value.container, 'db');
  });
});
