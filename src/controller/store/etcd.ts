import { ConsecutiveBreaker, circuitBreaker, handleWhen } from 'cockatiel';
import { Etcd3, EtcdLeaseInvalidError, isRecoverableError, type IRangeRequest, type IRequestOp, type ITxnResponse } from 'etcd3';
import { StoreConflictError, StoreFailedError } from '../../shared/errors.js';
import { EtcdKeyspace, leaseNumber } from './etcd-codec.js';
import { keepAliveOnce } from './etcd-keepalive.js';
import { EtcdWatch } from './etcd-watch.js';
import type { DeleteOptions, KeyValue, PutOptions, StateStore, Txn, TxnResult, Watch, WatchEvent, WatchOptions } from './types.js';
import {
  assertDistinctTxnKeys,
  assertHistoryRevisions,
  assertKey,
  assertLeaseTtl,
  assertWatchFrom,
  compactedHistoryMessage,
  encodeValue,
  leaseNotFoundMessage,
} from './values.js';

/**
 * A StateStore on an etcd v3 cluster (3.4 or later), for controllers on several hosts. The
 * interface was made etcd-shaped, so most calls map one to one:
 *
 * - The store's revision is etcd's: it counts every write to the whole etcd cluster, so it advances
 *   by exactly one per write only while this store's namespace is the only writer (as it is for a
 *   cluster dedicated to chipmunk).
 * - Compare-and-swap and txn are etcd transactions comparing mod revisions; a refused one reads the
 *   key in the same transaction, so the conflict error names what was found.
 * - Leases are etcd's: the server times them, so they run on while a controller restarts or
 *   stalls (unlike the local stores, which renew them on open). etcd's TTLs are whole seconds: a
 *   TTL is rounded up, and an etcd whose shortest lease (1.5 × its election timeout, rounded up)
 *   is longer than what was asked is refused, since a node would then be judged dead too late.
 * - The store compacts etcd's history itself, keeping `historyRevisions` revisions for watches to
 *   replay (see compactIfDue).
 * - A call that fails on a connection error is tried again on another member (the client's policy,
 *   3 tries). A write whose connection broke after etcd applied it may so be applied twice (a put)
 *   or find its compare no longer holding (a compare-and-swap: the caller sees a conflict and
 *   re-reads, as after any conflict).
 *
 * Keys live under the spec's namespace (`etcd://h1:2379,h2:2379/NAMESPACE`, none by default), so
 * one etcd can hold several chipmunk clusters; they then share its revision counter and compaction.
 */

export interface EtcdStoreOptions {
  /** How many revisions of change history watches can replay. */
  historyRevisions?: number;
  /** Prefix of every key this store writes, e.g. "/chipmunk". */
  namespace?: string;
  /** Bound on each call to etcd: past it the call fails (a write's outcome is then unknown). */
  requestTimeoutMs?: number;
}

const DEFAULT_HISTORY_REVISIONS = 10_000;
const DEFAULT_REQUEST_TIMEOUT_MS = 5000;
/**
 * After this many failures in a row a member is skipped (calls go to the others) for MEMBER_REST_MS.
 * The client's default rest, 5 s, would leave a store on a member that blinked unusable for longer
 * than a 1 s lease lasts.
 */
const MEMBER_FAILURES = 3;
const MEMBER_REST_MS = 1000;
/** Keys a list reads per call: big lists come in pages, all read at the first page's revision. */
const LIST_PAGE = 500;

export class EtcdStore implements StateStore {
  private readonly watches = new Set<EtcdWatch>();
  /** The newest revision this store compacted etcd's history through (events at it and before are gone). */
  private compactedThrough = 0;
  private readonly compactEvery: number;
  private closed = false;

  private constructor(
    private readonly client: Etcd3,
    private readonly endpoints: string[],
    private readonly keys: EtcdKeyspace,
    private readonly historyRevisions: number,
  ) {
    // Compacting on every write would double the calls; a tenth of the history in arrears is cheap.
    this.compactEvery = Math.max(1, Math.floor(historyRevisions / 10));
  }

  /** Connects and checks that etcd answers: fails with a message naming the members when none does. */
  static async open(endpoints: string[], options: EtcdStoreOptions = {}): Promise<EtcdStore> {
    const historyRevisions = options.historyRevisions ?? DEFAULT_HISTORY_REVISIONS;
    assertHistoryRevisions(historyRevisions);
    const timeoutMs = options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    const client = new Etcd3({
      hosts: endpoints.map((endpoint) => `http://${endpoint}`),
      dialTimeout: timeoutMs,
      faultHandling: {
        host: () => circuitBreaker(handleWhen(isRecoverableError), { halfOpenAfter: MEMBER_REST_MS, breaker: new ConsecutiveBreaker(MEMBER_FAILURES) }),
      },
      // Streams (watches, keep-alives) live on; every other call gets a deadline.
      defaultCallOptions: (context) => (context.isStream ? {} : { deadline: Date.now() + timeoutMs }),
    });
    const store = new EtcdStore(client, endpoints, new EtcdKeyspace(options.namespace ?? ''), historyRevisions);
    try {
      await client.kv.range({ key: Buffer.from('/'), keys_only: true, limit: 1 });
    } catch (err) {
      client.close();
      throw new StoreFailedError(
        `cannot reach etcd at ${endpoints.join(',')}: ${(err as Error).message}; check that etcd runs there and serves clients on those addresses (its --listen-client-urls)`,
        err,
      );
    }
    return store;
  }

