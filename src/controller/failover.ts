/**
 * Failover: when a node's lease expires (its agent stopped heartbeating), each protected
 * container on it is restored on a healthy node from its newest good checkpoint, the requests
 * the gateway logged after that checkpoint's cut are replayed into it in order, and only then
 * does the gateway send it live traffic.
 *
 * Fencing: the container's generation moves past the dead node's, and the controller keeps
 * /fence/NODE/NAME; when the node heartbeats again its agent is told to stop and remove any older
 * incarnation it still has. The gateway routes to the new node from the moment of the release,
 * and held traffic never goes back to the dead one.
 *
 * This file runs one failover (and resumes or rescues one); when one starts, and for which
 * containers, is failover-scheduler.ts's; the restore step is failover-restore.ts's.
 */
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { ConflictError, FailoverFailedError, LogMismatchError, toChipmunkError } from '../shared/errors.js';
import type { LogPosition } from '../shared/protocol.js';
import type { CheckpointCatalog, CheckpointService, LoggedTraffic } from './checkpoints.js';
import type { ContainerLock, ContainerLocks, ContainerRecord, HeldLock } from './container-lock.js';
import { controllerPauses } from './faults.js';
import type { Fences } from './fences.js';
import type { ContainerRescuer } from './migration-settle.js';
import { FailoverRecords, type FailoverRecord } from './failover-records.js';
import { restoreFromCheckpoints, type RestoreDeps } from './failover-restore.js';
import { FailoverScheduler, type FailoverSchedulerOptions } from './failover-scheduler.js';

export type { FailoverRecord } from './failover-records.js';

const REPLAY_ATTEMPTS = 3;
const REPLAY_RETRY_MS = 1_000;

export interface FailoverTraffic extends LoggedTraffic {
  /** Holds new requests at once, without waiting for those sent to a node that is gone. */
  holdNow(name: string, holdId: string): Promise<boolean>;
  /** The id of the container's current request log; undefined if its route does not log. */
  currentLogId(name: string): Promise<string | undefined>;
}

/** The scheduler's options (store, nodes, agentFor, nodeLeaseMs, log), and what a failover itself uses. */
export interface FailoverServiceOptions extends FailoverSchedulerOptions {
  locks: ContainerLocks;
  fences: Fences;
  checkpoints: CheckpointService;
  catalog: CheckpointCatalog;
  traffic: FailoverTraffic;
}

export class FailoverService implements ContainerRescuer {
  private readonly inProgress = new Map<string, Promise<FailoverRecord>>();
  private readonly records: FailoverRecords;
  private readonly scheduler: FailoverScheduler;

  constructor(private readonly opts: FailoverServiceOptions) {
    this.records = new FailoverRecords(opts.store);
    this.scheduler = new FailoverScheduler(opts, this.records, {
      failover: (name, deadNode) => this.failover(name, deadNode),
      inProgress: (name) => this.inProgress.has(name),
      mayTakeOver: (lock) => this.mayTakeOver(lock),
      retryPendingReplays: () => this.retryPendingReplays(),
    });
  }

  /**
   * Watches node liveness (a lease that ends deletes /liveness/NODE: failover at once), and looks
   * every half lease for protected containers on nodes that are not ready, so a death this
   * process did not see (it happened while it was down or starting, or a failover that could
   * not run then) is still acted on.
   *
   * `listeningSince`: when this controller's API began to take heartbeats (default: now). No
   * node is judged before agents had a lease's time to heartbeat to it: leases ran out while no
   * controller answered. A follower that answered heartbeats for longer than that before it was
   * elected judges at once (its own liveness writes are what the lapsed leader's would have been).
   */
  start(listeningSince = Date.now()): Promise<void> {
    return this.scheduler.start(listeningSince);
  }

  stop(): void {
    this.scheduler.stop();
  }

  list(): Promise<FailoverRecord[]> {
    return this.records.list();
  }

  /** Fails over every protected container whose node is dead and that no other operation of this controller handles (failover-scheduler.ts). */
  reconcile(): Promise<void> {
    return this.scheduler.reconcile();
  }

