/**
 * Failover: when a node's lease expires (its agent stopped heartbeating), each protected
 * container on it is restored on a healthy node from its newest good checkpoint, the requests
 * the gateway logged after that checkpoint's cut are replayed into it in order, and only then
 * does the gateway send it live traffic.
 *
 * The route stays held from the start until the replay has succeeded: a failed replay leaves it
 * held (never released to a copy that has not caught up), is recorded, and is retried (the
 * gateway goes on after the last record the restored copy answered, so a retry applies nothing
 * twice). `/replays/NAME` marks a replay still owed; the route sync keeps such a hold.
 *
 * Fencing: the container's generation moves past the dead node's, and the controller keeps
 * /fence/NODE/NAME; when the node heartbeats again its agent is told to stop and remove any older
 * incarnation it still has. The gateway routes to the new node from the moment of the release,
 * and held traffic never goes back to the dead one.
 */
import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import { ConflictError, FailoverFailedError, LogMismatchError, NotFoundError, toChipmunkError, type ChipmunkError, type ErrorJSON } from '../shared/errors.js';
import type { FencedContainer, LogPosition } from '../shared/protocol.js';
import type { CheckpointSummary } from '../checkpoint-store/index.js';
import type { CheckpointCatalog, CheckpointService, LoggedTraffic } from './checkpoints.js';
import type { ContainerRecord } from './containers.js';
import type { NodeRegistry } from './registry.js';
import type { StateStore, Watch } from './store/index.js';

export const fenceKey = (node: string, name: string) => `/fence/${node}/${name}`;
const FAILOVERS_PREFIX = '/failovers/';
const REPLAYS_PREFIX = '/replays/';
export const pendingReplayKey = (name: string) => `${REPLAYS_PREFIX}${name}`;

/**
 * A failover restored the container at `node` and the requests logged after `after` are not
 * replayed into it yet: its route stays held by `holdId` until they are.
 */
export interface PendingReplay {
  failoverId: string;
  holdId: string;
  /** The node that died. */
  from: string;
  node: string;
  checkpoint: string;
  after: LogPosition;
  attempts: number;
  lastError?: ErrorJSON;
  /** The restored copy may have applied a request the replay could not confirm: retrying cannot fix it. */
  uncertain?: boolean;
}

/** Replay attempts within a failover before it is left to the background retry, and the pause between them. */
const REPLAY_ATTEMPTS = 3;
const REPLAY_RETRY_MS = [200, 1_000];
/** How often owed replays are tried again. */
const REPLAY_RETRY_PERIOD_MS = 5_000;

/** What the controller records of one failover (GET /v1/failovers). */
export interface FailoverRecord {
  id: string;
  name: string;
  from: string;
  to?: string;
  /** The checkpoint restored, and the log position it was cut at. */
  checkpoint?: string;
  logPosition?: CheckpointSummary['logPosition'];
  /** Why the restored copy got no replay (no checkpoint was cut in the route's current request log). */
  noReplay?: string;
  /** The last failed replay: the route stays held and the replay is retried. */
  replayError?: ErrorJSON;
  /** Checkpoints passed over, newest first, and why (a corrupt chunk, a failed restore). */
  skipped: Array<{ checkpoint: string; reason: string }>;
  /** When the node was declared dead (its lease expired). */
  detectedAt: number;
  restoredAt?: number;
  finishedAt?: number;
  replayed?: number;
  delivered?: number;
  /** Where the time went, ms: waiting for the lock, target preparation, fetch + restore, replay, release. */
  timings: Record<string, number>;
  outcome: 'running' | 'done' | 'failed';
  error?: ErrorJSON;
}

export interface FailoverTraffic extends LoggedTraffic {
  /** Holds new requests at once, without waiting for those sent to a node that is gone. */
  holdNow(name: string, holdId: string): Promise<boolean>;
  /** The id of the container's current request log; undefined if its route does not log. */
  currentLogId(name: string): Promise<string | undefined>;
}

