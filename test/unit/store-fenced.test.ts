import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { NotLeaderError, StoreConflictError } from '../../src/shared/errors.js';
import { FencedStore } from '../../src/controller/store/fenced.js';
import { MemoryStore, type TxnCompare } from '../../src/controller/store/index.js';
import { describeStoreContract } from '../contract/store.contract.js';

// While the fence holds, a leader's view is a StateStore like any other.
describeStoreContract('FencedStore over MemoryStore, while leading', async (opts) => {
  const inner = new MemoryStore(opts);
  const term = await inner.put('/election/controller/1', { id: 'me' });
  return { store: new FencedStore(inner, () => ({ key: '/election/controller/1', modRevision: term })), cleanup: () => inner.close(), ownKeys: 1 };
});

/** A memory store with a leader's campaign key; `fence` is what the election would hand out. */
async function fenced() {
  const inner = new MemoryStore();
  const term = await inner.put('/election/controller/1', { id: 'me' });
  let fence: TxnCompare | undefined = { key: '/election/controller/1', modRevision: term };
  const store = new FencedStore(inner, () => fence);
  return {
    inner,
    store,
    /** The election says this controller no longer leads. */
    stepDown: () => (fence = undefined),
    /** The campaign key went (its lease ended) while this controller still took itself for the leader. */
    loseKey: () => inner.delete('/election/controller/1'),
  };
}

describe('FencedStore', () => {
  it('writes while the fence holds, with the usual compare-and-swap answers', async () => {
    const { inner, store } = await fenced();
    const created = await store.put('/k', 1, { expectModRevision: 0 });
    assert.deepEqual((await inner.get('/k'))?.value, 1);
    await assert.rejects(store.put('/k', 2, { expectModRevision: 0 }), (err) => err instanceof StoreConflictError && err.details.actual === created);
    const updated = await store.put('/k', 2);
    assert.equal(updated, created + 1);
    await assert.rejects(store.delete('/k', { expectModRevision: created }), (err) => err instanceof StoreConflictError && err.details.actual === updated);
    assert.equal(await store.delete('/absent'), false);
    assert.equal(await store.delete('/k'), true);
    assert.equal(await inner.get('/k'), undefined);
    const refused = await store.txn({ compare: [{ key: '/k', modRevision: 99 }], ops: [{ type: 'put', key: '/t', value: 1 }] });
    assert.equal(refused.succeeded, false, "a txn's own compare failing is an answer, not an error");
    assert.equal((await store.txn({ compare: [], ops: [{ type: 'put', key: '/t', value: 1 }] })).succeeded, true);
  });

  it('refuses every write once the controller stepped down, writing nothing', async () => {
    const { inner, store, stepDown } = await fenced();
    await store.put('/k', 1);
    stepDown();
    const before = await inner.currentRevision();
    for (const write of [() => store.put('/k', 2), () => store.delete('/k'), () => store.txn({ compare: [], ops: [{ type: 'delete', key: '/k' }] })]) {
      await assert.rejects(write(), (err) => err instanceof NotLeaderError && /does not lead/.test(err.message));
    }
    assert.equal(await inner.currentRevision(), before);
    assert.deepEqual((await store.get('/k'))?.value, 1, 'reads go on');
  });

  it('refuses a write whose term ended before it got through, though the controller still took itself for the leader', async () => {
    const { inner, store, loseKey } = await fenced();
    const k = await store.put('/k', 1);
    await loseKey();
    const before = await inner.currentRevision();
    for (const write of [
      () => store.put('/k', 2),
      () => store.put('/k', 2, { expectModRevision: k }),
      () => store.delete('/k'),
      () => store.txn({ compare: [], ops: [{ type: 'put', key: '/new', value: 1 }] }),
    ]) {
      await assert.rejects(write(), (err) => err instanceof NotLeaderError && /term \d+ ended/.test(err.message));
    }
    assert.equal(await inner.currentRevision(), before, 'nothing was written');
  });
});
