/**
 * When to fail over, and which containers: the liveness watch, the reconcile pass every half
 * lease, the first-lease grace after the controller begins to listen, the backoff of failovers
 * that failed, the warning about unprotected containers left on a dead node, and the failovers
 * owed to a node that came back without its container.
 *
 * Kept apart from failover.ts, which owns one failover as it runs (lock, hold, restore, fencing,
 * replay): this file decides only when one starts, and starts it through FailoverRunner.
 */
import type { Logger } from 'pino';
import { NotFoundError, toChipmunkError } from '../shared/errors.js';
import type { ContainerLock, ContainerRecord } from './container-lock.js';
import type { AgentResolver } from './containers.js';
import type { FailoverRecord, FailoverRecords } from './failover-records.js';
import type { NodeRegistry } from './registry.js';
import type { StateStore, Watch } from './store/index.js';

export interface FailoverSchedulerOptions {
  store: StateStore;
  nodes: NodeRegistry;
  agentFor: AgentResolver;
  /** A node is dead once its lease (this long) expired; nothing is failed over before the controller has listened this long. */
  nodeLeaseMs: number;
  log: Logger;
}

/** What the scheduler needs of the failover service. */
export interface FailoverRunner {
  /** Fails `name` over from `deadNode` (joins the one running, if any). */
  failover(name: string, deadNode: string): Promise<FailoverRecord>;
  /** A failover, rescue or replay retry of `name` runs in this controller now. */
  inProgress(name: string): boolean;
  /** Whether a failover may take `lock` over from the operation that holds it. */
  mayTakeOver(lock: ContainerLock): boolean;
  /** Failovers whose replay failed, tried again (each pass, before deaths are looked for). */
  retryPendingReplays(): Promise<void>;
}

export class FailoverScheduler {
  private watch?: Watch;
  private timer?: NodeJS.Timeout;
  /** When this controller started listening: agents get one lease to heartbeat before any node is judged. */
  private listeningSince = Number.POSITIVE_INFINITY;
  /** stop() was called: a watch made after it is cancelled at once. */
  private stopped = false;
  private readonly warned = new Set<string>();
  /** Containers whose failover failed: when to try again, and the wait that led there. */
  private readonly backoff = new Map<string, { at: number; waitMs: number }>();

  constructor(
    private readonly opts: FailoverSchedulerOptions,
    private readonly records: FailoverRecords,
    private readonly runner: FailoverRunner,
  ) {}

  /** See FailoverService.start. */
  async start(listeningSince: number): Promise<void> {
    this.listeningSince = listeningSince;
    this.stopped = false;
    // Records an older version wrote have no index entry yet: once, here.
    await this.records.indexPendingReplays();
    await this.watchLiveness();
    this.timer = setInterval(() => {
      // A watch that could not be made (the store member a new leader's client still pointed at
      // was dead) is made again; the pass below acts on deaths meanwhile, only later.
      if (!this.watch) void this.watchLiveness();
      void this.reconcile();
    }, Math.max(250, Math.floor(this.opts.nodeLeaseMs / 2)));
    this.timer.unref();
  }

  stop(): void {
    this.stopped = true;
    this.watch?.cancel();
    this.watch = undefined;
    if (this.timer) clearInterval(this.timer);
  }

  /** Fails over at once when a liveness key goes; a failure to watch is logged, not thrown: start() must not stop the leader's work. */
  private async watchLiveness(): Promise<void> {
    try {
      const watch = await this.opts.store.watch<{ node: string }>('/liveness/', {}, (ev) => {
        if (ev.type === 'delete') void this.reconcile();
      });
      if (this.stopped) watch.cancel();
      else this.watch = watch;
    } catch (err) {
      this.opts.log.warn({ err: toChipmunkError(err).toJSON() }, 'watching node liveness failed; dead nodes are found by the periodic pass until the watch is made again');
    }
  }