export interface FailoverServiceOptions {
  store: StateStore;
  nodes: NodeRegistry;
  checkpoints: CheckpointService;
  catalog: CheckpointCatalog;
  traffic: FailoverTraffic;
  log: Logger;
}

export class FailoverService {
  private watch?: Watch;
  private retryTimer?: NodeJS.Timeout;
  private readonly inProgress = new Map<string, Promise<FailoverRecord>>();

  constructor(private readonly opts: FailoverServiceOptions) {}

  /** Watches node liveness; a lease that ends (delete of /liveness/NODE) starts the failovers. */
  async start(): Promise<void> {
    this.watch = await this.opts.store.watch<{ node: string }>('/liveness/', {}, (ev) => {
      if (ev.type !== 'delete') return;
      const node = ev.kv.key.slice('/liveness/'.length);
      void this.nodeLost(node, Date.now());
    });
    this.retryTimer = setInterval(() => void this.retryOwedReplays(), REPLAY_RETRY_PERIOD_MS);
    this.retryTimer.unref();
  }

  stop(): void {
    this.watch?.cancel();
    if (this.retryTimer) clearInterval(this.retryTimer);
  }

  list(): Promise<FailoverRecord[]> {
    return this.opts.store.list<FailoverRecord>(FAILOVERS_PREFIX).then((kvs) => kvs.map((kv) => kv.value).sort((a, b) => a.detectedAt - b.detectedAt));
  }

  /** Fence entries for a node's heartbeat answer. */
  async fenceFor(node: string): Promise<FencedContainer[]> {
    return (await this.opts.store.list<FencedContainer>(`/fence/${node}/`)).map((kv) => kv.value);
  }

  /**
   * A removed container's fences go with it: a later container of the same name, which starts
   * again at generation 0, must not be taken for the stale copy they were about.
   */
  async forgetFences(name: string): Promise<void> {
    for (const { key } of await this.opts.store.list('/fence/')) if (key.endsWith(`/${name}`)) await this.opts.store.delete(key);
  }

  private async nodeLost(node: string, detectedAt: number): Promise<void> {
    const containers = (await this.opts.store.list<ContainerRecord>('/containers/')).map((kv) => kv.value).filter((c) => c.node === node);
    if (containers.length === 0) return;
    this.opts.log.warn({ node, containers: containers.map((c) => c.spec.name) }, `node ${node} is dead (its lease expired)`);
    await Promise.all(
      containers.map(async (c) => {
        if (!c.protection) {
          this.opts.log.warn({ node, container: c.spec.name }, `${c.spec.name} is not protected: it stays down until ${node} returns (\`chipmunk protect\` makes it fail over)`);
          return;
        }
        await this.failover(c.spec.name, node, detectedAt).catch(() => undefined);
      }),
    );
  }

  /** Restores `name` (last seen on `deadNode`) elsewhere. One failover per container at a time. */
  failover(name: string, deadNode: string, detectedAt = Date.now()): Promise<FailoverRecord> {
    const running = this.inProgress.get(name);
    if (running) return running;
    const run = this.run(name, deadNode, detectedAt).finally(() => this.inProgress.delete(name));
    this.inProgress.set(name, run);
    return run;
  }

