/**
 * What the failover service writes down, and the indexes its reconcile pass reads so that it
 * does not list every failover ever recorded every half lease:
 * - `/failovers/<id>`: one FailoverRecord per failover (GET /v1/failovers);
 * - `/failover-replays/<id>`: the failovers whose replay is owed (`replayPending`), written in
 *   the same transaction as the record;
 * - `/failover-owed/<name>`: containers whose failover failed, tried again while their node is
 *   dead, and also once it is back if it came back without them (its host restarted).
 */
import type { CheckpointSummary } from '../checkpoint-store/index.js';
import type { ErrorJSON } from '../shared/errors.js';
import type { StateStore } from './store/index.js';

const FAILOVERS_PREFIX = '/failovers/';
const PENDING_REPLAYS_PREFIX = '/failover-replays/';
const OWED_PREFIX = '/failover-owed/';

export interface FailoverRecord {
  id: string;
  name: string;
  from: string;
  to?: string;
  /** The checkpoint restored, and the log position it was cut at. */
  checkpoint?: string;
  logPosition?: CheckpointSummary['logPosition'];
  /** The checkpoint store replicas the restore read it from (a replica that failed was passed over). */
  readFrom?: string[];
  /** Why the restored copy got no replay (no checkpoint was cut in the route's current request log). */
  noReplay?: string;
  /** The last failed replay. */
  replayError?: ErrorJSON;
  /** Checkpoints passed over, newest first, and why (a corrupt chunk, a failed restore). */
  skipped: Array<{ checkpoint: string; reason: string }>;
  /** When the node was declared dead (its lease expired), or the failed migration that lost the container gave up on it. */
  detectedAt: number;
  /** Why it was restored from a checkpoint when not for a dead node (a migration that lost it). */
  reason?: string;
  /** Restored, but the logged requests could not be replayed yet: the lock and the gateway hold stay, and the replay is retried. */
  replayPending?: boolean;
  /** The restore under way (or last tried): where, from which checkpoint, as which incarnation. */
  attempt?: { to: string; checkpoint: string; logPosition: CheckpointSummary['logPosition']; generation: number };
  restoredAt?: number;
  finishedAt?: number;
  replayed?: number;
  delivered?: number;
  /** Where the time went, ms: waiting for the lock, target preparation, fetch + restore, replay, release. */
  timings: Record<string, number>;
  outcome: 'running' | 'done' | 'failed';
  /** The container lock it ran under: a restarted controller finds an interrupted failover by it. */
  lockId?: string;
  error?: ErrorJSON;
}

/** A container whose failover failed: its record still names the node it was lost on. */
export interface OwedFailover {
  name: string;
  /** The node the container was lost on, as its record still says. */
  from: string;
  /** The failover that failed last. */
  failoverId: string;
}

export class FailoverRecords {
  constructor(private readonly store: StateStore) {}

  /** Oldest first. */
  async list(): Promise<FailoverRecord[]> {
    return (await this.store.list<FailoverRecord>(FAILOVERS_PREFIX)).map((kv) => kv.value).sort((a, b) => a.detectedAt - b.detectedAt);
  }

  /** The failover that ran under lock `lockId`, if any. */
  async byLock(lockId: string): Promise<FailoverRecord | undefined> {
    return (await this.list()).find((r) => r.lockId === lockId);
  }

  /** The record, and its entry in the index of owed replays (kept or dropped with it, in one write). */
  async save(record: FailoverRecord): Promise<void> {
    const pendingKey = PENDING_REPLAYS_PREFIX + record.id;
    await this.store.txn({
      compare: [],
      ops: [{ type: 'put', key: FAILOVERS_PREFIX + record.id, value: record }, record.replayPending ? { type: 'put', key: pendingKey, value: record.id } : { type: 'delete', key: pendingKey }],
    });
  }

  /** Records an older version wrote have no index entry yet: once, at start. */
  async indexPendingReplays(): Promise<void> {
    for (const record of await this.list()) if (record.replayPending) await this.save(record);
  }

  /** The failovers whose replay is owed. */
  async pendingReplays(): Promise<FailoverRecord[]> {
    const records: FailoverRecord[] = [];
    for (const { value: id } of await this.store.list<string>(PENDING_REPLAYS_PREFIX)) {
      const record = (await this.store.get<FailoverRecord>(FAILOVERS_PREFIX + id))?.value;
      if (record?.replayPending) records.push(record);
    }
    return records;
  }

  async owe(owed: OwedFailover): Promise<void> {
    await this.store.put(OWED_PREFIX + owed.name, owed);
  }

  /** Nothing is owed for `name` any more (it runs again, or went). */
  async paid(name: string): Promise<void> {
    await this.store.delete(OWED_PREFIX + name);
  }

  async owed(): Promise<OwedFailover[]> {
    return (await this.store.list<OwedFailover>(OWED_PREFIX)).map((kv) => kv.value);
  }
}
