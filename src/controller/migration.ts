/**
 * The migration orchestrator: moves a running container from its node (the source) to another
 * (the target) through recorded phases:
 *
 *   prepare     validate, choose the mode, take the container's lock; the target gets ready
 *   dump        the source freezes and dumps the container
 *   transfer    the target fetches the dump from the source and restores it (one agent call)
 *   verify      the target reports the container running
 *   cleanup     committed: the record names the target; the source serves the remaining pages
 *               (lazy mode) and removes its copy
 *   done        the lock is released
 *
 * The invariant: the container runs exactly once when the orchestrator is done, never zero times
 * and never twice. Each phase is written to the store (/migrations/<id> and the container's lock,
 * in one transaction) before it starts. Once the target runs the container and the record names
 * it (the commit), nothing is undone any more: a later failure (a lost answer to the source's
 * cleanup) is retried, never rolled back. Before the commit, a failure is settled by
 * MigrationSettler (migration-settle.ts), which finds where the container can still run and
 * rolls back, rolls forward, or hands it to the failover service.
 */
import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import {
  CapabilityMissingError,
  ConflictError,
  InvalidInputError,
  LockLostError,
  MigrationFailedError,
  NotFoundError,
  RuntimeFailedError,
  UnavailableError,
  toChipmunkError,
} from '../shared/errors.js';
import { leverOff } from '../shared/downtime-levers.js';
import type { MigrateRequest, MigrationEvent, MigrationMode, MigrationRecord, MigrationSummary } from '../shared/protocol.js';
import { PAGE_SERVER_PORTS } from '../shared/protocol.js';
import { lockedError, type ContainerLocks } from './container-lock.js';
import { controllerPauses } from './faults.js';
import { unreachable, type AgentResolver } from './containers.js';
import { MigrationJournal, migrationKey, type MigrationRun, type TrafficGate } from './migration-journal.js';
import { MigrationSettler, type ContainerRescuer, type Progress } from './migration-settle.js';
import type { AddressRoutes } from './address-routes.js';
import type { Fences } from './fences.js';
import type { NodeRecord, NodeRegistry } from './registry.js';
import type { StateStore } from './store/index.js';

export { migrationKey, type TrafficGate } from './migration-journal.js';
export type { ContainerRescuer } from './migration-settle.js';

export interface PortRange {
  first: number;
  last: number;
}

export type MigrationLog = Pick<Logger, 'info' | 'warn' | 'error'>;

const TRANSFER_PROGRESS_POLL_MS = 250;
/** How often migrations left unsettled (a target that did not answer, a source away) are looked at again. */
const SETTLE_RETRY_MS = 3_000;

export type MigrationEventListener = (event: MigrationEvent) => void;

export interface MigrationOrchestratorOptions {
  store: StateStore;
  nodes: NodeRegistry;
  agentFor: AgentResolver;
  locks: ContainerLocks;
  fences: Fences;
  log: MigrationLog;
  /** Ports the source's CRIU page server may listen on in lazy mode. */
  pageServerPorts?: PortRange;
  /** The gateway in front of exposed containers: holds their traffic while they move. */
  traffic?: TrafficGate;
  /** Restores a protected container from its newest checkpoint when a failed migration lost it. */
  rescuer?: ContainerRescuer;
  /** Moves containers' cluster addresses (address-routes.ts): a migration routes it to the target as soon as it runs there. */
  addressRoutes?: Pick<AddressRoutes, 'routeAhead' | 'follow'>;
}

export class MigrationOrchestrator {
  private readonly nodes: NodeRegistry;
  private readonly agentFor: AgentResolver;
  private readonly locks: ContainerLocks;
  private readonly log: MigrationLog;
  private readonly pageServerPorts: PortPool;
  private readonly journal: MigrationJournal;
  private readonly settler: MigrationSettler;
  private readonly addressRoutes?: Pick<AddressRoutes, 'routeAhead' | 'follow'>;
  /** Migrations this process runs now: the retry loop leaves them to their run. */
  private readonly active = new Set<string>();
  private timer?: NodeJS.Timeout;
  private settling?: Promise<void>;

  constructor(opts: MigrationOrchestratorOptions) {
    this.nodes = opts.nodes;
    this.agentFor = opts.agentFor;
    this.locks = opts.locks;
    this.log = opts.log;
    this.pageServerPorts = new PortPool(opts.pageServerPorts ?? PAGE_SERVER_PORTS);
    this.journal = new MigrationJournal(opts.store, opts.locks, opts.log, opts.traffic);
    this.settler = new MigrationSettler({ ...opts, journal: this.journal });
    this.addressRoutes = opts.addressRoutes;
  }

