import { NotLeaderError, StoreConflictError } from '../../shared/errors.js';
import type { DeleteOptions, KeyValue, PutOptions, StateStore, Txn, TxnCompare, TxnResult, Watch, WatchEvent, WatchOptions } from './types.js';

/**
 * The state store as a leader writes it: every write carries the leader's fence (its campaign
 * key's compare, election.ts) in the same transaction, so a write of a controller whose leadership
 * ended, even one sent just before it ended, changes nothing and fails with NotLeaderError. A
 * write while this controller does not lead at all fails at once. Reads, watches and leases pass
 * through unchanged.
 */
export class FencedStore implements StateStore {
  /**
   * @param fence the compare that holds while this controller leads; undefined while it does not.
   */
  constructor(
    private readonly inner: StateStore,
    private readonly fence: () => TxnCompare | undefined,
  ) {}

  currentRevision(): Promise<number> {
    return this.inner.currentRevision();
  }

  get<T = unknown>(key: string): Promise<KeyValue<T> | undefined> {
    return this.inner.get<T>(key);
  }

  list<T = unknown>(prefix: string): Promise<KeyValue<T>[]> {
    return this.inner.list<T>(prefix);
  }

  async put(key: string, value: unknown, opts: PutOptions = {}): Promise<number> {
    const fence = this.currentFence(`put ${key}`);
    const expected = opts.expectModRevision;
    const res = await this.inner.txn({
      compare: [fence, ...(expected !== undefined ? [{ key, modRevision: expected }] : [])],
      ops: [{ type: 'put', key, value, ...(opts.lease !== undefined ? { lease: opts.lease } : {}) }],
    });
    if (res.succeeded) return res.revision;
    return this.refused(fence, `put ${key}`, key, expected);
  }

  async delete(key: string, opts: DeleteOptions = {}): Promise<boolean> {
    for (;;) {
      const fence = this.currentFence(`delete ${key}`);
      // The key's own compare tells whether it existed, which a txn's answer does not.
      const expected = opts.expectModRevision ?? (await this.inner.get(key))?.modRevision ?? 0;
      const res = await this.inner.txn({ compare: [fence, { key, modRevision: expected }], ops: [{ type: 'delete', key }] });
      if (res.succeeded) return expected !== 0;
      // Without an expected revision the key only changed between the read and the delete: read again.
      if (opts.expectModRevision !== undefined || !(await this.holds(fence))) return this.refused(fence, `delete ${key}`, key, opts.expectModRevision);
    }
  }

  async txn(txn: Txn): Promise<TxnResult> {
    const fence = this.currentFence('a transaction');
    const res = await this.inner.txn({ compare: [...txn.compare, fence], ops: txn.ops });
    if (!res.succeeded && !(await this.holds(fence))) throw this.notLeader('a transaction', fence);
    return res;
  }

  watch<T = unknown>(prefix: string, opts: WatchOptions, onEvent: (ev: WatchEvent<T>) => void): Promise<Watch> {
    return this.inner.watch(prefix, opts, onEvent);
  }

  grantLease(ttlMs: number): Promise<string> {
    return this.inner.grantLease(ttlMs);
  }

  keepAlive(leaseId: string): Promise<void> {
    return this.inner.keepAlive(leaseId);
  }

  revokeLease(leaseId: string): Promise<void> {
    return this.inner.revokeLease(leaseId);
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  private currentFence(what: string): TxnCompare {
    const fence = this.fence();
    if (!fence) throw new NotLeaderError(`this controller does not lead, so it may not write (${what}); the leader does`);
    return fence;
  }

  /** Throws why a fenced write was refused: the term ended, or else the key was not at the expected revision. */
  private async refused(fence: TxnCompare, what: string, key: string, expected: number | undefined): Promise<never> {
    if (!(await this.holds(fence))) throw this.notLeader(what, fence);
    throw new StoreConflictError(key, expected ?? 0, (await this.inner.get(key))?.modRevision ?? 0);
  }

  private async holds(fence: TxnCompare): Promise<boolean> {
    return (await this.inner.get(fence.key))?.modRevision === fence.modRevision;
  }

  private notLeader(what: string, fence: TxnCompare): NotLeaderError {
    return new NotLeaderError(`this controller's term ${fence.modRevision} ended before its write (${what}) got through: another controller leads now`, {
      term: fence.modRevision,
    });
  }
}