  private async run(name: string, deadNode: string, detectedAt: number): Promise<FailoverRecord> {
    const { checkpoints, catalog, traffic, log } = this.opts;
    const record: FailoverRecord = { id: `failover-${randomUUID().slice(0, 8)}`, name, from: deadNode, skipped: [], detectedAt, timings: {}, outcome: 'running' };
    await this.save(record);
    try {
      return await checkpoints.withLock(name, 'failover', async (container, lockId) => {
        record.timings.lockMs = Date.now() - detectedAt;
        if (container.node !== deadNode) throw new ConflictError(`${name} no longer runs on ${deadNode} (it is on ${container.node})`, { name });
        const held = await traffic.holdNow(name, lockId);
        let current = container;
        let releasable = false;
        try {
          const intact = (await catalog.list(name)).filter((c) => !c.corrupt);
          // Checkpoints cut in the route's current request log come with the requests after them.
          // One cut in an earlier log (the route was unlogged or removed since), or before the route
          // logged, would lose those: it is tried only when none of the others could be restored,
          // without a replay, and the record says so.
          const logId = await traffic.currentLogId(name);
          const inLog = intact.filter((c) => logId !== undefined && c.logPosition?.logId === logId);
          const good = [...inLog, ...intact.filter((c) => !inLog.includes(c))];
          if (good.length === 0) throw new FailoverFailedError(`${name} has no checkpoint to restore from: it stays down until ${deadNode} returns`, { name, from: deadNode });
          const targets = await this.targetsFor(deadNode);
          if (targets.length === 0) throw new FailoverFailedError(`no ready node to restore ${name} on: it stays down until a node is ready`, { name, from: deadNode });
          let attempt = 0;
          for (const candidate of good) {
            const target = targets[attempt % targets.length]!;
            attempt += 1;
            try {
              current = await checkpoints.restoreOn(container, target, candidate.id, `${lockId}-${attempt}`, container.generation + attempt, record.timings);
              record.to = target;
              record.checkpoint = candidate.id;
              record.logPosition = candidate.logPosition;
              record.restoredAt = Date.now();
              break;
            } catch (err) {
              const corrupt = (await catalog.list(name)).find((c) => c.id === candidate.id)?.corrupt;
              const reason = corrupt ? `corrupt: ${toChipmunkError(err).message}` : toChipmunkError(err).message;
              record.skipped.push({ checkpoint: candidate.id, reason });
              log.error({ container: name, checkpoint: candidate.id, target, corrupt: Boolean(corrupt) }, `restoring ${name} from checkpoint ${candidate.id} on ${target} failed (${reason}); trying the one before`);
              await this.save(record);
            }
          }
          if (inLog.some((c) => c.id === record.checkpoint)) {
            for (const c of intact.filter((c) => !inLog.includes(c) && c.id !== record.checkpoint && !record.skipped.some((s) => s.checkpoint === c.id))) {
              record.skipped.push({ checkpoint: c.id, reason: `cut ${c.logPosition ? `in request log ${c.logPosition.logId ?? '(no id)'}` : 'before the route logged'}, not in the route's current log ${logId}: the requests after it cannot be replayed` });
            }
          }
          if (!record.to) throw new FailoverFailedError(`no checkpoint of ${name} could be restored: ${record.skipped.map((s) => `${s.checkpoint}: ${s.reason}`).join('; ')}`, { name, from: deadNode, skipped: record.skipped });
          const position = record.logPosition;
          const after = position?.logId && position.logId === logId ? { logId: position.logId, seq: position.seq } : undefined;
          if (!after && logId !== undefined) {
            record.noReplay = `no checkpoint of ${name} was cut in its route's current request log (${logId}): restored from ${record.checkpoint} without a replay, so the requests logged since it are not applied`;
            log.warn({ container: name, checkpoint: record.checkpoint }, record.noReplay);
          }
          // Owed before the record names the new node: whoever finds the container there with its
          // route held knows the hold must stay until the replay is done.
          if (after && held) {
            await this.opts.store.put(pendingReplayKey(name), { failoverId: record.id, holdId: lockId, from: deadNode, node: record.to, checkpoint: record.checkpoint!, after, attempts: 0 } satisfies PendingReplay);
          }
          // From here the new incarnation is the container: fence the old one, then record the move.
          await this.opts.store.put(fenceKey(deadNode, name), { name, generation: current.generation } satisfies FencedContainer);
          await this.opts.store.delete(fenceKey(record.to, name));
          await checkpoints.saveRecord(name, lockId, current);
          if (after) {
            const t = Date.now();
            await this.replayOwed(name, after, current, record);
            record.timings.replayMs = Date.now() - t;
          }
          releasable = true;
          record.outcome = 'done';
          record.finishedAt = Date.now();
          log.info({ container: name, from: deadNode, to: record.to, checkpoint: record.checkpoint, ms: record.finishedAt - detectedAt, replayed: record.replayed }, `failed ${name} over to ${record.to}`);
          await this.save(record);
          return record;
        } finally {
          // A failed failover releases nothing: traffic must not go back to the dead node, nor
          // reach a restored copy whose replay did not succeed.
          if (held && record.to && releasable) {
            const t = Date.now();
            await traffic.release(name, lockId, current);
            await this.opts.store.delete(pendingReplayKey(name));
            record.timings.releaseMs = Date.now() - t;
            await this.save(record).catch(() => undefined);
          }
        }
      });
    } catch (err) {
      record.outcome = 'failed';
      record.finishedAt = Date.now();
      record.error = toChipmunkError(err).toJSON();
      log.error({ container: name, err: record.error }, `failover of ${name} from ${deadNode} failed`);
      await this.save(record).catch(() => undefined);
      throw err;
    }
  }