  /**
   * Restores `name` (last seen on `deadNode`) elsewhere. One failover per container at a time.
   * Waits for nothing: a checkpoint of the dead node's container can only fail, and a lock a
   * previous controller left ended with it.
   */
  failover(name: string, deadNode: string, detectedAt = Date.now()): Promise<FailoverRecord> {
    return this.once(name, async () => {
      const record = this.newRecord(name, deadNode, detectedAt);
      await this.save(record);
      let held: HeldLock;
      try {
        held = await this.opts.locks.acquire(name, 'failover', { takeOver: (lock) => this.mayTakeOver(lock), wait: false });
      } catch (err) {
        await this.failed(record, err);
        throw err;
      }
      return this.run(record, held);
    });
  }

  /** A failed migration lost the container (its memory is gone): restore it from its newest checkpoint, under the lock handed over. */
  async rescue(held: HeldLock, lostOn: string, reason: string): Promise<ContainerRecord> {
    await this.once(held.name, () => this.restoreAgain(held, lostOn, reason));
    return (await this.opts.locks.require(held.name)).value;
  }

  /**
   * A failover or restore a previous controller left under `held` (adopted): if the container
   * already runs on its new node, the requests logged after its checkpoint are replayed (unless
   * that was done) and traffic released; otherwise it is restored again from its checkpoints.
   */
  resume(held: HeldLock, interrupted?: FailoverRecord): Promise<void> {
    return this.resumeHeld(held, interrupted, 'the controller stopped during this failover; a new one takes over', false);
  }

  /**
   * resume(), also for a failover of this controller whose replay is owed (`insideOnce`: the
   * caller runs under this container's once-guard already, so a restore again must not wait
   * for it: it would wait for itself). `why` is what the interrupted failover failed of, if
   * its copy no longer runs.
   */
  private async resumeHeld(held: HeldLock, interrupted: FailoverRecord | undefined, why: string, insideOnce: boolean): Promise<void> {
    const { locks, traffic, nodes, agentFor } = this.opts;
    const attempt = interrupted && !interrupted.to ? interrupted.attempt : undefined;
    if (attempt) {
      // The controller died during that restore: if its copy runs, it is the container (recorded now, then replayed).
      const target = await nodes.get(attempt.to);
      const made = target && (await nodes.isReady(target.name)) ? await agentFor(target).get(held.name).catch(() => undefined) : undefined;
      if (made?.status === 'running' && made.generation === attempt.generation) {
        await locks.save(held, { ...held.record, node: attempt.to, status: 'running', generation: made.generation, ip: made.ip });
        await this.opts.fences.fence(interrupted!.from, held.name, made.generation);
        Object.assign(interrupted!, { to: attempt.to, checkpoint: attempt.checkpoint, logPosition: attempt.logPosition, restoredAt: Date.now() });
        await this.save(interrupted!);
      }
    }
    const node = await nodes.get(held.record.node);
    const here = node && (await nodes.isReady(node.name)) ? await agentFor(node).get(held.name).catch(() => undefined) : undefined;
    if (here?.status === 'running' && here.generation >= held.record.generation) {
      const current = { ...held.record, generation: here.generation, ip: here.ip, status: 'running' as const };
      const position = interrupted?.logPosition;
      if (interrupted?.to === current.node && position?.logId && !interrupted.noReplay && interrupted.replayed === undefined) {
        const replay = await this.replay(interrupted, { logId: position.logId, seq: position.seq }, current);
        Object.assign(interrupted, { replayed: replay.replayed, delivered: replay.delivered, outcome: 'done', finishedAt: Date.now(), replayPending: false });
        delete interrupted.error;
        delete interrupted.replayError;
        await this.save(interrupted);
      }
      await traffic.release(held.name, held.lock.id, current);
      await locks.release(held, current);
      return;
    }
    if (interrupted) await this.failed(interrupted, new FailoverFailedError(why, { name: held.name, from: interrupted.from }));
    if (!held.record.protection) {
      await locks.release(held, { ...held.record, status: 'unknown' });
      return;
    }
    const reason = `${interrupted?.id ?? 'the interrupted restore'} left no running copy on ${held.record.node}: restored again`;
    if (insideOnce) await this.restoreAgain(held, held.record.node, reason);
    else await this.rescue(held, held.record.node, reason);
  }

  /** A new failover record, and the container restored from its checkpoints under `held` (no once-guard: the caller's). */
  private async restoreAgain(held: HeldLock, lostOn: string, reason: string): Promise<FailoverRecord> {
    const started = this.newRecord(held.name, lostOn, Date.now());
    started.reason = reason;
    await this.save(started);
    return this.run(started, held);
  }

