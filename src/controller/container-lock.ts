/**
 * The container lock: the one place that decides which operation may change a container.
 *
 * Each container record carries at most one `lock`, taken by one operation at a time (a
 * migration, a checkpoint, a restore from a checkpoint, a failover, a stop, a removal). The lock
 * lives in the store with the record, so it survives this process: it names its owner (the
 * controller instance that took it) and when, and a controller that starts finds the locks a
 * previous one left (`stale()`) and settles each (src/controller/recovery.ts).
 *
 * Every read-modify-write of a container record goes through `update`, one compare-and-swap
 * loop: it rereads and retries when another write got in between, so a protect during a
 * migration, or a lock released while a status changes, never overwrites the other.
 *
 * An operation holding the lock writes through `save`/`release`, which fail with LockLostError
 * once the lock is no longer its own (a failover took it over, or a restarted controller
 * recovered it): from then on that operation must not act on the container any more.
 */
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { ConflictError, LockLostError, MigrationInProgressError, NotFoundError, type ChipmunkError } from '../shared/errors.js';
import type { ContainerSpec, ContainerStatus, MigrationPhaseName, ProtectionPolicy } from '../shared/protocol.js';
import type { KeyValue, StateStore, TxnOp } from './store/index.js';

export type LockOperation = 'migration' | 'checkpoint' | 'restore' | 'failover' | 'stop' | 'remove' | 'protect' | 'expose';

export interface ContainerLock {
  id: string;
  operation: LockOperation;
  /** The controller instance that holds it: another one's lock is stale once this one runs. */
  owner: string;
  /** ms since the epoch. */
  since: number;
  /** A migration's current phase (`chipmunk ps` shows the container as migrating). */
  phase?: MigrationPhaseName;
}

export interface ContainerRecord {
  spec: ContainerSpec;
  node: string;
  status: ContainerStatus;
  /** The agent's incarnation counter: one more with every restore. */
  generation: number;
  ip?: string;
  createdAt: string;
  /** The operation that may change this container now, if any. */
  lock?: ContainerLock;
  /** Protected: checkpointed every `everyMs`, restored elsewhere when its node dies. */
  protection?: ProtectionPolicy;
}

/** How long an operation waits for another's lock before it gives up with a conflict. */
const LOCK_WAIT_MS = 60_000;
const LOCK_POLL_MS = 100;

const CONTAINERS_PREFIX = '/containers/';

export function containerKey(name: string): string {
  return CONTAINERS_PREFIX + name;
}

export function unknownContainer(name: string): NotFoundError {
  return new NotFoundError(`unknown container "${name}": see \`chipmunk ps\` for the containers of this cluster`, { name });
}

/** The lock taken by one operation: pass it back to save, release or hand over. */
export interface HeldLock {
  name: string;
  lock: ContainerLock;
  /** The record as this operation last wrote or read it (with the lock). */
  record: ContainerRecord;
}

export interface AcquireOptions {
  /** Checks the record before the lock is taken (throw to refuse: the container is not running...). */
  admit?: (record: ContainerRecord) => void;
  /** Whether this operation may take the lock from the operation holding it (a failover does). */
  takeOver?: (held: ContainerLock) => boolean;
  /** false: refuse at once when another operation holds the lock (default: wait up to LOCK_WAIT_MS, except for a migration's). */
  wait?: boolean;
  /** More writes in the same transaction as taking the lock (a migration's record). */
  ops?: TxnOp[];
  /** A migration's first phase. */
  phase?: MigrationPhaseName;
  /** The lock's id (a migration's lock has the migration's id); a new one by default. */
  id?: string;
}

/** What `update` may answer: the record to write (and more writes in the same transaction), or nothing to write. */
export type RecordChange = ContainerRecord | { record: ContainerRecord | null; ops: TxnOp[] } | undefined;

export class ContainerLocks {
  /**
   * Ids of this instance's locks whose operation still runs here. One of its own locks not in it
   * was left by an operation that ended without releasing it (its release was refused while
   * this controller had stepped down for a moment): stale like another controller's.
   */
  private readonly running = new Set<string>();

  constructor(
    private readonly store: StateStore,
    /** This controller instance. */
    readonly owner: string = `controller-${randomUUID().slice(0, 8)}`,
  ) {}

  async get(name: string): Promise<KeyValue<ContainerRecord> | undefined> {
    return this.store.get<ContainerRecord>(containerKey(name));
  }

  async require(name: string): Promise<KeyValue<ContainerRecord>> {
    const current = await this.get(name);
    if (!current) throw unknownContainer(name);
    return current;
  }

  /**
   * The one compare-and-swap loop over a container record. `change` sees the current record
   * (undefined if there is none) and answers what to write: a record, `{record: null}` to delete
   * it, or undefined to write nothing. It may throw to refuse. Retried until no concurrent write
   * got in between. Returns what was written (undefined when nothing or a delete).
   */
  async update(name: string, change: (current: ContainerRecord | undefined) => RecordChange): Promise<ContainerRecord | undefined> {
    const key = containerKey(name);
    for (;;) {
      const current = await this.store.get<ContainerRecord>(key);
      const next = change(current?.value);
      if (next === undefined) return undefined;
      const { record, ops } = 'spec' in next ? { record: next, ops: [] } : next;
      const write: TxnOp = record === null ? { type: 'delete', key } : { type: 'put', key, value: record };
      const res = await this.store.txn({ compare: [{ key, modRevision: current?.modRevision ?? 0 }], ops: [write, ...ops] });
      if (res.succeeded) return record ?? undefined;
    }
  }

