import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { InvalidInputError, StoreConflictError, StoreFailedError } from '../../src/shared/errors.js';
import type { StateStore, WatchEvent } from '../../src/controller/store/index.js';

/**
 * The behaviour every StateStore must have. Each implementation's test file calls
 * describeStoreContract with a factory for fresh, empty stores.
 */

export interface StoreFixture {
  store: StateStore;
  /** Closes the current store and opens the same data again. Only durable stores provide it. */
  reopen?: () => Promise<StateStore>;
  /** Closes whichever store is current and removes its data. */
  cleanup: () => Promise<void>;
  /** Keys the fixture itself put before the test (outside the test's prefixes), e.g. a leader's campaign key. */
  ownKeys?: number;
}

export interface StoreFixtureOptions {
  /** The store must retain exactly this many revisions of history for watches to replay. */
  historyRevisions?: number;
}

/** What sets a kind of store apart, where the contract allows it. */
export interface StoreTraits {
  /**
   * The tests' stores share one server (etcd: one revision counter and one compaction for every
   * namespace), so the tests run one at a time.
   */
  serial?: boolean;
  /** Lease TTLs are rounded up to a multiple of this (etcd: whole seconds). */
  leaseGranularityMs?: number;
  /** How long after its TTL a lease may still be ending (etcd's lessor looks every 500 ms). */
  leaseExpiryLagMs?: number;
  /**
   * A server outside the controller's process times the leases (etcd): they run on through a
   * stall or a restart of the controller, instead of being renewed as the local stores do.
   */
  serverLeases?: boolean;
}

