/**
 * What a migration writes down: its record under /migrations/<id> (phases, outcome), the
 * container record it holds the lock of, the progress events streamed to its client, and the
 * gateway hold around its freeze. The orchestrator (migration.ts) and the settler
 * (migration-settle.ts) both record through it, so a phase is always written the same way:
 * container lock and migration record in one transaction, through the container lock module.
 */
import type { Logger } from 'pino';
import { MigrationFailedError, toChipmunkError, type LockLostError, type MigrationPhase } from '../shared/errors.js';
import type { MigrationEvent, MigrationPhaseName, MigrationRecord, MigrationStep } from '../shared/protocol.js';
import type { ContainerLocks, ContainerRecord, HeldLock } from './container-lock.js';
import type { NodeRecord } from './registry.js';
import type { StateStore } from './store/index.js';

const MIGRATIONS_PREFIX = '/migrations/';

export function migrationKey(id: string): string {
  return MIGRATIONS_PREFIX + id;
}

/** What the orchestrator needs of the gateway (RouteService implements it). */
export interface TrafficGate {
  /** Before the container freezes: new requests wait. Throws when the gateway could not hold them: the migration then stops before the freeze. */
  hold(name: string, migrationId: string): Promise<void>;
  /** Once it answers again, at `container`'s location (the target, or the source after a rollback). Best effort. */
  release(name: string, migrationId: string, container: ContainerRecord): Promise<void>;
}

/** One migration while this controller runs or settles it. */
export interface MigrationRun {
  record: MigrationRecord;
  /** The container's lock, and its record as last written. */
  held: HeldLock;
  source: NodeRecord;
  target: NodeRecord;
  pageServerPort?: number;
  onEvent: (event: MigrationEvent) => void;
}

export type EventDetail = Pick<MigrationEvent, 'message' | 'bytes' | 'totalBytes'>;

export class MigrationJournal {
  constructor(
    private readonly store: StateStore,
    private readonly locks: ContainerLocks,
    private readonly log: Pick<Logger, 'info' | 'warn' | 'error'>,
    private readonly traffic?: TrafficGate,
  ) {}

  async list(): Promise<MigrationRecord[]> {
    const records = (await this.store.list<MigrationRecord>(MIGRATIONS_PREFIX)).map((kv) => kv.value);
    return records.sort((a, b) => a.startedAt - b.startedAt);
  }

  /**
   * Records the phase (the lock's phase and the migration record in one write), then reports it.
   * `container` replaces the record (the commit). `endedSteps`: what the node of the phase that
   * ends here did, step by step (src/shared/steps.ts), kept on that phase's event.
   */
  async enter(run: MigrationRun, phase: MigrationPhaseName, detail: EventDetail, container: ContainerRecord = run.held.record, endedSteps?: MigrationStep[]): Promise<void> {
    const event: MigrationEvent = { migrationId: run.record.id, phase, at: Date.now(), ...detail };
    const history = endedSteps?.length ? withStepsOnLast(run.record.history, endedSteps) : run.record.history;
    const record: MigrationRecord = { ...run.record, phase, history: [...history, event] };
    run.held.lock.phase = phase;
    await this.locks.save(run.held, container, [{ type: 'put', key: migrationKey(record.id), value: record }]);
    run.record = record;
    this.emit(run, event);
  }

  /** The migration ended: the container record as given, unlocked, and the migration record with its last event. */
  async end(run: MigrationRun, container: ContainerRecord, ended: Partial<MigrationRecord> & { phase: 'done' | 'failed' }, message: string): Promise<void> {
    const event: MigrationEvent = { migrationId: run.record.id, phase: ended.phase, at: Date.now(), message };
    const record: MigrationRecord = { ...run.record, ...ended, history: [...run.record.history, event], finishedAt: event.at };
    run.held.record = await this.locks.release(run.held, container, [{ type: 'put', key: migrationKey(record.id), value: record }]);
    run.record = record;
    this.emit(run, event);
  }

  /** Updates the migration record alone (no lock involved: an ended migration's cleanup). */
  async amend(record: MigrationRecord): Promise<void> {
    await this.store.put(migrationKey(record.id), record);
  }

  /**
   * The migration lost the container's lock (a restarted controller or a failover took it over):
   * it records that it stopped and touches nothing else. Returns the error to throw.
   */
  async abandoned(run: MigrationRun, err: LockLostError): Promise<MigrationFailedError> {
    const error = new MigrationFailedError(
      `migration ${run.record.id} of ${run.record.name} stopped in phase ${run.record.phase}: ${err.message}; see \`chipmunk ps\` and \`chipmunk failovers\``,
      { phase: blamedPhase(run.record.phase), node: run.record.from },
      err,
    );
    const event: MigrationEvent = { migrationId: run.record.id, phase: 'failed', at: Date.now(), message: error.message };
    await this.amend({ ...run.record, phase: 'failed', history: [...run.record.history, event], finishedAt: event.at, error: error.toJSON() }).catch(() => undefined);
    this.emit(run, event);
    return error;
  }

  async hold(run: MigrationRun): Promise<void> {
    await this.traffic?.hold(run.record.name, run.record.id);
  }

  /** Held requests go to where `container` runs (idempotent: a route that is not held is only pointed there). */
  async release(run: MigrationRun, container: ContainerRecord): Promise<void> {
    await this.traffic?.release(run.record.name, run.record.id, container);
  }

  emit(run: MigrationRun, event: MigrationEvent): void {
    try {
      run.onEvent(event);
    } catch (err) {
      // A listener's trouble (a client that went away) must not fail, or undo, the migration.
      this.log.warn({ migrationId: run.record.id, err: toChipmunkError(err).toJSON() }, 'migration event listener failed');
    }
  }
}

function withStepsOnLast(history: MigrationEvent[], steps: MigrationStep[]): MigrationEvent[] {
  const last = history.at(-1);
  return last ? [...history.slice(0, -1), { ...last, steps }] : history;
}

/** The phase to blame for a failure while the record says `phase`. */
export function blamedPhase(phase: MigrationPhaseName, code?: string): MigrationPhase {
  // The target's restore call covers both fetching and restoring; the agent's error says which failed.
  if (phase === 'transfer') return code === 'CHIPMUNK_TRANSFER_FAILED' ? 'transfer' : 'restore';
  return phase === 'done' || phase === 'failed' ? 'cleanup' : phase;
}