  /**
   * Takes the container's lock for `operation`. Waits (bounded) while another operation holds
   * it, unless `takeOver` allows taking it from that one. Throws NotFoundError for an unknown
   * container, MigrationInProgressError/ConflictError when the wait ends.
   */
  async acquire(name: string, operation: LockOperation, opts: AcquireOptions = {}): Promise<HeldLock> {
    const deadline = Date.now() + (opts.wait === false ? 0 : LOCK_WAIT_MS);
    const lock: ContainerLock = { id: opts.id ?? `${operation}-${randomUUID().slice(0, 8)}`, operation, owner: this.owner, since: Date.now(), ...(opts.phase ? { phase: opts.phase } : {}) };
    for (;;) {
      let blockedBy: ContainerLock | undefined;
      const written = await this.update(name, (current) => {
        if (!current) throw unknownContainer(name);
        if (current.lock && !opts.takeOver?.(current.lock)) {
          blockedBy = current.lock;
          return undefined;
        }
        blockedBy = undefined;
        opts.admit?.(current);
        return { record: { ...current, lock }, ops: opts.ops ?? [] };
      });
      if (written) {
        this.running.add(lock.id);
        return { name, lock, record: written };
      }
      // A migration can take minutes and may end elsewhere: refused at once rather than waited for.
      if (Date.now() >= deadline || blockedBy!.operation === 'migration') throw lockedError(name, blockedBy!);
      await sleep(LOCK_POLL_MS);
    }
  }

  /** Writes the record (keeping the lock) and `ops`, as long as `held` still holds it. */
  async save(held: HeldLock, record: ContainerRecord, ops: TxnOp[] = []): Promise<void> {
    const written = await this.update(held.name, (current) => {
      this.assertHolds(held, current);
      return { record: { ...record, lock: held.lock }, ops };
    });
    held.record = written!;
  }

  /** Writes the record without the lock (the operation is over), as long as `held` still holds it. */
  async release(held: HeldLock, record: ContainerRecord = held.record, ops: TxnOp[] = []): Promise<ContainerRecord> {
    // Its operation is over even if the write is refused: the lock is then stale (see `running`).
    this.running.delete(held.lock.id);
    const written = await this.update(held.name, (current) => {
      this.assertHolds(held, current);
      return { record: unlocked(record), ops };
    });
    return written!;
  }

  /** Deletes the record (a removal), as long as `held` still holds the lock. */
  async remove(held: HeldLock, ops: TxnOp[] = []): Promise<void> {
    this.running.delete(held.lock.id);
    await this.update(held.name, (current) => {
      this.assertHolds(held, current);
      return { record: null, ops };
    });
  }

  /** Releases the lock if `held` still holds it, leaving the record otherwise as it is. Never throws for a lost lock. */
  async releaseIfHeld(held: HeldLock): Promise<void> {
    this.running.delete(held.lock.id);
    await this.update(held.name, (current) => (current?.lock?.id === held.lock.id ? unlocked(current) : undefined));
  }

  /** The same lock changes hands to another operation (a migration whose container must fail over). */
  async handOver(held: HeldLock, operation: LockOperation): Promise<HeldLock> {
    const lock: ContainerLock = { id: `${operation}-${randomUUID().slice(0, 8)}`, operation, owner: this.owner, since: Date.now() };
    const written = await this.update(held.name, (current) => {
      this.assertHolds(held, current);
      return { ...current!, lock };
    });
    this.running.delete(held.lock.id);
    this.running.add(lock.id);
    return { name: held.name, lock, record: written! };
  }

  /** The name of every container the cluster has. */
  async names(): Promise<string[]> {
    return (await this.store.list<ContainerRecord>(CONTAINERS_PREFIX)).map(({ value }) => value.spec.name);
  }

  /**
   * Locks whose operation no longer runs: another controller's (they ended with it), and this
   * one's whose operation ended without releasing them (see `running`).
   */
  async stale(): Promise<HeldLock[]> {
    const records = await this.store.list<ContainerRecord>(CONTAINERS_PREFIX);
    return records
      .filter(({ value }) => value.lock !== undefined && (value.lock.owner !== this.owner || !this.running.has(value.lock.id)))
      .map(({ value }) => ({ name: value.spec.name, lock: value.lock!, record: value }));
  }

  /** Takes over a stale lock for recovery: the lock keeps its id and operation, this controller becomes its owner. */
  async adopt(stale: HeldLock): Promise<HeldLock> {
    const lock: ContainerLock = { ...stale.lock, owner: this.owner };
    const written = await this.update(stale.name, (current) => {
      this.assertHolds(stale, current);
      return { ...current!, lock };
    });
    this.running.add(lock.id);
    return { name: stale.name, lock, record: written! };
  }

  private assertHolds(held: HeldLock, current: ContainerRecord | undefined): void {
    if (current?.lock?.id === held.lock.id) return;
    throw new LockLostError(
      `the ${held.lock.operation} of ${held.name} (${held.lock.id}) no longer holds the container's lock${current?.lock ? `: ${current.lock.operation} ${current.lock.id} took it over` : ''}`,
      { name: held.name, lock: held.lock.id, ...(current?.lock ? { heldBy: current.lock.id } : {}) },
    );
  }
}

export function unlocked(record: ContainerRecord): ContainerRecord {
  const { lock: _released, ...rest } = record;
  return rest;
}

/** The error for an operation that finds the container locked by another. */
export function lockedError(name: string, lock: ContainerLock): ChipmunkError {
  if (lock.operation === 'migration') return new MigrationInProgressError(name, lock.id);
  return new ConflictError(`container ${name} is busy (${lock.operation} ${lock.id} since ${new Date(lock.since).toISOString()}); try again when it ends`, {
    name,
    lock: lock.id,
    operation: lock.operation,
  });
}