export function describeStoreContract(name: string, makeStore: (opts: StoreFixtureOptions) => Promise<StoreFixture>, traits: StoreTraits = {}): void {
  /** The TTL a store grants for a request of `ms`. */
  const leaseTtl = (ms: number) => Math.ceil(ms / (traits.leaseGranularityMs ?? 1)) * (traits.leaseGranularityMs ?? 1);
  /** How long to wait, at most, for a lease of `ttlMs` to have ended. */
  const expiryWait = (ttlMs: number) => ttlMs + (traits.leaseExpiryLagMs ?? 0) + 2000;

  async function withStore(opts: StoreFixtureOptions, run: (fixture: StoreFixture) => Promise<void>): Promise<void> {
    const fixture = await makeStore(opts);
    try {
      await run(fixture);
    } finally {
      await fixture.cleanup();
    }
  }

  // Every test has its own store, so they run concurrently and the lease waits overlap.
  describe(`StateStore contract: ${name}`, { concurrency: !traits.serial }, () => {
    it('puts, gets and lists keys in byte order with their revisions', () =>
      withStore({}, async ({ store, ownKeys }) => {
        assert.equal(await store.get('/a/x'), undefined);
        const created = await store.put('/a/x', { n: 1 });
        await store.put('/a/\u{1F600}', 'emoji');
        await store.put('/a/\uFF5E', 'fullwidth tilde');
        await store.put('/a/B', [1, 'two']);
        await store.put('/ab', 'outside the /a/ prefix');
        const updated = await store.put('/a/x', { n: 2 });

        assert.deepEqual(await store.get('/a/x'), { key: '/a/x', value: { n: 2 }, createRevision: created, modRevision: updated, version: 2 });
        // UTF-8 byte order, as etcd sorts: U+FF5E before U+1F600 (JS's default UTF-16 order has them the other way round).
        assert.deepEqual(
          (await store.list('/a/')).map((kv) => [kv.key, kv.value]),
          [
            ['/a/B', [1, 'two']],
            ['/a/x', { n: 2 }],
            ['/a/\uFF5E', 'fullwidth tilde'],
            ['/a/\u{1F600}', 'emoji'],
          ],
        );
        assert.equal((await store.list('')).length, 5 + (ownKeys ?? 0));
        assert.deepEqual(await store.list('/nothing/'), []);

        const read = await store.get<{ n: number }>('/a/x');
        read!.value.n = 99;
        assert.deepEqual((await store.get('/a/x'))?.value, { n: 2 }, 'changing a value read from the store must not change the store');
      }));

    it('advances the revision by one per write, and not for reads, lease calls or deletes of absent keys', () =>
      withStore({}, async ({ store }) => {
        const start = await store.currentRevision();
        const first = await store.put('/r/a', 1);
        assert.equal(first, start + 1);
        const second = await store.put('/r/b', 1);
        assert.equal(second, first + 1);
        await store.get('/r/a');
        await store.list('/r/');
        assert.equal(await store.delete('/r/absent'), false);
        assert.deepEqual(await store.txn({ compare: [], ops: [{ type: 'delete', key: '/r/absent' }] }), { succeeded: true, revision: second });
        await store.keepAlive(await store.grantLease(10_000));
        await store.revokeLease(await store.grantLease(10_000)); // a lease without keys: nothing to delete
        assert.equal(await store.currentRevision(), second);
        assert.equal(await store.delete('/r/a'), true);
        assert.equal(await store.currentRevision(), second + 1);
      }));

    it('puts with compare-and-swap, including create-if-absent', () =>
      withStore({}, async ({ store }) => {
        const created = await store.put('/cas', 'v1', { expectModRevision: 0 });
        await assert.rejects(
          store.put('/cas', 'again', { expectModRevision: 0 }),
          (err) => err instanceof StoreConflictError && err.details.expected === 0 && err.details.actual === created,
        );
        const updated = await store.put('/cas', 'v2', { expectModRevision: created });
        await assert.rejects(
          store.put('/cas', 'stale', { expectModRevision: created }),
          (err) => err instanceof StoreConflictError && err.details.actual === updated,
        );
        await assert.rejects(store.put('/cas-absent', 'x', { expectModRevision: updated }), (err) => err instanceof StoreConflictError && err.details.actual === 0);

        assert.deepEqual(await store.get('/cas'), { key: '/cas', value: 'v2', createRevision: created, modRevision: updated, version: 2 });
        assert.equal(await store.get('/cas-absent'), undefined);
        assert.equal(await store.currentRevision(), updated, 'failed compare-and-swaps must not take a revision');
      }));

    it('deletes with and without compare-and-swap', () =>
      withStore({}, async ({ store }) => {
        const first = await store.put('/d', 'v');
        await assert.rejects(store.delete('/d', { expectModRevision: first + 100 }), StoreConflictError);
        await assert.rejects(store.delete('/d', { expectModRevision: 0 }), StoreConflictError);
        assert.equal((await store.get('/d'))?.value, 'v');

        assert.equal(await store.delete('/d', { expectModRevision: first }), true);
        assert.equal(await store.get('/d'), undefined);
        assert.equal(await store.delete('/d'), false);

        const recreated = await store.put('/d', 'again');
        assert.deepEqual(await store.get('/d'), { key: '/d', value: 'again', createRevision: recreated, modRevision: recreated, version: 1 });
      }));

    it('applies a txn all-or-nothing at a single revision', () =>
      withStore({}, async ({ store }) => {
        const a = await store.put('/t/a', 1);
        await store.put('/t/c', 'doomed');

        const applied = await store.txn({
          compare: [
            { key: '/t/a', modRevision: a },
            { key: '/t/b', modRevision: 0 },
          ],
          ops: [
            { type: 'put', key: '/t/a', value: 2 },
            { type: 'put', key: '/t/b', value: 'new' },
            { type: 'delete', key: '/t/c' },
          ],
        });
        assert.deepEqual(applied, { succeeded: true, revision: a + 2 });
        assert.equal(await store.currentRevision(), applied.revision);
        assert.deepEqual(
          (await store.list('/t/')).map((kv) => [kv.key, kv.value, kv.modRevision]),
          [
            ['/t/a', 2, applied.revision],
            ['/t/b', 'new', applied.revision],
          ],
        );

        // The first compare holds and the second does not (/t/b exists now): nothing may happen.
        const before = await store.list('/t/');
        const refused = await store.txn({
          compare: [
            { key: '/t/a', modRevision: applied.revision },
            { key: '/t/b', modRevision: 0 },
          ],
          ops: [
            { type: 'put', key: '/t/a', value: 3 },
            { type: 'delete', key: '/t/b' },
          ],
        });
        assert.deepEqual(refused, { succeeded: false, revision: applied.revision });
        assert.deepEqual(await store.list('/t/'), before);

        await assert.rejects(
          store.txn({ compare: [], ops: [{ type: 'put', key: '/t/a', value: 4 }, { type: 'delete', key: '/t/a' }] }),
          InvalidInputError,
        );
        assert.deepEqual(await store.list('/t/'), before);
      }));

    it('lets exactly one of racing compare-and-swaps win, and loses no increment of racing read-modify-write loops', () =>
      withStore({}, async ({ store }) => {
        const start = await store.put('/race/n', 0);
        const puts = await Promise.allSettled(Array.from({ length: 8 }, (_, i) => store.put('/race/n', i + 1, { expectModRevision: start })));
        const won = puts.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
        assert.equal(won.length, 1, 'exactly one put may win');
        for (const r of puts) {
          if (r.status === 'rejected') assert.ok(r.reason instanceof StoreConflictError && r.reason.details.actual === won[0], String(r.reason));
        }

        const txns = await Promise.all(
          Array.from({ length: 8 }, (_, i) =>
            store.txn({
              compare: [{ key: '/race/n', modRevision: won[0] }],
              ops: [
                { type: 'put', key: '/race/n', value: -i },
                { type: 'put', key: `/race/winner/${i}`, value: i },
              ],
            }),
          ),
        );
        assert.equal(txns.filter((t) => t.succeeded).length, 1, 'exactly one txn may win');
        assert.equal((await store.list('/race/winner/')).length, 1);

        await store.put('/race/counter', 0);
        const increment = async () => {
          for (;;) {
            const kv = await store.get<number>('/race/counter');
            try {
              return await store.put('/race/counter', kv!.value + 1, { expectModRevision: kv!.modRevision });
            } catch (err) {
              if (!(err instanceof StoreConflictError)) throw err;
            }
          }
        };
        await Promise.all(
          Array.from({ length: 5 }, async () => {
            for (let i = 0; i < 5; i++) await increment();
          }),
        );
        const counter = await store.get<number>('/race/counter');
        assert.deepEqual([counter?.value, counter?.version], [25, 26]);
      }));

    it('delivers every change of racing writers to watches, once each and in revision order', () =>
      withStore({}, async ({ store }) => {
        const replayed = recordEvents();
        const live = recordEvents();
        await store.watch('/order/', { fromRevision: (await store.currentRevision()) + 1 }, replayed.onEvent);
        await store.watch('/order/', {}, live.onEvent);
        const putRevisions: number[] = [];
        let deletes = 0;
        await Promise.all(
          Array.from({ length: 4 }, async (_, writer) => {
            for (let i = 0; i < 12; i++) {
              const key = `/order/${writer}/${i % 3}`;
              if (i % 4 === 3) {
                if (await store.delete(key)) deletes++;
              } else {
                putRevisions.push(await store.put(key, { writer, i }));
              }
            }
          }),
        );
        const changes = putRevisions.length + deletes;
        await replayed.until(changes);
        await live.until(changes);
        assert.deepEqual(summarise(live.events), summarise(replayed.events));
        const revisions = replayed.events.map((ev) => ev.revision);
        assert.deepEqual(revisions, [...revisions].sort((a, b) => a - b), 'events come in revision order');
        assert.equal(new Set(revisions).size, revisions.length, 'each write is one event, delivered once');
        assert.equal(revisions.length, changes);
        for (const rev of putRevisions) assert.ok(revisions.includes(rev), `the put at revision ${rev} was delivered`);

        // Applying the events in order gives what the store holds.
        const state = new Map<string, unknown>();
        for (const ev of replayed.events) {
          if (ev.type === 'put') state.set(ev.kv.key, ev.kv.value);
          else state.delete(ev.kv.key);
        }
        assert.deepEqual([...state].sort(), (await store.list('/order/')).map((kv) => [kv.key, kv.value]).sort());
      }));

    it('delivers watch events for its prefix in revision order', () =>
      withStore({}, async ({ store }) => {
        const seen = recordEvents();
        const watch = await store.watch('/w/', {}, seen.onEvent);
        const first = await store.put('/w/a', 1);
        await store.put('/elsewhere', 'ignored');
        const second = await store.put('/w/a', 2);
        const txn = await store.txn({ compare: [], ops: [{ type: 'put', key: '/w/b', value: 'b' }, { type: 'delete', key: '/w/a' }] });
        await seen.until(4);
        watch.cancel();

        assert.deepEqual(summarise(seen.events), [`put /w/a@${first}`, `put /w/a@${second}`, `put /w/b@${txn.revision}`, `delete /w/a@${txn.revision}`]);
        const [created, overwritten, , deleted] = seen.events;
        assert.equal(created.type === 'put' && created.prevKv, undefined, 'a put that creates the key has no prevKv');
        assert.ok(overwritten.type === 'put');
        assert.deepEqual([overwritten.kv.value, overwritten.kv.modRevision, overwritten.prevKv?.value], [2, second, 1]);
        assert.deepEqual([deleted.kv.value, deleted.kv.modRevision], [2, second], 'a delete event carries the last value');
      }));

    it('replays history from fromRevision, then continues live without gaps or repeats', () =>
      withStore({}, async ({ store }) => {
        await store.put('/h/a', 1);
        const second = await store.put('/h/b', 1);
        const third = await store.put('/h/a', 2);
        const replayed = recordEvents();
        const live = recordEvents();
        await store.watch('/h/', { fromRevision: second }, replayed.onEvent);
        await store.watch('/h/', {}, live.onEvent);
        await store.delete('/h/b');
        const fifth = await store.put('/h/c', 3);
        await replayed.until(4);
        await live.until(2);

        assert.deepEqual(summarise(replayed.events), [`put /h/b@${second}`, `put /h/a@${third}`, `delete /h/b@${third + 1}`, `put /h/c@${fifth}`]);
        assert.deepEqual(summarise(live.events), [`delete /h/b@${third + 1}`, `put /h/c@${fifth}`]);
      }));

    it('stops delivering on cancel, including events already queued', () =>
      withStore({}, async ({ store }) => {
        const cancelled = recordEvents();
        const control = recordEvents();
        const watch = await store.watch('/c/', {}, cancelled.onEvent);
        await store.watch('/c/', {}, control.onEvent);
        await store.put('/c/a', 1);
        await cancelled.until(1);

        const writing = store.put('/c/b', 2);
        watch.cancel();
        await writing;
        await store.put('/c/a', 3);
        await control.until(3);
        assert.deepEqual(summarise(cancelled.events), summarise(control.events.slice(0, 1)));
      }));

    it('refuses a watch from compacted history and says to list again', () =>
      withStore({ historyRevisions: 3 }, async ({ store }) => {
        const revisions: number[] = [];
        for (let i = 0; i < 6; i++) revisions.push(await store.put(`/k/${i}`, i));
        await assert.rejects(
          store.watch('/k/', { fromRevision: revisions[0] }, () => {}),
          (err) => err instanceof StoreFailedError && /compacted/.test(err.message) && /list/.test(err.message),
        );
        await assert.rejects(store.watch('/k/', { fromRevision: revisions[2] }, () => {}), StoreFailedError);

        const retained = recordEvents();
        await store.watch('/k/', { fromRevision: revisions[3] }, retained.onEvent);
        await retained.until(3);
        assert.deepEqual(summarise(retained.events), revisions.slice(3).map((rev, i) => `put /k/${i + 3}@${rev}`));
      }));

    it("deletes a lease's keys, with delete events, when it expires", () =>
      withStore({}, async ({ store }) => {
        const granted = Date.now();
        const ttl = leaseTtl(150);
        const lease = await store.grantLease(150);
        await store.put('/l/a', 1, { lease });
        await store.put('/l/b', 2, { lease });
        await store.put('/l/kept', 3);
        assert.equal((await store.get('/l/a'))?.lease, lease);
        const seen = recordEvents();
        await store.watch('/l/', {}, seen.onEvent);

        await waitFor(async () => (await store.get('/l/a')) === undefined, 'the leased key to expire', expiryWait(ttl));
        assert.ok(Date.now() - granted >= ttl - 10, `the lease ended after ${Date.now() - granted} ms, before its ${ttl} ms TTL`);
        await seen.until(2);
        const expiry = await store.currentRevision();
        assert.deepEqual(summarise(seen.events).sort(), [`delete /l/a@${expiry}`, `delete /l/b@${expiry}`]);
        assert.deepEqual((await store.list('/l/')).map((kv) => kv.key), ['/l/kept']);

        await assert.rejects(store.keepAlive(lease), (err) => err instanceof StoreFailedError && /lease .* not found/.test(err.message));
        await assert.rejects(store.put('/l/c', 1, { lease }), StoreFailedError);
      }));

    it('keeps a lease alive while keepAlive is called', () =>
      withStore({}, async ({ store }) => {
        const ttl = leaseTtl(200);
        const lease = await store.grantLease(200);
        await store.put('/ka/a', 1, { lease });
        for (let i = 0; i < 3; i++) {
          await sleep(ttl / 2);
          await store.keepAlive(lease);
        }
        assert.ok(await store.get('/ka/a'), 'the key must outlive the TTL while the lease is kept alive');
        await waitFor(async () => (await store.get('/ka/a')) === undefined, 'the key to expire after keep-alives stop', expiryWait(ttl));
      }));

    it('does not end a lease for the time its own process was stalled: keep-alives were waiting, not missing', { skip: traits.serverLeases && 'the lease server runs in its own process' }, () =>
      withStore({}, async ({ store }) => {
        const lease = await store.grantLease(300);
        await store.put('/stall/a', 1, { lease });
        await sleep(150);
        // A long synchronous step in this process (what a big commit can be): no keep-alive can arrive meanwhile.
        const until = Date.now() + 700;
        while (Date.now() < until) {
          // busy
        }
        await store.keepAlive(lease);
        assert.ok(await store.get('/stall/a'), 'the lease outlived a stall longer than its TTL');
        await waitFor(async () => (await store.get('/stall/a')) === undefined, 'the key to expire once keep-alives stop');
      }));

    it('revokes a lease at once, deleting only its keys', () =>
      withStore({}, async ({ store }) => {
        const lease = await store.grantLease(10_000);
        await store.put('/rv/a', 1, { lease });
        await store.put('/rv/b', 2, { lease });
        await store.put('/rv/detached', 3, { lease });
        await store.put('/rv/detached', 4); // a put without a lease detaches the key from it
        const seen = recordEvents();
        await store.watch('/rv/', {}, seen.onEvent);

        await store.revokeLease(lease);
        assert.deepEqual((await store.list('/rv/')).map((kv) => [kv.key, kv.value, kv.lease]), [['/rv/detached', 4, undefined]]);
        await seen.until(2);
        assert.deepEqual(seen.events.map((ev) => `${ev.type} ${ev.kv.key}`).sort(), ['delete /rv/a', 'delete /rv/b']);
        await assert.rejects(store.revokeLease(lease), StoreFailedError);
        await assert.rejects(store.keepAlive(lease), StoreFailedError);
      }));

    it('keeps keys, revisions and history across reopen', async (t) => {
      await withStore({}, async ({ store, reopen }) => {
        if (!reopen) return t.skip('not a durable store');
        const first = await store.put('/p/a', { n: 1 });
        await store.put('/p/b', 'b');
        await store.put('/p/a', { n: 2 });
        await store.delete('/p/b');
        const before = await store.list('');
        const revision = await store.currentRevision();

        const reopened = await reopen();
        assert.deepEqual(await reopened.list(''), before);
        assert.equal(await reopened.currentRevision(), revision);
        assert.equal(await reopened.put('/p/c', 3), revision + 1, 'revisions continue after reopen');

        const replayed = recordEvents();
        await reopened.watch('/p/', { fromRevision: first }, replayed.onEvent);
        await replayed.until(5);
        assert.deepEqual(summarise(replayed.events), [
          `put /p/a@${first}`,
          `put /p/b@${first + 1}`,
          `put /p/a@${first + 2}`,
          `delete /p/b@${first + 3}`,
          `put /p/c@${revision + 1}`,
        ]);
      });
    });

    it('renews leases from the time it reopens', { skip: traits.serverLeases && 'the lease server times leases on through a reopen' }, async (t) => {
      await withStore({}, async ({ store, reopen }) => {
        if (!reopen) return t.skip('not a durable store');
        const lease = await store.grantLease(300);
        await store.put('/pl/a', 1, { lease });
        const revoked = await store.grantLease(300);
        await store.put('/pl/revoked', 1, { lease: revoked });
        await store.revokeLease(revoked);
        await sleep(200);

        const reopened = await reopen();
        await sleep(150); // past the lease's original deadline, within the renewed one
        assert.equal((await reopened.get('/pl/a'))?.lease, lease, 'a reopened store must not expire leases on their old deadlines');
        assert.equal(await reopened.get('/pl/revoked'), undefined);
        await assert.rejects(reopened.keepAlive(revoked), StoreFailedError);
        await waitFor(async () => (await reopened.get('/pl/a')) === undefined, 'the renewed lease to expire');
      });
    });
  });
}

function recordEvents(): { events: WatchEvent[]; onEvent: (ev: WatchEvent) => void; until: (count: number) => Promise<void> } {
  const events: WatchEvent[] = [];
  return {
    events,
    onEvent: (ev) => events.push(ev),
    until: (count) => waitFor(() => events.length >= count, () => `${count} watch events (got: ${summarise(events).join(', ')})`),
  };
}

function summarise(events: WatchEvent[]): string[] {
  return events.map((ev) => `${ev.type} ${ev.kv.key}@${ev.revision}`);
}

async function waitFor(condition: () => boolean | Promise<boolean>, what: string | (() => string), timeoutMs = 2000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) assert.fail(`timed out after ${timeoutMs} ms waiting for ${typeof what === 'string' ? what : what()}`);
    await sleep(5);
  }
}
