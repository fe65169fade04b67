// The node registry's heartbeat (src/controller/registry.ts): it keeps the node's liveness lease
// before anything else, and writes the node's record only when it changed or once per lease, not
// at every heartbeat (each write, with etcd, is a commit synced to disk on a majority).
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { NodeRegistry } from '../../src/controller/registry.js';
import { MemoryStore, type StateStore } from '../../src/controller/store/index.js';
import type { RegisterNodeRequest } from '../../src/shared/protocol.js';

const node1: RegisterNodeRequest = { name: 'node1', address: '198.18.0.11', url: 'http://198.18.0.11:7401', capabilities: { lazyMigration: true, softDirty: false, cgroupMode: 'v2' } };

/** The store, recording the order of the calls a heartbeat makes. */
function recorded(store: StateStore): { store: StateStore; calls: string[] } {
  const calls: string[] = [];
  const wrapped = new Proxy(store, {
    get(target, prop) {
      const value: unknown = Reflect.get(target, prop, target);
      if (typeof value !== 'function') return value;
      return (...args: unknown[]) => {
        if (prop === 'put') calls.push(`put ${String(args[0])}`);
        if (prop === 'keepAlive' || prop === 'grantLease') calls.push(String(prop));
        return (value as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
  return { store: wrapped, calls };
}

describe('NodeRegistry heartbeats', () => {
  it('keep the liveness lease first, and write the record only when it changed', async () => {
    const memory = new MemoryStore();
    const { store, calls } = recorded(memory);
    const registry = new NodeRegistry(store, 5_000);
    try {
      await registry.heartbeat(node1);
      assert.deepEqual(calls, ['grantLease', 'put /liveness/node1', 'put /nodes/node1'], 'the first: a lease and its key, then the record');
      calls.length = 0;
      await registry.heartbeat(node1);
      await registry.heartbeat(node1);
      assert.deepEqual(calls, ['keepAlive', 'keepAlive'], 'the same node within a lease: keep-alives only');
      assert.equal((await registry.list())[0]?.status, 'ready');

      calls.length = 0;
      await registry.heartbeat({ ...node1, address: '198.18.0.21', url: 'http://198.18.0.21:7401' });
      assert.deepEqual(calls, ['keepAlive', 'put /nodes/node1'], 'a changed record is written at once');
      assert.equal((await registry.get('node1'))?.address, '198.18.0.21');
    } finally {
      await memory.close();
    }
  });

  it('write the record again once a lease has passed since the last write (lastSeen)', async () => {
    const memory = new MemoryStore();
    const { store, calls } = recorded(memory);
    const registry = new NodeRegistry(store, 300);
    try {
      await registry.heartbeat(node1);
      const first = (await registry.get('node1'))!.lastSeen;
      await sleep(350);
      calls.length = 0;
      await registry.heartbeat(node1);
      // The lease of 300 ms ran out meanwhile, so it may be granted anew: either way, first.
      assert.ok(['keepAlive', 'grantLease'].includes(calls[0]!), `the lease first: ${calls.join(', ')}`);
      assert.equal(calls.at(-1), 'put /nodes/node1');
      assert.ok((await registry.get('node1'))!.lastSeen > first);
    } finally {
      await memory.close();
    }
  });
});
