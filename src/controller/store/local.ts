import { randomUUID } from 'node:crypto';
import { StoreConflictError, StoreFailedError } from '../../shared/errors.js';
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
import type { KeyValue, PutOptions, DeleteOptions, StateStore, Txn, TxnResult, Watch, WatchEvent, WatchOptions } from './types.js';

/**
 * The StateStore logic for stores that live inside the controller process. MemoryStore and
 * SqliteStore share it and differ only in where rows are kept (a LocalBackend).
 *
 * Backend calls are synchronous, so each operation reads, checks and commits with nothing
 * interleaved: that is what makes compare-and-swap and txn atomic without locks.
 */

/** A key as the backend keeps it: the value stays JSON text so every read hands out a fresh copy. */
export interface StoredKv {
  key: string;
  valueJson: string;
  createRevision: number;
  modRevision: number;
  version: number;
  lease?: string;
}

export type StoredEvent =
  | { type: 'put'; kv: StoredKv; prevKv?: StoredKv; revision: number }
  | { type: 'delete'; kv: StoredKv; revision: number };

export interface LeaseRecord {
  id: string;
  ttlMs: number;
  /** Wall-clock time (ms since the epoch) the lease ends unless kept alive. */
  deadlineMs: number;
}

/** One atomic change. The backend applies all of it or none of it. */
export interface Commit {
  /** The store's revision after this commit (unchanged for lease-only commits). */
  revision: number;
  /** Events at revisions up to and including this are dropped from history. */
  compactedRevision: number;
  puts?: StoredKv[];
  deletes?: string[];
  events?: StoredEvent[];
  saveLeases?: LeaseRecord[];
  removeLeases?: string[];
}

export interface LocalBackend {
  /** What the store starts from: zeros and no leases for a new store. */
  load(): { revision: number; compactedRevision: number; leases: LeaseRecord[] };
  get(key: string): StoredKv | undefined;
  /** Sorted by key in byte order. */
  list(prefix: string): StoredKv[];
  keysWithLease(leaseId: string): string[];
  /** Retained events at `revision` and later, in order. */
  eventsFrom(revision: number): StoredEvent[];
  commit(change: Commit): void;
  close(): void;
}

export interface LocalStoreOptions {
  /** How many revisions of change history watches can replay. */
  historyRevisions?: number;
}

const DEFAULT_HISTORY_REVISIONS = 10_000;
const MAX_TIMER_DELAY_MS = 2 ** 31 - 1;
/** The stall guard's period, and how late a tick must be to count as a stall. */
const STALL_TICK_MS = 100;
const STALL_THRESHOLD_MS = 150;

type PlannedWrite = { type: 'put'; key: string; valueJson: string; lease?: string } | { type: 'delete'; key: string };

interface Watcher {
  prefix: string;
  /** Events before this revision are not for this watcher (they predate it or were replayed). */
  startRevision: number;
  onEvent: (ev: WatchEvent<unknown>) => void;
  cancelled: boolean;
}

export class LocalStore implements StateStore {
  private revision: number;
  private compactedRevision: number;
  private readonly historyRevisions: number;
  private readonly leases = new Map<string, LeaseRecord>();
  private readonly watchers = new Set<Watcher>();
  private expiryTimer: NodeJS.Timeout | undefined;
  private closed = false;
  /** Ticks every STALL_TICK_MS; a late tick means this process was stalled (see compensateStall). */
  private readonly stallGuard: NodeJS.Timeout;
  private lastTickAt = Date.now();

  protected constructor(
    private readonly backend: LocalBackend,
    options: LocalStoreOptions = {},
  ) {
    this.historyRevisions = options.historyRevisions ?? DEFAULT_HISTORY_REVISIONS;
    assertHistoryRevisions(this.historyRevisions);
    const loaded = backend.load();
    this.revision = loaded.revision;
    this.compactedRevision = loaded.compactedRevision;
    // Leases loaded from disk restart their TTL now instead of keeping their old deadlines: while
    // the controller was down no agent could keep its lease alive, so honouring the old deadlines
    // would expire every agent at once on restart, and the controller would then treat healthy
    // nodes as failed. Agents that are really gone still expire one TTL after the restart.
    this.stallGuard = setInterval(() => this.compensateStall(), STALL_TICK_MS);
    this.stallGuard.unref();
    if (loaded.leases.length > 0) {
      const now = Date.now();
      const renewed = loaded.leases.map((lease) => ({ ...lease, deadlineMs: now + lease.ttlMs }));
      backend.commit({ revision: this.revision, compactedRevision: this.compactedRevision, saveLeases: renewed });
      for (const lease of renewed) this.leases.set(lease.id, lease);
      this.armExpiryTimer();
    }
  }

  async currentRevision(): Promise<number> {
    this.assertOpen();
    return this.revision;
  }