  /**
   * Migrates the container and reports each phase to `onEvent` as it starts. Throws without
   * changing anything (and before any event) when the migration cannot start; throws
   * MigrationFailedError when it fails later, after settling where the container runs.
   */
  async migrate(name: string, req: MigrateRequest, onEvent: MigrationEventListener = () => {}): Promise<MigrationSummary> {
    const run = await this.prepare(name, req, onEvent);
    this.active.add(run.record.id);
    try {
      return await this.execute(run);
    } finally {
      this.active.delete(run.record.id);
      if (run.pageServerPort !== undefined) this.pageServerPorts.release(run.pageServerPort);
    }
  }

  list(): Promise<MigrationRecord[]> {
    return this.journal.list();
  }

  /**
   * Settles every migration that is not running in this process and has not ended: those a
   * previous controller left mid-way, and those of this one that could not be settled yet (a
   * target that did not answer its abort, a source that was away). Also retries the cleanup of
   * committed migrations whose source did not answer.
   */
  settleUnfinished(): Promise<void> {
    this.settling ??= this.settleOnce().finally(() => (this.settling = undefined));
    return this.settling;
  }

  /** Settles unfinished migrations now and every few seconds. */
  start(): void {
    void this.settleUnfinished();
    this.timer = setInterval(() => void this.settleUnfinished(), SETTLE_RETRY_MS);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  private async settleOnce(): Promise<void> {
    for (const record of await this.journal.list()) {
      if (this.active.has(record.id)) continue;
      try {
        if (record.phase === 'done' || record.phase === 'failed') {
          if (record.cleanupPending) await this.settler.retryCleanup(record);
          continue;
        }
        await this.settler.resolve(record);
      } catch (err) {
        this.log.error(
          { migrationId: record.id, err: toChipmunkError(err).toJSON() },
          `could not settle migration ${record.id} of ${record.name} yet: it keeps the container's lock, and is tried again in ${SETTLE_RETRY_MS / 1000} s`,
        );
      }
    }
  }

  private async prepare(name: string, req: MigrateRequest, onEvent: MigrationEventListener): Promise<MigrationRun> {
    const startedAt = Date.now();
    const { value: container } = await this.locks.require(name);
    if (container.lock?.operation === 'migration') throw lockedError(name, container.lock);
    if (container.status !== 'running') {
      throw new InvalidInputError(`container ${name} is ${container.status}: only running containers can be migrated`, { name, status: container.status });
    }
    const target = await this.nodes.require(req.to);
    if (target.name === container.node) throw new InvalidInputError(`container ${name} is already on node ${target.name}`, { name, node: target.name });
    const source = await this.nodes.require(container.node);
    for (const node of [source, target]) if (!(await this.nodes.isReady(node.name))) throw unreachable(node);
    const mode = chooseMode(req.mode, source, target);
    await this.assertRunsOn(name, source);

    const id = randomUUID();
    const record: MigrationRecord = {
      id,
      name,
      from: source.name,
      to: target.name,
      mode,
      phase: 'prepare',
      history: [{ migrationId: id, phase: 'prepare', at: startedAt, message: `moving ${name} from ${source.name} to ${target.name} (${mode} mode)` }],
      startedAt,
      generation: container.generation,
    };
    const pageServerPort = mode === 'lazy' ? this.pageServerPorts.acquire() : undefined;
    try {
      // A checkpoint in progress ends within seconds: the migration waits for it (bounded).
      const held = await this.locks.acquire(name, 'migration', {
        id,
        phase: 'prepare',
        ops: [{ type: 'put', key: migrationKey(id), value: record }],
        admit: (current) => {
          if (current.node !== source.name || current.status !== 'running') {
            throw new ConflictError(`container ${name} changed while the migration was being prepared (now ${current.status} on ${current.node}): try again`, { name });
          }
        },
      });
      const run: MigrationRun = { record, held, source, target, pageServerPort, onEvent };
      this.journal.emit(run, record.history[0]);
      return run;
    } catch (err) {
      if (pageServerPort !== undefined) this.pageServerPorts.release(pageServerPort);
      throw err;
    }
  }

  /** The record may say running while the process has exited: that one is refused before anything starts. */
  private async assertRunsOn(name: string, source: NodeRecord): Promise<void> {
    const observed = await this.agentFor(source)
      .get(name)
      .catch((err: unknown) => {
        if (err instanceof NotFoundError) return undefined;
        throw err;
      });
    if (observed?.status === 'running') return;
    throw new InvalidInputError(
      `container ${name} is not running on ${source.name} (${observed ? `it is ${observed.status}` : 'its agent does not have it'}): see \`chipmunk logs ${name}\`, then remove it with \`chipmunk rm ${name}\` or run it again`,
      { name, node: source.name, ...(observed ? { status: observed.status } : {}) },
    );
  }

  private async execute(run: MigrationRun): Promise<MigrationSummary> {
    const { id, name, from, to, mode } = run.record;
    const source = this.agentFor(run.source);
    const target = this.agentFor(run.target);
    const generation = run.held.record.generation + 1;
    const progress: Progress = { dumpStarted: false };
    const address = run.held.record.spec.address;
    let routedAhead = false;
    try {
      // The target gets ready (image, network namespace, address, ports) while the container
      // still runs: none of it has to happen inside the downtime.
      await target.prepare(id, { migrationId: id, mode, spec: run.held.record.spec, generation, source: { node: from, url: run.source.url } });
      await controllerPauses.at('migration:prepare');
      await this.journal.hold(run);
      await this.journal.enter(run, 'dump', { message: `freezing ${name} on ${from}` });
      await controllerPauses.at('migration:dump');
      progress.dumpStarted = true;
      const dump = await source
        .dump(name, { migrationId: id, mode, ...(run.pageServerPort !== undefined ? { pageServerPort: run.pageServerPort } : {}) })
        .catch((err: unknown) => {
          // Refused before it froze anything (the container is not running there): nothing to undo on the source.
          if (err instanceof ConflictError || err instanceof NotFoundError) progress.dumpStarted = false;
          throw err;
        });

      const transferTotal = dump.imageBytes + dump.upperBytes;
      await this.journal.enter(run, 'transfer', { totalBytes: transferTotal, message: `${to} fetches the dump from ${from} and restores ${name}` }, undefined, dump.steps);
      await controllerPauses.at('migration:transfer');
      // Bytes as the target receives them: reported live, not recorded (the phase is).
      const poll = setInterval(() => {
        target
          .progress(id)
          .then((p) => p.bytes > 0 && this.journal.emit(run, { migrationId: id, phase: 'transfer', at: Date.now(), bytes: p.bytes, totalBytes: transferTotal }))
          .catch(() => undefined);
      }, TRANSFER_PROGRESS_POLL_MS);
      const restored = await target
        .restore(id, {
          migrationId: id,
          mode,
          spec: run.held.record.spec,
          generation,
          source: { node: from, url: run.source.url },
          ...(dump.pageServer ? { pageServer: dump.pageServer } : {}),
        })
        .finally(() => clearInterval(poll));
      // The copy runs on the target: clients reach it there from now on, while verify and commit
      // are written (a failure below routes it to wherever the record says then).
      if (address && this.addressRoutes && !leverOff('route-ahead')) {
        this.addressRoutes.routeAhead(address, to);
        routedAhead = true;
      }

      await this.journal.enter(run, 'verify', { bytes: restored.bytesTransferred, message: `checking that ${name} runs on ${to}` }, undefined, restored.steps);
      await controllerPauses.at('migration:verify');
      const running = await target.get(name);
      if (running.status !== 'running') {
        throw new RuntimeFailedError(`${name} is ${running.status} on ${to} right after its restore`, { op: 'verify', status: running.status });
      }
      return await this.settler.rollForward(run, running, { frozenAt: dump.frozenAt, restored });
    } catch (err) {
      try {
        if (err instanceof LockLostError) throw await this.journal.abandoned(run, err);
        // Settled already (after the commit, the copy turned out incomplete and was restored elsewhere).
        if (err instanceof MigrationFailedError) throw err;
        return await this.settler.afterFailure(run, err, progress);
      } finally {
        // Routed ahead, then failed: the address goes where the record says the container runs now.
        if (routedAhead) this.addressRoutes?.follow(name);
      }
    }
  }
}


/** Lazy when both nodes can do it and nothing else was asked; asking for lazy where it cannot work is refused. */
function chooseMode(requested: MigrationMode | undefined, source: NodeRecord, target: NodeRecord): MigrationMode {
  const lacking = [source, target].filter((node) => !node.capabilities.lazyMigration).map((node) => node.name);
  if (requested === 'lazy' && lacking.length > 0) {
    throw new CapabilityMissingError(
      `lazy migration needs userfaultfd and CRIU lazy pages on both nodes, and ${lacking.join(' and ')} ${lacking.length > 1 ? 'lack' : 'lacks'} them: migrate with \`--mode copy\` (see \`chipmunk doctor\` on ${lacking.join(', ')})`,
      { nodes: lacking, mode: 'lazy' },
    );
  }
  return requested ?? (lacking.length === 0 ? 'lazy' : 'copy');
}

/**
 * Page server ports held by the migrations this process runs. Kept in memory: a port matters only
 * while its migration runs here; a migration a previous process left is settled (its page
 * server stopped by rollback or cleanup) by its own retry, on its own port.
 */
class PortPool {
  private readonly inUse = new Set<number>();

  constructor(private readonly range: PortRange) {}

  acquire(): number {
    for (let port = this.range.first; port <= this.range.last; port++) {
      if (!this.inUse.has(port)) {
        this.inUse.add(port);
        return port;
      }
    }
    throw new UnavailableError(`all page server ports ${this.range.first}-${this.range.last} are taken by running migrations: wait for one to finish`);
  }

  release(port: number): void {
    this.inUse.delete(port);
  }
}