  /** The record of the failover that ran under lock `lockId`, if any. */
  async byLock(lockId: string): Promise<FailoverRecord | undefined> {
    return this.records.byLock(lockId);
  }

  private once(name: string, fn: () => Promise<FailoverRecord>): Promise<FailoverRecord> {
    const running = this.inProgress.get(name);
    if (running) return running;
    const run = fn().finally(() => this.inProgress.delete(name));
    this.inProgress.set(name, run);
    return run;
  }

  /** A checkpoint (it can only fail on a dead node) or a lock a previous controller left. A migration settles its own failure. */
  private mayTakeOver(lock: ContainerLock): boolean {
    return lock.operation === 'checkpoint' || lock.owner !== this.opts.locks.owner;
  }

  private newRecord(name: string, from: string, detectedAt: number): FailoverRecord {
    return { id: `failover-${randomUUID().slice(0, 8)}`, name, from, skipped: [], detectedAt, timings: {}, outcome: 'running' };
  }

  private async failed(record: FailoverRecord, err: unknown): Promise<void> {
    record.outcome = 'failed';
    record.finishedAt = Date.now();
    record.error = toChipmunkError(err).toJSON();
    this.opts.log.error({ container: record.name, err: record.error }, `failover of ${record.name} from ${record.from} failed`);
    await this.save(record).catch(() => undefined);
  }

  private async run(record: FailoverRecord, held: HeldLock): Promise<FailoverRecord> {
    const { traffic, log, locks, fences } = this.opts;
    const { name, from: deadNode, detectedAt } = record;
    const lockId = held.lock.id;
    const container = held.record;
    record.lockId = lockId;
    let keepLock = false;
    try {
      record.timings.lockMs = Date.now() - detectedAt;
      if (container.node !== deadNode) throw new ConflictError(`${name} no longer runs on ${deadNode} (it is on ${container.node})`, { name });
      const held_ = await traffic.holdNow(name, lockId);
      let current = container;
      try {
        await controllerPauses.at('failover:restore');
        const logId = await traffic.currentLogId(name);
        const restored = await restoreFromCheckpoints(this.placement(), { record, container, lockId, logId });
        current = restored.current;
        const { to } = restored;
        // From here the new incarnation is the container: fence the old one, then record the move.
        for (const node of [deadNode, ...restored.failedOn]) if (node !== to) await fences.fence(node, name, current.generation);
        await fences.clear(to, name);
        await locks.save(held, current);
        await controllerPauses.at('failover:replay');
        const position = record.logPosition;
        const after = position?.logId && position.logId === logId ? { logId: position.logId, seq: position.seq } : undefined;
        if (!after && logId !== undefined) {
          record.noReplay = `no checkpoint of ${name} was cut in its route's current request log (${logId}): restored from ${record.checkpoint} without a replay, so the requests logged since it are not applied`;
          log.warn({ container: name, checkpoint: record.checkpoint }, record.noReplay);
        }
        if (after) {
          const t = Date.now();
          // Held again under this failover's id: a checkpoint the node's death cut short may have
          // taken the hold over (its hold request crossed ours) and released it since.
          if (held_) await traffic.holdNow(name, lockId);
          const replay = await this.replay(record, after, current).catch(async (err: unknown) => {
            // The new copy runs but lacks requests that were acknowledged: it must not get live
            // traffic, and protection must not cut a checkpoint from it. The lock and the hold stay.
            record.replayPending = true;
            keepLock = true;
            throw err;
          });
          record.timings.replayMs = Date.now() - t;
          record.replayed = replay.replayed;
          record.delivered = replay.delivered;
        }
        record.outcome = 'done';
        record.finishedAt = Date.now();
        await this.records.paid(name);
        log.info({ container: name, from: deadNode, to: record.to, checkpoint: record.checkpoint, ms: record.finishedAt - detectedAt, replayed: record.replayed }, `failed ${name} over to ${record.to}`);
        await this.save(record);
        return record;
      } finally {
        // A failed failover releases nothing: traffic must not go back to the dead node.
        if (held_ && record.outcome === 'done') {
          await controllerPauses.at('failover:release');
          const t = Date.now();
          await traffic.release(name, lockId, current);
          record.timings.releaseMs = Date.now() - t;
          await this.save(record).catch(() => undefined);
        }
      }
    } catch (err) {
      await this.failed(record, err);
      // Owed (tried again), unless the container is elsewhere now or its replay is owed instead.
      if (!keepLock && !(err instanceof ConflictError)) {
        await this.records.owe({ name, from: deadNode, failoverId: record.id }).catch(() => undefined);
      }
      throw err;
    } finally {
      if (!keepLock) await locks.releaseIfHeld(held).catch((err: unknown) => log.error({ err: toChipmunkError(err).toJSON() }, `could not release the lock ${lockId} of ${name}`));
    }
  }