  /** Fails over every protected container whose node is dead and that no other operation of this controller handles. */
  async reconcile(): Promise<void> {
    // Right after a start no agent has had the chance to heartbeat to this controller yet.
    if (Date.now() - this.listeningSince < this.opts.nodeLeaseMs) return;
    await this.runner.retryPendingReplays().catch((err: unknown) => this.opts.log.warn({ err: toChipmunkError(err).toJSON() }, 'retrying pending replays failed'));
    const records = await this.opts.store.list<ContainerRecord>('/containers/').catch(() => []);
    const ready = new Set((await this.opts.nodes.listReady().catch(() => undefined))?.map((n) => n.name) ?? []);
    if (ready.size === 0) return;
    const lost = new Map<string, string[]>();
    for (const { value } of records) {
      if (ready.has(value.node) || this.runner.inProgress(value.spec.name)) continue;
      if (value.status === 'lost' || value.status === 'stopped' || value.status === 'created') continue;
      if (value.lock && !this.runner.mayTakeOver(value.lock)) continue;
      if (!value.protection) {
        lost.set(value.node, [...(lost.get(value.node) ?? []), value.spec.name]);
        continue;
      }
      if (!this.retryDue(value.spec.name)) continue;
      this.failOverWithBackoff(value.spec.name, value.node);
    }
    for (const [node, names] of lost) this.warnOnce(node, names);
    await this.retryOwed(records.map((kv) => kv.value), ready).catch((err: unknown) => this.opts.log.warn({ err: toChipmunkError(err).toJSON() }, 'retrying failed failovers failed'));
  }

  /**
   * A container whose failover failed, and whose node is back: if the node came back running it
   * (it was cut off, not dead), nothing is owed any more; if it came back without it (its host
   * restarted), it is restored from its checkpoints as for a dead node. The record still names
   * that node, so nothing else would ever bring it back.
   */
  private async retryOwed(records: ContainerRecord[], ready: Set<string>): Promise<void> {
    const byName = new Map(records.map((record) => [record.spec.name, record]));
    for (const owed of await this.records.owed()) {
      const container = byName.get(owed.name);
      if (!container?.protection || container.node !== owed.from) {
        await this.records.paid(owed.name);
        continue;
      }
      // A node still dead is the loop's; a locked container is another operation's.
      if (!ready.has(owed.from) || container.lock || this.runner.inProgress(owed.name) || !this.retryDue(owed.name)) continue;
      const there = await this.opts.agentFor(await this.opts.nodes.require(owed.from))
        .get(owed.name)
        .then(
          (c) => c,
          (err: unknown) => (err instanceof NotFoundError ? null : undefined),
        );
      // No answer: asked again on the next pass.
      if (there === undefined) continue;
      if (there?.status === 'running' && there.generation >= container.generation) {
        await this.records.paid(owed.name);
        continue;
      }
      this.opts.log.warn({ container: owed.name, node: owed.from, failover: owed.failoverId }, `${owed.from} is back without ${owed.name}, whose failover failed: restoring it from its checkpoints`);
      this.failOverWithBackoff(owed.name, owed.from);
    }
  }

  /** Starts a failover without waiting for it; a failure delays the next try of `name` (nextBackoff), a success clears the delay. */
  private failOverWithBackoff(name: string, deadNode: string): void {
    void this.runner.failover(name, deadNode).then(
      () => this.backoff.delete(name),
      () => this.backoff.set(name, nextBackoff(this.backoff.get(name))),
    );
  }

  private retryDue(name: string): boolean {
    return (this.backoff.get(name)?.at ?? 0) <= Date.now();
  }

  private warnOnce(node: string, names: string[]): void {
    const key = `${node}:${names.join(',')}`;
    if (this.warned.has(key)) return;
    this.warned.add(key);
    this.opts.log.warn({ node, containers: names }, `node ${node} is dead (its lease expired); unprotected containers on it stay down until it returns (\`chipmunk protect\` makes them fail over)`);
  }
}

/** A failed failover is tried again after 5 s, then twice as long each time, up to 5 minutes. */
function nextBackoff(previous: { waitMs: number } | undefined): { at: number; waitMs: number } {
  const waitMs = Math.min(previous ? previous.waitMs * 2 : 5_000, 5 * 60_000);
  return { at: Date.now() + waitMs, waitMs };
}