  async currentRevision(): Promise<number> {
    const res = await this.call('reading the revision', () => this.client.kv.range({ key: this.keys.encode('/'), keys_only: true, limit: 1 }));
    return Number(res.header.revision);
  }

  async get<T = unknown>(key: string): Promise<KeyValue<T> | undefined> {
    assertKey(key);
    const res = await this.call(`reading ${key}`, () => this.client.kv.range({ key: this.keys.encode(key) }));
    return res.kvs[0] && this.keys.toKeyValue<T>(res.kvs[0]);
  }

  async list<T = unknown>(prefix: string): Promise<KeyValue<T>[]> {
    const range = this.keys.prefixRange(prefix);
    const kvs: KeyValue<T>[] = [];
    let revision: number | undefined;
    let from = range.key;
    for (;;) {
      const req: IRangeRequest = { key: from, range_end: range.range_end, limit: LIST_PAGE, ...(revision ? { revision } : {}) };
      const res = await this.call(`listing ${prefix}`, () => this.client.kv.range(req));
      revision ??= Number(res.header.revision);
      for (const kv of res.kvs) kvs.push(this.keys.toKeyValue<T>(kv));
      if (!res.more || res.kvs.length === 0) return kvs;
      // The next page starts right after the last key: the same key with a zero byte appended.
      from = Buffer.concat([res.kvs[res.kvs.length - 1].key, Buffer.from([0])]);
    }
  }

  async put(key: string, value: unknown, opts: PutOptions = {}): Promise<number> {
    assertKey(key);
    const put: IRequestOp = { request_put: { key: this.keys.encode(key), value: Buffer.from(encodeValue(key, value)), lease: leaseNumber(opts.lease) } };
    const res = await this.conditional(`putting ${key}`, key, opts.expectModRevision, put, opts.lease);
    const revision = Number(res.header.revision);
    await this.compactIfDue(revision);
    return revision;
  }

  async delete(key: string, opts: DeleteOptions = {}): Promise<boolean> {
    assertKey(key);
    const res = await this.conditional(`deleting ${key}`, key, opts.expectModRevision, { request_delete_range: { key: this.keys.encode(key) } });
    const deleted = Number(res.responses[0].response_delete_range.deleted) > 0;
    if (deleted) await this.compactIfDue(Number(res.header.revision));
    return deleted;
  }

  async txn(txn: Txn): Promise<TxnResult> {
    assertDistinctTxnKeys(txn.ops.map((op) => op.key));
    for (const { key } of txn.compare) assertKey(key);
    const ops: IRequestOp[] = txn.ops.map((op) =>
      op.type === 'delete'
        ? { request_delete_range: { key: this.keys.encode(op.key) } }
        : { request_put: { key: this.keys.encode(op.key), value: Buffer.from(encodeValue(op.key, op.value)), lease: leaseNumber(op.lease) } },
    );
    const leases = txn.ops.flatMap((op) => (op.type === 'put' && op.lease !== undefined ? [op.lease] : []));
    const res = await this.call('a transaction', leases.join(', ') || undefined, () =>
      this.client.kv.txn({ compare: txn.compare.map((c) => this.keys.modCompare(c.key, c.modRevision)), success: ops, failure: [] }),
    );
    const revision = Number(res.header.revision);
    if (res.succeeded) await this.compactIfDue(revision);
    return { succeeded: res.succeeded, revision };
  }

  async watch<T = unknown>(prefix: string, opts: WatchOptions, onEvent: (ev: WatchEvent<T>) => void): Promise<Watch> {
    assertWatchFrom(opts.fromRevision);
    if (opts.fromRevision !== undefined) await this.assertRetained(prefix, opts.fromRevision);
    const range = this.keys.prefixRange(prefix);
    // A watch that fails to start ends (onEnd) before start() returns: nothing to delete then.
    let watch: EtcdWatch | undefined;
    watch = await EtcdWatch.start({
      client: this.client,
      describe: `watch on ${prefix}`,
      key: range.key,
      rangeEnd: range.range_end,
      fromRevision: opts.fromRevision,
      toKeyValue: (kv) => this.keys.toKeyValue(kv),
      onEvent: onEvent as (ev: WatchEvent) => void,
      onFailed: opts.onFailed,
      onEnd: () => watch && this.watches.delete(watch),
    });
    this.watches.add(watch);
    return watch;
  }

