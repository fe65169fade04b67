/**
 * Protected containers: checkpoints on demand and on a schedule, and rolling a container back to
 * one. A checkpoint is taken by the container's agent (pause, copy files, CRIU dump, resume) and
 * sent by it to the checkpoint store, chunk by chunk, only what the store lacks.
 *
 * For a container behind a logging gateway route the checkpoint is a cut of the request log:
 * the gateway holds new requests and waits for those sent to be answered, reports how far its
 * log got (the position), and releases once the dump is done. Every request up to the position
 * is in the checkpoint's memory; every later one is in the log, durably, before it was forwarded.
 *
 * Operations on one container exclude each other through its lock (container-lock.ts).
 */
import type { Logger } from 'pino';
import { UnavailableError, InvalidInputError, NotFoundError, toChipmunkError } from '../shared/errors.js';
import type { ContainerView, LogPosition, ProtectionPolicy } from '../shared/protocol.js';
import type { CheckpointInfo, CheckpointSummary } from '../checkpoint-store/index.js';
import { unknownContainer, type ContainerLocks, type ContainerRecord, type HeldLock } from './container-lock.js';
import type { AgentResolver } from './containers.js';
import { controllerPauses } from './faults.js';
import type { NodeRegistry } from './registry.js';
import type { StateStore } from './store/index.js';

/** The gateway side of a checkpoint and a restore, as the route service provides it. */
export interface LoggedTraffic {
  /**
   * Holds the container's route (if it has one) and waits for requests already sent to be
   * answered. `logPosition` is the last logged request the container has seen, in its route's
   * current log: null when the route does not log (no route, TCP, no gateway).
   */
  cut(name: string, holdId: string): Promise<{ held: boolean; logPosition: LogPosition | null }>;
  /** Ends the hold: traffic goes to where `container` runs. */
  release(name: string, holdId: string, container: ContainerRecord): Promise<void>;
  /** Log entries up to `upTo` are no longer needed by any checkpoint a restore could use. */
  trimLog(name: string, upTo: LogPosition): Promise<void>;
  /** Sends the logged requests after `after`, in order, to where `container` runs now (refused if `after` is in another log). */
  replay(name: string, after: LogPosition, container: ContainerRecord): Promise<{ replayed: number; delivered: number }>;
  /** The route's log setting follows the container's protection. */
  refresh(name: string): Promise<void>;
}

/** What the controller needs of the checkpoint store replicas (checkpoint-replicas.ts). */
export interface CheckpointCatalog {
  /** Checkpoints that count (committed on every replica they were sent to), newest first, with where each is. */
  list(container: string): Promise<CheckpointSummary[]>;
  forget(container: string): Promise<void>;
  /** The store replicas a new checkpoint goes to (all of them must commit it); throws when too few answer. */
  uploadTargets(): Promise<string[]>;
  /** The agent committed it on every one of `replicas`: from now on it counts. */
  committed(info: CheckpointInfo, replicas: string[]): Promise<CheckpointSummary>;
  /** The replicas to read a checkpoint from, best first. */
  readFrom(container: string, id: string): Promise<string[]>;
}

export type CheckpointResult = CheckpointInfo & {
  /** How long the container was frozen for it. */
  frozenMs: number;
};

export interface CheckpointServiceOptions {
  store: StateStore;
  nodes: NodeRegistry;
  agentFor: AgentResolver;
  locks: ContainerLocks;
  traffic: LoggedTraffic;
  catalog: CheckpointCatalog;
  log: Logger;
  /**
   * After start() the scheduler cuts nothing for this long (the node lease). A leader that just
   * took over from one whose host died still sees that host's node lease for up to a lease: a
   * checkpoint there would hold the route waiting for requests the dead container never answers
   * (5 s), and keep the failover waiting for the container's lock.
   */
  quietAfterStartMs?: number;
}

/** How often the scheduler looks for protected containers whose checkpoint is due. */
const SCHEDULER_TICK_MS = 250;
/**
 * A failed scheduled checkpoint is tried again after this, doubled at each failure in a row and
 * never later than the policy's period: waiting a whole period (minutes) would leave the
 * container with no checkpoint, or an old one, for that long.
 */
const FIRST_RETRY_MS = 1000;

export class CheckpointService {
  private timer?: NodeJS.Timeout;
  /** When each protected container's next scheduled checkpoint is due, by name (absent: at once). */
  private readonly dueAt = new Map<string, number>();
  /** Scheduled checkpoints that failed in a row, by name. */
  private readonly failuresInRow = new Map<string, number>();
  private readonly running = new Set<string>();
  /** The scheduler cuts nothing before this (see quietAfterStartMs). */
  private quietUntil = 0;

