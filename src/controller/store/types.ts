import type { StoreFailedError } from '../../shared/errors.js';

/**
 * The controller's state store. The interface is etcd v3 shaped on purpose, so the controller can
 * run on one node with SQLite now and on etcd (with leader election) later without its callers
 * changing:
 *
 * - One global revision counts every change; each write (put, delete, successful txn, lease
 *   expiry) advances it by exactly one. Reads and lease keep-alives do not.
 * - Every key carries the revisions it was created and last modified at; `modRevision` is the
 *   token for compare-and-swap.
 * - Watches deliver changes in revision order and can replay retained history, so a component
 *   follows a prefix without missing changes:
 *
 *       const rev = await store.currentRevision();
 *       const state = await store.list(prefix);
 *       await store.watch(prefix, { fromRevision: rev + 1 }, apply);
 *
 *   `apply` may see changes that `state` already contains; applying events in order still
 *   converges to the store's state.
 * - Keys attached to a lease are deleted, with delete events, when the lease expires or is
 *   revoked: that is how a node that stops heartbeating disappears from the store.
 *
 * Values are JSON. The type parameters on reads are unchecked casts: callers validate what they read.
 */

export interface KeyValue<T = unknown> {
  key: string;
  value: T;
  /** Revision of the put that created the key; a key deleted and put again gets a new one. */
  createRevision: number;
  /** Revision of the last put to the key; what compare-and-swap compares. */
  modRevision: number;
  /** Puts since the key was created: 1 after the first. */
  version: number;
  /** Lease the key is attached to: the key is deleted when the lease ends. */
  lease?: string;
}

export interface PutOptions {
  /** Write only if the key's modRevision is this; 0 means the key must not exist. */
  expectModRevision?: number;
  /** Attach the key to this lease. A put without it detaches the key from any lease it had. */
  lease?: string;
}

export interface DeleteOptions {
  /** Delete only if the key's modRevision is this; 0 means the key must not exist (nothing to delete). */
  expectModRevision?: number;
}

/** Holds when the key's modRevision equals `modRevision` (0: the key does not exist). */
export interface TxnCompare {
  key: string;
  modRevision: number;
}

export type TxnOp = { type: 'put'; key: string; value: unknown; lease?: string } | { type: 'delete'; key: string };

/** If every compare holds, every op is applied at one new revision; otherwise nothing is. A key may appear in at most one op. */
export interface Txn {
  compare: TxnCompare[];
  ops: TxnOp[];
}

export interface TxnResult {
  succeeded: boolean;
  /** The revision the ops were applied at, or the current revision when nothing changed. */
  revision: number;
}

export type WatchEvent<T = unknown> =
  /** `prevKv` is the value the put replaced, absent when the put created the key. */
  | { type: 'put'; kv: KeyValue<T>; prevKv?: KeyValue<T>; revision: number }
  /** `kv` is the key's last value before the delete; `revision` is the delete's. */
  | { type: 'delete'; kv: KeyValue<T>; revision: number };

export interface WatchOptions {
  /**
   * First revision to deliver. Retained history from it on is replayed before live changes.
   * Without it, only changes after the watch starts are delivered.
   */
  fromRevision?: number;
  /**
   * Called at most once, when the watch ends by itself because it can no longer deliver every
   * change: a store on a server (etcd) lost its connection and compacted the history it needed to
   * resume. List again and watch afresh. The stores inside the controller's process never call it.
   */
  onFailed?: (err: StoreFailedError) => void;
}

export interface Watch {
  /** Stops delivery, including events already queued for this watch. */
  cancel(): void;
}

export interface StateStore {
  currentRevision(): Promise<number>;
  get<T = unknown>(key: string): Promise<KeyValue<T> | undefined>;
  /** Keys starting with `prefix`, sorted by key (byte order, as etcd sorts). */
  list<T = unknown>(prefix: string): Promise<KeyValue<T>[]>;
  /** Returns the revision of this write. Throws StoreConflictError when `expectModRevision` does not hold. */
  put(key: string, value: unknown, opts?: PutOptions): Promise<number>;
  /** Returns whether the key existed. Throws StoreConflictError when `expectModRevision` does not hold. */
  delete(key: string, opts?: DeleteOptions): Promise<boolean>;
  txn(txn: Txn): Promise<TxnResult>;
  /**
   * Calls `onEvent` for each change under `prefix`, in revision order. Throws StoreFailedError when
   * `fromRevision` is older than the retained history: list again and watch from after the list.
   * `onEvent` must not throw: the store has no one to report the error to.
   */
  watch<T = unknown>(prefix: string, opts: WatchOptions, onEvent: (ev: WatchEvent<T>) => void): Promise<Watch>;
  /** Returns the new lease's id. The lease ends `ttlMs` after the last keep-alive. */
  grantLease(ttlMs: number): Promise<string>;
  /** Restarts the lease's TTL. Throws StoreFailedError when the lease has already ended. */
  keepAlive(leaseId: string): Promise<void>;
  /** Ends the lease now, deleting its keys. Throws StoreFailedError when the lease has already ended. */
  revokeLease(leaseId: string): Promise<void>;
  /** Cancels all watches. Leases are kept: a durable store carries them over to the next open. */
  close(): Promise<void>;
}