  /**
   * Replays the requests after `after` into the restored container, trying again (the gateway
   * goes on where the last try stopped) until it succeeds, the copy's state is uncertain, or the
   * tries run out: then it throws, the route stays held, and the owed replay is retried later.
   * A log that changed since (unlogged meanwhile) cannot be replayed: said so, not retried.
   */
  private async replayOwed(name: string, after: LogPosition, container: ContainerRecord, record: FailoverRecord): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      try {
        const replay = await this.opts.traffic.replay(name, after, container);
        record.replayed = (record.replayed ?? 0) + replay.replayed;
        record.delivered = (record.delivered ?? 0) + replay.delivered;
        delete record.replayError;
        return;
      } catch (err) {
        if (err instanceof LogMismatchError) {
          record.noReplay = err.message;
          return;
        }
        const error = toChipmunkError(err);
        record.replayError = error.toJSON();
        const uncertain = replayUncertain(error);
        await this.noteReplayFailure(name, error.toJSON(), uncertain);
        await this.save(record).catch(() => undefined);
        this.opts.log.error({ container: name, attempt, err: record.replayError }, `replaying the request log into ${name} failed; its route stays held`);
        if (uncertain || attempt >= REPLAY_ATTEMPTS) {
          throw new FailoverFailedError(
            `${name} was restored on ${container.node} but the replay of its request log failed (${error.message}): its route stays held and the replay is retried${uncertain ? ' into a copy restored again (this one may have applied a request the replay could not confirm)' : ''}`,
            { name, from: record.from, to: container.node },
            err,
          );
        }
        await new Promise((resolve) => setTimeout(resolve, REPLAY_RETRY_MS[attempt - 1] ?? 1_000));
      }
    }
  }

  private async noteReplayFailure(name: string, error: ErrorJSON, uncertain: boolean): Promise<void> {
    const pending = await this.opts.store.get<PendingReplay>(pendingReplayKey(name));
    if (!pending) return;
    await this.opts.store.put(pendingReplayKey(name), { ...pending.value, attempts: pending.value.attempts + 1, lastError: error, ...(uncertain ? { uncertain } : {}) } satisfies PendingReplay);
  }

  /**
   * Replays owed by failovers that ended without them (a failed replay, or a controller that
   * died): under the container's lock, replay (the gateway goes on where it stopped), then
   * release and record the failover done. A copy that may have applied a request the replay
   * could not confirm is replaced first: the checkpoint is restored again on another node (the
   * old copy is fenced) and the replay starts over into the new one.
   */
  async retryOwedReplays(): Promise<void> {
    const owed = await this.opts.store.list<PendingReplay>(REPLAYS_PREFIX).catch(() => []);
    for (const { value: pending, key } of owed) {
      const name = key.slice(REPLAYS_PREFIX.length);
      if (this.inProgress.has(name)) continue;
      await this.opts.checkpoints
        .withLock(name, 'failover', async (locked, lockId) => {
          const still = (await this.opts.store.get<PendingReplay>(key))?.value;
          if (still?.holdId !== pending.holdId) return;
          // Moved meanwhile (its route held all along): what that copy applied is unknown too.
          const owed = locked.node === still.node ? still : { ...still, node: locked.node, uncertain: true };
          const record = (await this.opts.store.get<FailoverRecord>(FAILOVERS_PREFIX + pending.failoverId))?.value;
          const container = owed.uncertain ? await this.restoreAgain(name, owed, locked, lockId) : locked;
          const t = Date.now();
          const replay = await this.opts.traffic.replay(name, pending.after, container);
          await this.opts.traffic.release(name, pending.holdId, container);
          await this.opts.store.delete(key);
          this.opts.log.info({ container: name, failover: pending.failoverId, replayed: replay.replayed }, `the owed replay into ${name} succeeded; its route is released`);
          if (record) {
            const { replayError: _fixed, error: _error, ...rest } = record;
            await this.save({ ...rest, to: container.node, outcome: 'done', finishedAt: Date.now(), replayed: (record.replayed ?? 0) + replay.replayed, delivered: (record.delivered ?? 0) + replay.delivered, timings: { ...record.timings, replayMs: Date.now() - t } });
          }
        })
        .catch(async (err: unknown) => {
          const error = toChipmunkError(err);
          // Removed meanwhile: nothing is owed any more.
          if (error instanceof NotFoundError && error.details.name === name) return void (await this.opts.store.delete(key).catch(() => undefined));
          await this.noteReplayFailure(name, error.toJSON(), replayUncertain(error)).catch(() => undefined);
          this.opts.log.error({ container: name, err: error.toJSON() }, `the owed replay into ${name} failed again; its route stays held`);
        });
    }
  }

  /**
   * Restores the owed replay's checkpoint again, on another ready node, in place of a copy whose
   * state the replay left uncertain; that copy is fenced (its node's agent removes it). Returns
   * the record of the new copy, which the replay then starts over into.
   */
  private async restoreAgain(name: string, pending: PendingReplay, container: ContainerRecord, lockId: string): Promise<ContainerRecord> {
    const [target] = (await this.targetsFor(pending.node)).filter((node) => node !== pending.from);
    if (!target) throw new FailoverFailedError(`no ready node other than ${pending.node} and ${pending.from} to restore ${name} again on: its route stays held`, { name, from: pending.from });
    const generation = container.generation + 1;
    const current = await this.opts.checkpoints.restoreOn(container, target, pending.checkpoint, `${lockId}-again`, generation);
    await this.opts.store.put(pendingReplayKey(name), { ...pending, node: target, attempts: 0, uncertain: false } satisfies PendingReplay);
    await this.opts.store.put(fenceKey(pending.node, name), { name, generation: current.generation } satisfies FencedContainer);
    await this.opts.store.delete(fenceKey(target, name));
    await this.opts.checkpoints.saveRecord(name, lockId, current);
    this.opts.log.warn({ container: name, from: pending.node, to: target, checkpoint: pending.checkpoint }, `restored ${name} again on ${target}: the copy on ${pending.node} may have applied a request its replay could not confirm`);
    return current;
  }

  /** Ready nodes other than the dead one, fewest containers first. */
  private async targetsFor(deadNode: string): Promise<string[]> {
    const ready = (await this.opts.nodes.listReady()).filter((n) => n.name !== deadNode);
    const load = new Map<string, number>();
    for (const { value } of await this.opts.store.list<ContainerRecord>('/containers/')) load.set(value.node, (load.get(value.node) ?? 0) + 1);
    return ready.sort((a, b) => (load.get(a.name) ?? 0) - (load.get(b.name) ?? 0)).map((n) => n.name);
  }

  private async save(record: FailoverRecord): Promise<void> {
    await this.opts.store.put(FAILOVERS_PREFIX + record.id, record);
  }
}

/** The restored copy may have applied a request that no answer confirmed: no replay into it can go on. */
function replayUncertain(error: ChipmunkError): boolean {
  return error.details.written === true || error.details.uncertain === true;
}
