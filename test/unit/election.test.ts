import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { Election, type Leader } from '../../src/controller/election.js';
import { MemoryStore, type StateStore } from '../../src/controller/store/index.js';
import { StoreFailedError } from '../../src/shared/errors.js';
import { waitFor } from '../support/wait.js';

/** A candidate with a record of the leaders it saw. */
function candidate(store: StateStore, id: string, ttlMs = 600, marginMs?: number) {
  const seen: (Leader | undefined)[] = [];
  /** When (performance.now()) each of `seen` was told. */
  const at: number[] = [];
  const onChange = (leader: Leader | undefined) => {
    seen.push(leader);
    at.push(performance.now());
  };
  return { election: new Election({ store, candidate: { id, url: `http://${id}` }, ttlMs, marginMs, onChange }), seen, at };
}

/** Keep-alives that can be made to hang, as they do when the store is out of reach. */
function hangableKeepAlives(store: StateStore): { store: StateStore; hang: () => void; unhang: () => void } {
  let hanging = false;
  const wrapped = new Proxy(store, {
    get(target, prop) {
      if (prop === 'keepAlive') return (lease: string) => (hanging ? new Promise<void>(() => {}) : target.keepAlive(lease));
      const value: unknown = Reflect.get(target, prop, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
  return { store: wrapped, hang: () => (hanging = true), unhang: () => (hanging = false) };
}

describe('Election (on the memory store)', () => {
  it('makes the only candidate leader, with its campaign key as term and fence', async () => {
    const store = new MemoryStore();
    const a = candidate(store, 'a');
    try {
      await a.election.start();
      const term = a.election.term();
      assert.ok(term !== undefined, 'the only candidate leads');
      const [key] = await store.list('/election/controller/');
      assert.deepEqual([key.createRevision, key.value], [term, { id: 'a', url: 'http://a' }]);
      assert.deepEqual(a.election.currentLeader(), { id: 'a', url: 'http://a', term });
      assert.deepEqual(a.seen, [{ id: 'a', url: 'http://a', term }]);

      const fence = a.election.fence()!;
      assert.equal((await store.txn({ compare: [fence], ops: [{ type: 'put', key: '/x', value: 1 }] })).succeeded, true);
      await a.election.resign();
      assert.equal(a.election.term(), undefined);
      assert.equal((await store.txn({ compare: [fence], ops: [{ type: 'put', key: '/x', value: 2 }] })).succeeded, false, 'a resigned term fences nothing in');
    } finally {
      await a.election.close();
      await store.close();
    }
  });

  it('hands leadership on when the leader resigns or closes: one leader at a time, terms growing; every candidate knows the others', async () => {
    const store = new MemoryStore();
    const [a, b, c] = ['a', 'b', 'c'].map((id) => candidate(store, id));
    try {
      await a.election.start();
      await b.election.start();
      await c.election.start();
      const first = a.election.term()!;
      await waitFor(() => b.election.currentLeader()?.id === 'a' && c.election.currentLeader()?.id === 'a', 2000, 'b and c to see a lead');
      assert.equal(b.election.term(), undefined);
      assert.deepEqual([a.election.heldTerm(), b.election.heldTerm()], [first, undefined], 'only a term that led is held');
      assert.equal(c.election.term(), undefined);

      assert.deepEqual(c.election.known().map((k) => k.id), ['a', 'b', 'c'], 'every candidate, oldest campaign first');
      await a.election.close();
      await waitFor(() => c.election.known().length === 2, 2000, 'c to see a go');
      assert.deepEqual(c.election.known().map((k) => k.id), ['b', 'c']);
      await waitFor(() => b.election.term(), 2000, 'b to lead');
      const second = b.election.term()!;
      assert.ok(second > first, `term ${second} after ${first}`);
      assert.equal(b.election.heldTerm(), second);
      await waitFor(() => c.election.currentLeader()?.id === 'b', 2000, 'c to see b lead');
      assert.equal(c.election.term(), undefined);

      await b.election.resign();
      await waitFor(() => c.election.term(), 2000, 'c to lead');
      assert.ok(c.election.term()! > second);
      await waitFor(() => b.election.currentLeader()?.id === 'c', 2000, 'b, campaigning again, to see c lead');
    } finally {
      for (const x of [a, b, c]) await x.election.close();
      await store.close();
    }
  });

  it('steps down before its lease can expire when keep-alives stop succeeding, and another takes over', async () => {
    const store = new MemoryStore();
    const cut = hangableKeepAlives(store);
    const ttlMs = 800;
    const a = candidate(cut.store, 'a', ttlMs);
    const b = candidate(store, 'b', ttlMs);
    try {
      await a.election.start();
      await b.election.start();
      const term = a.election.term()!;
      let expiredAt = 0;
      await store.watch('/election/', {}, (ev) => {
        if (ev.type === 'delete' && ev.kv.createRevision === term) expiredAt = performance.now();
      });
      await sleep(300); // keep-alives have been succeeding
      cut.hang();
      const cutAt = performance.now();
      await waitFor(() => a.seen.length >= 2, 2000, 'a to tell it stepped down');
      assert.equal(a.seen[1], undefined, 'a tells that it no longer leads');
      const steppedDownAt = a.at[1];
      assert.equal(a.election.term(), undefined);
      await waitFor(() => expiredAt, 3000, "a's lease to expire in the store");
      assert.ok(steppedDownAt < expiredAt, `a stepped down ${Math.round(steppedDownAt - cutAt)} ms after the cut, its lease expired ${Math.round(expiredAt - cutAt)} ms after`);
      await waitFor(() => b.election.term(), 2000, 'b to lead');
      assert.ok(b.election.term()! > term);
      assert.equal(a.election.heldTerm(), term, 'a deposed leader still holds the term its work was begun under');
    } finally {
      await a.election.close();
      await b.election.close();
      await store.close();
    }
  });

  it('campaigns again when its campaign key is deleted while its lease lives on', async () => {
    const store = new MemoryStore();
    const a = candidate(store, 'a');
    try {
      await a.election.start();
      const first = a.election.term()!;
      const [key] = await store.list('/election/controller/');
      await store.delete(key.key);
      await waitFor(() => (a.election.term() ?? 0) > first, 2000, 'a to lead again under a new term');
    } finally {
      await a.election.close();
      await store.close();
    }
  });

  it('leads again under the same term when a keep-alive gets through before its lease ended', async () => {
    const store = new MemoryStore();
    const cut = hangableKeepAlives(store);
    // Steps down 500 ms after the last keep-alive that got through; the lease lasts 1000 ms.
    const a = candidate(cut.store, 'a', 1000, 500);
    const b = candidate(store, 'b', 1000, 500);
    try {
      await a.election.start();
      await b.election.start();
      const term = a.election.term()!;
      cut.hang();
      await waitFor(() => a.seen.length >= 2, 2000, 'a to step down');
      assert.equal(a.seen[1], undefined);
      assert.equal(a.election.currentLeader(), undefined, 'a is not sure anyone leads');
      cut.unhang();
      await waitFor(() => a.election.term(), 1000, 'a to lead again');
      assert.equal(a.election.term(), term, 'under the same term: its key never went');
      assert.deepEqual(a.seen, [{ id: 'a', url: 'http://a', term }, undefined, { id: 'a', url: 'http://a', term }]);
      assert.ok(!b.seen.some((leader) => leader?.id === 'b'), 'b never led');
    } finally {
      await a.election.close();
      await b.election.close();
      await store.close();
    }
  });

  it("rides out store calls that fail at start (a controller revived with its host, its etcd member still rejoining): start() waits, then it leads", async () => {
    const store = new MemoryStore();
    // The first watch and the first lease grant fail, as they did against a member still catching up.
    const failing = new Set(['watch', 'grantLease']);
    const flaky = new Proxy(store, {
      get(target, prop) {
        if (typeof prop === 'string' && failing.has(prop)) {
          failing.delete(prop);
          return () => Promise.reject(new StoreFailedError(`etcd: starting the ${prop} failed: etcd did not create the watch within 5000 ms`));
        }
        const value: unknown = Reflect.get(target, prop, target);
        return typeof value === 'function' ? value.bind(target) : value;
      },
    });
    const errors: unknown[] = [];
    const a = new Election({ store: flaky, candidate: { id: 'a', url: 'http://a' }, ttlMs: 600, onError: (err) => errors.push(err) });
    try {
      await a.start();
      assert.ok(a.term() !== undefined, 'it leads once the store answers');
      assert.equal(errors.length, 2, 'each failure was reported');
      const [key] = await store.list('/election/controller/');
      await store.delete(key.key);
      await waitFor(() => a.term() !== undefined && a.term() !== key.createRevision, 2000, 'its watch works: a deleted key is noticed and it campaigns again');
    } finally {
      await a.close();
      await store.close();
    }
  });
});
