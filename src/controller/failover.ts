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
 */
import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import { ConflictError, FailoverFailedError, toChipmunkError, type ErrorJSON } from '../shared/errors.js';
import type { FencedContainer } from '../shared/protocol.js';
import type { CheckpointCatalog, CheckpointService, LoggedTraffic } from './checkpoints.js';
import type { ContainerRecord } from './containers.js';
import { controllerPauses } from './faults.js';
import type { NodeRegistry } from './registry.js';
import type { StateStore, Watch } from './store/index.js';

export const fenceKey = (node: string, name: string) => `/fence/${node}/${name}`;
const FAILOVERS_PREFIX = '/failovers/';

/** What the controller records of one failover (GET /v1/failovers). */
export interface FailoverRecord {
  id: string;
  name: string;
  from: string;
  to?: string;
  /** The checkpoint restored, and the log position it was cut at. */
  checkpoint?: string;
  logPosition?: number | null;
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
  private readonly inProgress = new Map<string, Promise<FailoverRecord>>();

  constructor(private readonly opts: FailoverServiceOptions) {}

  /** Watches node liveness; a lease that ends (delete of /liveness/NODE) starts the failovers. */
  async start(): Promise<void> {
    this.watch = await this.opts.store.watch<{ node: string }>('/liveness/', {}, (ev) => {
      if (ev.type !== 'delete') return;
      const node = ev.kv.key.slice('/liveness/'.length);
      void this.nodeLost(node, Date.now());
    });
  }

  stop(): void {
    this.watch?.cancel();
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
        try {
          await controllerPauses.at('failover:restore');
          const intact = (await catalog.list(name)).filter((c) => !c.corrupt);
          // Checkpoints cut at a log position come with the requests after them; one taken before
          // the route logged would lose those, so it is used only when there is nothing else.
          const cut = intact.filter((c) => c.logPosition !== null);
          const good = cut.length > 0 ? cut : intact;
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
          if (!record.to) throw new FailoverFailedError(`no checkpoint of ${name} could be restored: ${record.skipped.map((s) => `${s.checkpoint}: ${s.reason}`).join('; ')}`, { name, from: deadNode, skipped: record.skipped });
          // From here the new incarnation is the container: fence the old one, then record the move.
          await this.opts.store.put(fenceKey(deadNode, name), { name, generation: current.generation } satisfies FencedContainer);
          await this.opts.store.delete(fenceKey(record.to, name));
          await checkpoints.saveRecord(name, lockId, current);
          await controllerPauses.at('failover:replay');
          if (record.logPosition !== null && record.logPosition !== undefined) {
            const t = Date.now();
            const replay = await traffic.replay(name, record.logPosition, current);
            record.timings.replayMs = Date.now() - t;
            record.replayed = replay.replayed;
            record.delivered = replay.delivered;
          }
          record.outcome = 'done';
          record.finishedAt = Date.now();
          log.info({ container: name, from: deadNode, to: record.to, checkpoint: record.checkpoint, ms: record.finishedAt - detectedAt, replayed: record.replayed }, `failed ${name} over to ${record.to}`);
          await this.save(record);
          return record;
        } finally {
          // A failed failover releases nothing: traffic must not go back to the dead node.
          if (held && record.to) {
            await controllerPauses.at('failover:release');
            const t = Date.now();
            await traffic.release(name, lockId, current);
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