  constructor(private readonly opts: CheckpointServiceOptions) {}

  start(): void {
    this.quietUntil = Date.now() + (this.opts.quietAfterStartMs ?? 0);
    this.timer = setInterval(() => void this.checkpointDue(), SCHEDULER_TICK_MS);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  async protect(name: string, policy: ProtectionPolicy): Promise<ContainerView['protection']> {
    await this.startingLog(name, 'protect', async () => {
      await this.opts.locks.update(name, (record) => {
        if (!record) throw unknownContainer(name);
        return { ...record, protection: policy };
      });
      await this.opts.traffic.refresh(name);
    });
    this.dueAt.delete(name);
    this.failuresInRow.delete(name);
    return policy;
  }

  /**
   * Runs `change` (a protect or an expose: what may start the route's request log) under the
   * container's lock, so that no checkpoint is cut across the log's start. Every checkpoint cut
   * outside the route's current log then precedes all of it, and a failover from one replays the
   * whole log (failover-restore.ts) instead of losing the requests acknowledged since it began.
   */
  async startingLog<T>(name: string, operation: 'protect' | 'expose', change: () => Promise<T>): Promise<T> {
    const held = await this.opts.locks.acquire(name, operation);
    try {
      return await change();
    } finally {
      await this.release(held);
    }
  }

  async unprotect(name: string): Promise<void> {
    await this.opts.locks.update(name, (record) => {
      if (!record) throw unknownContainer(name);
      if (!record.protection) throw new InvalidInputError(`container '${name}' is not protected`, { name });
      const { protection: _dropped, ...rest } = record;
      return rest;
    });
    await this.opts.traffic.refresh(name);
  }

  /** Checkpoints the container now: it runs on, and the checkpoint counts once it is in the store. */
  async checkpoint(name: string): Promise<CheckpointResult> {
    const held = await this.opts.locks.acquire(name, 'checkpoint', { admit: (record) => assertRunning(name, record) });
    try {
      return await this.takeCheckpoint(held.record, held.lock.id);
    } finally {
      await this.release(held);
    }
  }

  /**
   * Rolls the running container back to checkpoint `checkpointId` (memory and files). A
   * checkpoint of the current state is taken first, so a failed restore puts that back; and one
   * right after, so the newest checkpoint (what a failover would use) is the restored state.
   * Requests logged since `checkpointId` are not replayed: rolling back discards them.
   */
  async restoreFrom(name: string, checkpointId: string): Promise<{ restoredFrom: string; safetyCheckpoint: string; checkpoint: string }> {
    const available = await this.opts.catalog.list(name);
    const wanted = available.find((c) => c.id === checkpointId);
    if (!wanted) {
      throw new NotFoundError(`container '${name}' has no checkpoint '${checkpointId}': \`chipmunk checkpoints ${name}\` lists them`, { name, checkpoint: checkpointId });
    }
    if (wanted.corrupt) throw new InvalidInputError(`checkpoint '${checkpointId}' of '${name}' is corrupt (a chunk failed its hash check): pick another`, { name, checkpoint: checkpointId });
    const held = await this.opts.locks.acquire(name, 'restore', { admit: (record) => assertRunning(name, record) });
    const { record, lock: { id: lockId } } = held;
    try {
      const node = await this.opts.nodes.require(record.node);
      const agent = this.opts.agentFor(node);
      const cut = await this.opts.traffic.cut(name, lockId);
      let current = record;
      try {
        const safety = await this.checkpointAndUpload(record, `${lockId}-before`, cut.logPosition, 'before-restore');
        await agent.remove(name);
        try {
          current = await this.restoreOn(record, node.name, checkpointId, `${lockId}-restore`, record.generation + 1);
        } catch (err) {
          this.opts.log.error({ container: name, err: toChipmunkError(err).toJSON() }, `restoring ${name} from ${checkpointId} failed; putting back its state from just before (${safety.id})`);
          current = await this.restoreOn(record, node.name, safety.id, `${lockId}-undo`, record.generation + 2);
          await this.opts.locks.save(held, current);
          throw err;
        }
        await this.opts.locks.save(held, current);
        const after = await this.checkpointAndUpload(current, `${lockId}-after`, cut.logPosition, 'after-restore');
        return { restoredFrom: checkpointId, safetyCheckpoint: safety.id, checkpoint: after.id };
      } finally {
        if (cut.held && (await this.stillHolds(name, lockId))) await this.opts.traffic.release(name, lockId, current);
      }
    } finally {
      await this.release(held);
    }
  }

  /**
   * Restores checkpoint `checkpointId` of the container on `nodeName` (which must not run it):
   * the agent prepares (image, network), fetches the trees from the store and restores them.
   * Returns the record of the container running there; TIMINGS and READFROM (the replicas the
   * agent read the checkpoint from) are filled in.
   */
  async restoreOn(
    record: ContainerRecord,
    nodeName: string,
    checkpointId: string,
    opId: string,
    generation: number,
    timings: Record<string, number> = {},
    readFrom: string[] = [],
  ): Promise<ContainerRecord> {
    const node = await this.opts.nodes.require(nodeName);
    const agent = this.opts.agentFor(node);
    const imageSource = await this.imageSourceFor(node.name);
    const base = { migrationId: opId, mode: 'copy' as const, spec: record.spec, generation, source: imageSource };
    try {
      // One call: the agent prepares (image, network) while it fetches the trees from the store.
      const [storeUrl, ...replicaUrls] = await this.opts.catalog.readFrom(record.spec.name, checkpointId);
      if (!storeUrl) throw new UnavailableError(`no replica holding checkpoint ${checkpointId} of ${record.spec.name} answers: \`chipmunk checkpoints ${record.spec.name}\` shows where it is`, { name: record.spec.name, checkpoint: checkpointId });
      const t = Date.now();
      const restored = await agent.restore(opId, { ...base, checkpoint: { storeUrl, replicaUrls, id: checkpointId } });
      timings.restoreMs = Date.now() - t;
      if (restored.fetchMs !== undefined) timings.fetchMs = restored.fetchMs;
      if (restored.criuMs !== undefined) timings.criuMs = restored.criuMs;
      readFrom.push(...(restored.readFrom ?? []));
      await agent.settle(opId).catch(() => undefined);
      const running = restored.container;
      return { ...record, node: node.name, status: running.status, generation: running.generation, ...(running.ip ? { ip: running.ip } : {}) };
    } catch (err) {
      await agent.abort(opId).catch(() => undefined);
      throw err;
    }
  }

  /**
   * The next scheduler tick checkpoints it (if protected): after its route started logging, the
   * newest checkpoint must be one cut at a log position.
   */
  expedite(name: string): void {
    this.dueAt.delete(name);
  }

  /** Drops every checkpoint of a removed container. */
  async forget(name: string): Promise<void> {
    await this.opts.catalog.forget(name);
    this.dueAt.delete(name);
    this.failuresInRow.delete(name);
  }

  /** Checkpoints of the container, newest first, from the store. */
  list(name: string): Promise<CheckpointSummary[]> {
    return this.opts.catalog.list(name);
  }

  private async takeCheckpoint(record: ContainerRecord, lockId: string): Promise<CheckpointResult> {
    const cut = await this.opts.traffic.cut(record.spec.name, lockId);
    let frozenMs: number;
    try {
      await controllerPauses.at('checkpoint:cut');
      frozenMs = await this.checkpointOnAgent(record, lockId);
    } finally {
      if (cut.held && (await this.stillHolds(record.spec.name, lockId))) await this.opts.traffic.release(record.spec.name, lockId, record);
    }
    await controllerPauses.at('checkpoint:upload');
    const info = await this.upload(record, lockId, cut.logPosition, 'scheduled');
    await this.trimAfter(record.spec.name);
    return { ...info, frozenMs };
  }

  /** A checkpoint while the caller holds the route: no release here. */
  private async checkpointAndUpload(record: ContainerRecord, agentCheckpointId: string, logPosition: LogPosition | null, reason: string): Promise<CheckpointInfo> {
    await this.checkpointOnAgent(record, agentCheckpointId);
    return this.upload(record, agentCheckpointId, logPosition, reason);
  }

  /** The agent checkpoints the container and lets it run on; returns how long it was frozen. */
  private async checkpointOnAgent(record: ContainerRecord, agentCheckpointId: string): Promise<number> {
    const agent = this.opts.agentFor(await this.opts.nodes.require(record.node));
    try {
      return (await agent.checkpoint(record.spec.name, { checkpointId: agentCheckpointId })).frozenMs;
    } catch (err) {
      await agent.discardCheckpoint(agentCheckpointId).catch(() => undefined);
      throw err;
    }
  }

  private async upload(record: ContainerRecord, agentCheckpointId: string, logPosition: LogPosition | null, reason: string): Promise<CheckpointInfo> {
    const agent = this.opts.agentFor(await this.opts.nodes.require(record.node));
    try {
      const [storeUrl, ...replicaUrls] = await this.opts.catalog.uploadTargets();
      const info = await agent.uploadCheckpoint(agentCheckpointId, {
        container: record.spec.name,
        storeUrl: storeUrl!,
        replicaUrls,
        logPosition,
        // `volumes` tells the store where each volume of the files part sits in the container.
        metadata: { spec: record.spec, generation: record.generation, node: record.node, reason, volumes: record.spec.volumes ?? [] },
      });
      // Committed on every replica: this record is what makes it count.
      return { ...info, ...(await this.opts.catalog.committed(info, [storeUrl!, ...replicaUrls])) };
    } finally {
      await agent.discardCheckpoint(agentCheckpointId).catch(() => undefined);
    }
  }

  /**
   * Trims the log up to the second-newest good checkpoint, not the newest: if the newest turns
   * out corrupt when a failover reads it, the one before must still have every later request.
   */
  private async trimAfter(name: string): Promise<void> {
    const good = (await this.opts.catalog.list(name)).filter((c) => !c.corrupt && c.logPosition !== null);
    const keepFrom = good[1]?.logPosition;
    // A position of a log without an id (stored by an older version) names no log to trim.
    if (!keepFrom?.logId) return;
    await this.opts.traffic.trimLog(name, { logId: keepFrom.logId, seq: keepFrom.seq }).catch((err: unknown) => this.opts.log.warn({ err: toChipmunkError(err).toJSON() }, `trimming the request log of ${name} failed`));
  }

  private async checkpointDue(): Promise<void> {
    const now = Date.now();
    if (now < this.quietUntil) return;
    for (const { value } of await this.opts.store.list<ContainerRecord>('/containers/').catch(() => [])) {
      const name = value.spec.name;
      if (!value.protection || value.status !== 'running' || value.lock || this.running.has(name)) continue;
      if (now < (this.dueAt.get(name) ?? 0)) continue;
      if (!(await this.opts.nodes.isReady(value.node))) continue;
      const everyMs = value.protection.everyMs;
      this.dueAt.set(name, now + everyMs);
      this.running.add(name);
      void this.checkpoint(name)
        .then((c) => {
          this.failuresInRow.delete(name);
          this.opts.log.info({ container: name, checkpoint: c.id, frozenMs: c.frozenMs, newBytes: c.newBytes, logPosition: c.logPosition }, `checkpointed ${name}`);
        })
        .catch((err: unknown) => {
          const failures = (this.failuresInRow.get(name) ?? 0) + 1;
          this.failuresInRow.set(name, failures);
          const retryInMs = Math.min(everyMs, FIRST_RETRY_MS * 2 ** Math.min(failures - 1, 16));
          this.dueAt.set(name, Date.now() + retryInMs);
          this.opts.log.warn({ container: name, failuresInRow: failures, retryInMs, err: toChipmunkError(err).toJSON() }, `scheduled checkpoint of ${name} failed; the previous one stays valid, trying again in ${retryInMs} ms`);
        })
        .finally(() => this.running.delete(name));
    }
  }

  /** The image comes from any other ready node (the target fetches it only if it lacks it). */
  private async imageSourceFor(target: string): Promise<{ node: string; url: string }> {
    const ready = await this.opts.nodes.listReady();
    const other = ready.find((n) => n.name !== target) ?? ready.find((n) => n.name === target);
    if (!other) throw new UnavailableError('no node is ready to supply the image: start an agent, and see `chipmunk node ls`');
    return { node: other.name, url: other.url };
  }

  /**
   * Whether this operation still holds the container's lock. One that lost it (a failover took
   * over: the node died) must not release the route: the failover's own hold and replay decide
   * when traffic flows again.
   */
  private async stillHolds(name: string, lockId: string): Promise<boolean> {
    return (await this.opts.locks.get(name))?.value.lock?.id === lockId;
  }

  /** Ends the operation's hold on the container; a lock already taken over (a failover) is not touched. */
  private async release(held: HeldLock): Promise<void> {
    await this.opts.locks.releaseIfHeld(held).catch((err: unknown) => this.opts.log.error({ err: toChipmunkError(err).toJSON() }, `could not release the lock ${held.lock.id} of ${held.name}`));
  }
}

function assertRunning(name: string, record: ContainerRecord): void {
  if (record.status !== 'running') {
    throw new InvalidInputError(`container ${name} is ${record.status}: only running containers can be checkpointed or restored`, { name, status: record.status });
  }
}