  async get<T = unknown>(key: string): Promise<KeyValue<T> | undefined> {
    this.assertOpen();
    assertKey(key);
    const stored = this.backend.get(key);
    return stored && toKeyValue<T>(stored);
  }

  async list<T = unknown>(prefix: string): Promise<KeyValue<T>[]> {
    this.assertOpen();
    return this.backend.list(prefix).map((stored) => toKeyValue<T>(stored));
  }

  async put(key: string, value: unknown, opts: PutOptions = {}): Promise<number> {
    this.assertOpen();
    assertKey(key);
    const valueJson = encodeValue(key, value);
    checkExpected(key, opts.expectModRevision, this.backend.get(key));
    if (opts.lease !== undefined) this.liveLease(opts.lease);
    return this.commitWrites([{ type: 'put', key, valueJson, lease: opts.lease }]);
  }

  async delete(key: string, opts: DeleteOptions = {}): Promise<boolean> {
    this.assertOpen();
    assertKey(key);
    const existing = this.backend.get(key);
    checkExpected(key, opts.expectModRevision, existing);
    if (!existing) return false;
    this.commitWrites([{ type: 'delete', key }]);
    return true;
  }

  async txn(txn: Txn): Promise<TxnResult> {
    this.assertOpen();
    assertDistinctTxnKeys(txn.ops.map((op) => op.key));
    const writes: PlannedWrite[] = txn.ops.map((op) => {
      if (op.type === 'delete') return op;
      if (op.lease !== undefined) this.liveLease(op.lease);
      return { type: 'put', key: op.key, valueJson: encodeValue(op.key, op.value), lease: op.lease };
    });
    for (const { key, modRevision } of txn.compare) {
      assertKey(key);
      if ((this.backend.get(key)?.modRevision ?? 0) !== modRevision) return { succeeded: false, revision: this.revision };
    }
    return { succeeded: true, revision: this.commitWrites(writes) };
  }

  async watch<T = unknown>(prefix: string, opts: WatchOptions, onEvent: (ev: WatchEvent<T>) => void): Promise<Watch> {
    this.assertOpen();
    const from = opts.fromRevision;
    assertWatchFrom(from);
    if (from !== undefined && from <= this.compactedRevision) throw new StoreFailedError(compactedHistoryMessage(prefix, from, this.compactedRevision));
    const watcher: Watcher = { prefix, startRevision: from ?? this.revision + 1, onEvent: onEvent as Watcher['onEvent'], cancelled: false };
    if (from !== undefined) {
      for (const ev of this.backend.eventsFrom(from)) if (ev.kv.key.startsWith(prefix)) deliver(watcher, ev);
    }
    // Registered in the same synchronous step as the replay, so no commit falls between the two.
    this.watchers.add(watcher);
    return {
      cancel: () => {
        watcher.cancelled = true;
        this.watchers.delete(watcher);
      },
    };
  }

  async grantLease(ttlMs: number): Promise<string> {
    this.assertOpen();
    assertLeaseTtl(ttlMs);
    const lease: LeaseRecord = { id: randomUUID(), ttlMs, deadlineMs: Date.now() + ttlMs };
    this.backend.commit({ revision: this.revision, compactedRevision: this.compactedRevision, saveLeases: [lease] });
    this.leases.set(lease.id, lease);
    this.armExpiryTimer();
    return lease.id;
  }

  async keepAlive(leaseId: string): Promise<void> {
    this.assertOpen();
    const lease = this.liveLease(leaseId);
    const renewed = { ...lease, deadlineMs: Date.now() + lease.ttlMs };
    this.backend.commit({ revision: this.revision, compactedRevision: this.compactedRevision, saveLeases: [renewed] });
    this.leases.set(leaseId, renewed);
    this.armExpiryTimer();
  }