  /** The logged requests after the checkpoint's cut, into the new copy; retried a few times (a replay resumes from where it is: positions make it idempotent). */
  private async replay(record: FailoverRecord, after: LogPosition, current: ContainerRecord): Promise<{ replayed: number; delivered: number }> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.opts.traffic.replay(record.name, after, current);
      } catch (err) {
        if (err instanceof LogMismatchError) {
          // The route's log changed since the cut (unlogged and logged again): nothing to replay from it.
          record.noReplay = err.message;
          return { replayed: 0, delivered: 0 };
        }
        record.replayError = toChipmunkError(err).toJSON();
        // The copy may have applied a request the gateway could not confirm: another replay could apply it twice.
        if (toChipmunkError(err).details.written === true || attempt >= REPLAY_ATTEMPTS) throw err;
        // Its node died: the owed replay's retry restores the container elsewhere instead.
        if (!(await this.opts.nodes.isReady(current.node).catch(() => true))) throw err;
        this.opts.log.warn({ container: record.name, attempt, err: toChipmunkError(err).toJSON() }, `replaying the logged requests of ${record.name} failed; trying again`);
        await sleep(REPLAY_RETRY_MS);
      }
    }
  }

  /** Failovers whose replay failed: tried again while their lock still holds the container. */
  private async retryPendingReplays(): Promise<void> {
    for (const record of await this.records.pendingReplays()) {
      if (!record.lockId || this.inProgress.has(record.name)) continue;
      const current = await this.opts.locks.get(record.name);
      if (current?.value.lock?.id !== record.lockId) continue;
      const held: HeldLock = { name: record.name, lock: current.value.lock, record: current.value };
      await this.once(record.name, async () => {
        const nodeAlive = await this.opts.nodes.isReady(held.record.node);
        const node = nodeAlive ? await this.opts.nodes.require(held.record.node) : undefined;
        const copy = node ? await this.opts.agentFor(node).get(record.name).catch(() => undefined) : undefined;
        const copyRuns = copy?.status === 'running' && copy.generation >= held.record.generation;
        const uncertain = record.replayError?.details?.written === true;
        if (!uncertain && copyRuns) {
          await this.resumeHeld(held, record, `the replay of ${record.id} could not go on`, true);
          return record;
        }
        // The copy may have applied a request the replay could not confirm (its state is unknown),
        // or it is gone (its node died, or died and came back without it): what is left of it
        // goes, and the container is restored again from its checkpoint, with a full replay
        // (here, under the lock this failover still holds).
        if (node) {
          await this.opts.agentFor(node).remove(record.name).catch((err: unknown) => {
            if (toChipmunkError(err).code !== 'CHIPMUNK_NOT_FOUND') throw err;
          });
        }
        await this.save({ ...record, replayPending: false });
        return this.restoreAgain(
          held,
          held.record.node,
          uncertain && copyRuns
            ? `the replay into the copy restored by ${record.id} may have applied a request twice: restored again`
            : `the copy ${record.id} restored on ${held.record.node} ${nodeAlive ? 'no longer runs (its node restarted)' : 'died with its node'} before the replay: restored again`,
        );
      }).catch((err: unknown) => this.opts.log.warn({ container: record.name, err: toChipmunkError(err).toJSON() }, `replay of ${record.name} failed again; its route stays held`));
    }
  }

  private placement(): RestoreDeps {
    const { store, nodes, fences, catalog, checkpoints, log } = this.opts;
    return { store, nodes, fences, catalog, checkpoints, log, save: (record) => this.save(record) };
  }

  private save(record: FailoverRecord): Promise<void> {
    return this.records.save(record);
  }
}