  async grantLease(ttlMs: number): Promise<string> {
    assertLeaseTtl(ttlMs);
    const seconds = Math.ceil(ttlMs / 1000);
    const res = await this.call('granting a lease', () => this.client.leaseClient.leaseGrant({ TTL: seconds }));
    if (res.error) throw new StoreFailedError(`etcd refused a ${seconds} s lease: ${res.error}`);
    if (Number(res.TTL) > seconds) {
      await this.call('revoking a lease it cannot use', () => this.client.leaseClient.leaseRevoke({ ID: res.ID }));
      throw new StoreFailedError(
        `etcd at ${this.endpoints.join(',')} made a ${seconds} s lease ${res.TTL} s long: its shortest lease is 1.5 × its election timeout, ` +
          `rounded up to whole seconds; run etcd with a shorter --election-timeout (500 ms allows 1 s leases) or use longer leases`,
      );
    }
    return res.ID;
  }

  async keepAlive(leaseId: string): Promise<void> {
    const id = leaseNumber(leaseId);
    const ttl = await this.call(`keeping lease ${leaseId} alive`, leaseId, () => keepAliveOnce(this.client, this.endpoints.length, id));
    if (ttl <= 0) throw new StoreFailedError(leaseNotFoundMessage(leaseId));
  }

  async revokeLease(leaseId: string): Promise<void> {
    const id = leaseNumber(leaseId);
    await this.call(`revoking lease ${leaseId}`, leaseId, () => this.client.leaseClient.leaseRevoke({ ID: id }));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const watch of this.watches) watch.cancel();
    this.watches.clear();
    this.client.close();
  }

  /** A write, guarded by the key's mod revision when one is expected; a refused guard reads the key in the same transaction. */
  private async conditional(what: string, key: string, expected: number | undefined, op: IRequestOp, lease?: string): Promise<ITxnResponse> {
    const encoded = this.keys.encode(key);
    const res = await this.call(what, lease, () =>
      this.client.kv.txn({
        compare: expected === undefined ? [] : [this.keys.modCompare(key, expected)],
        success: [op],
        failure: [{ request_range: { key: encoded } }],
      }),
    );
    if (!res.succeeded) {
      const current = res.responses[0].response_range.kvs[0];
      throw new StoreConflictError(key, expected!, current ? Number(current.mod_revision) : 0);
    }
    return res;
  }

  /**
   * Refuses a watch from history this store or etcd has compacted, before the watch is made: etcd
   * itself would accept it and cancel it a moment later. A compaction racing the watch still
   * reaches the caller, through onFailed.
   */
  private async assertRetained(prefix: string, from: number): Promise<void> {
    const current = await this.currentRevision();
    if (from > current) return;
    try {
      await this.client.kv.range({ key: this.keys.encode('/'), keys_only: true, limit: 1, revision: from });
    } catch (err) {
      if (!/compacted/.test((err as Error).message)) throw this.failure(`checking history for a watch on ${prefix}`, err);
      // etcd does not say up to where it compacted: this store knows its own compactions, and the refused revision bounds the rest.
      throw new StoreFailedError(compactedHistoryMessage(prefix, from, Math.max(this.compactedThrough, from)), err);
    }
  }

  /**
   * Keeps `historyRevisions` revisions: once the history this store wrote has grown a tenth past
   * that, it compacts etcd up to the revision that leaves exactly that many. A compaction that
   * fails (etcd compacted further meanwhile, or is unreachable) is tried again after a later write.
   */
  private async compactIfDue(revision: number): Promise<void> {
    const through = revision - this.historyRevisions;
    if (through - this.compactedThrough < this.compactEvery) return;
    try {
      // etcd keeps the compaction revision itself, so compacting at through + 1 drops exactly the revisions up to through.
      await this.client.kv.compact({ revision: through + 1 });
      this.compactedThrough = through;
    } catch (err) {
      if (/compacted/.test((err as Error).message)) this.compactedThrough = through;
    }
  }

  /** Runs one call to etcd, turning its errors into the store's; LEASE names the lease(s) the call uses, for a lease etcd no longer has. */
  private async call<T>(what: string, lease: string | undefined, run: () => Promise<T>): Promise<T>;
  private async call<T>(what: string, run: () => Promise<T>): Promise<T>;
  private async call<T>(what: string, ...args: [string | undefined, () => Promise<T>] | [() => Promise<T>]): Promise<T> {
    const [lease, run] = args.length === 2 ? args : [undefined, args[0]];
    if (this.closed) throw new StoreFailedError('the state store is closed');
    try {
      return await run();
    } catch (err) {
      if (lease !== undefined && (err instanceof EtcdLeaseInvalidError || /lease not found/.test((err as Error).message))) {
        throw new StoreFailedError(leaseNotFoundMessage(lease), err);
      }
      throw this.failure(what, err);
    }
  }

  private failure(what: string, err: unknown): StoreFailedError {
    return new StoreFailedError(`etcd at ${this.endpoints.join(',')}: ${what} failed: ${(err as Error).message}`, err);
  }
}