  async revokeLease(leaseId: string): Promise<void> {
    this.assertOpen();
    this.liveLease(leaseId);
    this.endLease(leaseId);
    this.armExpiryTimer();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.expiryTimer);
    clearInterval(this.stallGuard);
    for (const watcher of this.watchers) watcher.cancelled = true;
    this.watchers.clear();
    this.backend.close();
  }

  /** The lease if it has not ended. A lease past its deadline that the timer has not reached yet is ended here. */
  private liveLease(leaseId: string): LeaseRecord {
    this.compensateStall();
    const lease = this.leases.get(leaseId);
    if (lease && lease.deadlineMs > Date.now()) return lease;
    if (lease) {
      this.endLease(leaseId);
      this.armExpiryTimer();
    }
    throw new StoreFailedError(leaseNotFoundMessage(leaseId));
  }

  /** Deletes the lease's keys and the lease itself in one commit, so a crash cannot leave one without the other. */
  private endLease(leaseId: string): void {
    const deletes = this.backend.keysWithLease(leaseId).map((key): PlannedWrite => ({ type: 'delete', key }));
    this.commitWrites(deletes, [leaseId]);
    this.leases.delete(leaseId);
  }

  private armExpiryTimer(): void {
    clearTimeout(this.expiryTimer);
    this.expiryTimer = undefined;
    if (this.closed || this.leases.size === 0) return;
    const nextDeadline = Math.min(...[...this.leases.values()].map((lease) => lease.deadlineMs));
    // Node fires longer delays than MAX_TIMER_DELAY_MS after 1 ms; waking early just re-arms.
    const delay = Math.min(Math.max(0, nextDeadline - Date.now()), MAX_TIMER_DELAY_MS);
    this.expiryTimer = setTimeout(() => this.expireDueLeases(), delay);
    // The timer alone must not keep a process alive that has nothing else to do.
    this.expiryTimer.unref();
  }

  /**
   * While this process was stalled (a long synchronous step, a paused VM) it could not take
   * keep-alives: those are waiting in its sockets. Ending leases for that time would declare
   * healthy nodes dead, so every lease gets the stalled time back, before anything judges one.
   */
  private compensateStall(): void {
    const now = Date.now();
    const stalledMs = now - this.lastTickAt - STALL_TICK_MS;
    this.lastTickAt = now;
    if (stalledMs < STALL_THRESHOLD_MS) return;
    for (const [id, lease] of this.leases) this.leases.set(id, { ...lease, deadlineMs: lease.deadlineMs + stalledMs });
  }

  private expireDueLeases(): void {
    this.compensateStall();
    const now = Date.now();
    for (const lease of [...this.leases.values()]) if (lease.deadlineMs <= now) this.endLease(lease.id);
    this.armExpiryTimer();
  }

  /** Applies the writes at the next revision and tells the watchers; returns the revision the store is at afterwards. */
  private commitWrites(writes: PlannedWrite[], removeLeases: string[] = []): number {
    const revision = this.revision + 1;
    const puts: StoredKv[] = [];
    const deletes: string[] = [];
    const events: StoredEvent[] = [];
    for (const write of writes) {
      const prev = this.backend.get(write.key);
      if (write.type === 'put') {
        const kv: StoredKv = {
          key: write.key,
          valueJson: write.valueJson,
          createRevision: prev?.createRevision ?? revision,
          modRevision: revision,
          version: (prev?.version ?? 0) + 1,
          ...(write.lease !== undefined ? { lease: write.lease } : {}),
        };
        puts.push(kv);
        events.push({ type: 'put', kv, ...(prev ? { prevKv: prev } : {}), revision });
      } else if (prev) {
        deletes.push(write.key);
        events.push({ type: 'delete', kv: prev, revision });
      }
    }
    // Deleting keys that do not exist changes nothing, so it takes no revision (as in etcd).
    if (events.length === 0) {
      if (removeLeases.length > 0) this.backend.commit({ revision: this.revision, compactedRevision: this.compactedRevision, removeLeases });
      return this.revision;
    }
    const compactedRevision = Math.max(this.compactedRevision, revision - this.historyRevisions);
    this.backend.commit({ revision, compactedRevision, puts, deletes, events, removeLeases });
    this.revision = revision;
    this.compactedRevision = compactedRevision;
    for (const watcher of this.watchers) {
      for (const ev of events) if (ev.kv.key.startsWith(watcher.prefix) && ev.revision >= watcher.startRevision) deliver(watcher, ev);
    }
    return revision;
  }

  private assertOpen(): void {
    if (this.closed) throw new StoreFailedError('the state store is closed');
  }
}

/**
 * Queues the event for the watcher. Delivery is asynchronous so that a callback cannot fail the
 * write that caused the event (an exception from it is uncaught, like one from an event
 * listener); microtasks run in queue order, which keeps each watcher's events in revision order.
 */
function deliver(watcher: Watcher, ev: StoredEvent): void {
  queueMicrotask(() => {
    if (!watcher.cancelled) watcher.onEvent(toWatchEvent(ev));
  });
}

function toWatchEvent(ev: StoredEvent): WatchEvent<unknown> {
  if (ev.type === 'delete') return { type: 'delete', kv: toKeyValue(ev.kv), revision: ev.revision };
  return { type: 'put', kv: toKeyValue(ev.kv), ...(ev.prevKv ? { prevKv: toKeyValue(ev.prevKv) } : {}), revision: ev.revision };
}

function toKeyValue<T>(stored: StoredKv): KeyValue<T> {
  return {
    key: stored.key,
    value: JSON.parse(stored.valueJson) as T,
    createRevision: stored.createRevision,
    modRevision: stored.modRevision,
    version: stored.version,
    ...(stored.lease !== undefined ? { lease: stored.lease } : {}),
  };
}

function checkExpected(key: string, expected: number | undefined, current: StoredKv | undefined): void {
  const actual = current?.modRevision ?? 0;
  if (expected !== undefined && expected !== actual) throw new StoreConflictError(key, expected, actual);
}
