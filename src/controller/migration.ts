/**
 * The migration orchestrator: moves a running container from its node (the source) to another
 * (the target) through recorded phases:
 *
 *   prepare     validate, choose the mode, take the container's migration lock
 *   checkpoint  the source freezes and dumps the container
 *   transfer    the target fetches the checkpoint from the source and restores it (one agent call)
 *   verify      the target reports the container running
 *   cleanup     the source serves the remaining pages (lazy mode) and removes its copy
 *   done        the container record names the target
 *
 * The invariant throughout: the container runs exactly once when the orchestrator is done, never
 * zero times and never twice. A failure from the checkpoint on therefore undoes in a fixed order:
 * the target removes whatever it restored (abort) before the source runs the container again
 * (rollback). Each phase is written to the store (/migrations/<id> and the container record's
 * `migration` field, in one transaction) before it starts, so a controller that crashed mid-way
 * can resolve the migration when it starts again (resolveInterrupted).
 */
import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  ConflictError,
  CapabilityMissingError,
  InvalidInputError,
  MigrationFailedError,
  MigrationInProgressError,
  NotFoundError,
  RuntimeFailedError,
  StoreConflictError,
  UnavailableError,
  toChipmunkError,
  type ChipmunkError,
  type MigrationPhase,
} from '../shared/errors.js';
import type {
  AgentContainer,
  MigrateRequest,
  MigrationEvent,
  MigrationMode,
  MigrationPhaseName,
  MigrationRecord,
  MigrationSummary,
  RestoreResult,
} from '../shared/protocol.js';
import { PAGE_SERVER_PORTS } from '../shared/protocol.js';
import type { AgentApi } from './agent-client.js';
import { controllerPauses } from './faults.js';
import { BUSY_WAIT_MS, containerKey, unreachable, type AgentResolver, type ContainerRecord } from './containers.js';
import type { NodeRecord, NodeRegistry } from './registry.js';
import type { StateStore, TxnResult } from './store/index.js';

const MIGRATIONS_PREFIX = '/migrations/';

export function migrationKey(id: string): string {
  return MIGRATIONS_PREFIX + id;
}

export interface PortRange {
  first: number;
  last: number;
}

const DEFAULT_PAGE_SERVER_PORTS: PortRange = PAGE_SERVER_PORTS;

export type MigrationLog = Pick<Logger, 'info' | 'warn' | 'error'>;

const TRANSFER_PROGRESS_POLL_MS = 250;

export type MigrationEventListener = (event: MigrationEvent) => void;

export interface MigrationOrchestratorOptions {
  store: StateStore;
  nodes: NodeRegistry;
  agentFor: AgentResolver;
  log: MigrationLog;
  /** Ports the source's CRIU page server may listen on in lazy mode. */
  pageServerPorts?: PortRange;
  /** The gateway in front of exposed containers: holds their traffic while they move. */
  traffic?: TrafficGate;
}

/** What the orchestrator needs of the gateway (RouteService implements it). Best effort both. */
export interface TrafficGate {
  /** Before the container freezes: new requests wait. */
  hold(name: string, migrationId: string): Promise<void>;
  /** Once it answers again, at `container`'s location (the target, or the source after a rollback). */
  release(name: string, migrationId: string, container: ContainerRecord): Promise<void>;
}

/** One migration while this controller runs it, with the store state it last wrote. */
interface Run {
  record: MigrationRecord;
  container: ContainerRecord;
  /** modRevision of the container record after this run's last write: the lock's compare-and-swap token. */
  containerRevision: number;
  source: NodeRecord;
  target: NodeRecord;
  pageServerPort?: number;
  onEvent: MigrationEventListener;
}

/** How far a migration got, which decides what a failure has to undo. */
interface Progress {
  /** The source may have frozen or dumped the container. */
  checkpointAttempted: boolean;
  /** The target may hold a partial or complete copy. */
  restoreAttempted: boolean;
  /** The source removed its copy: the target's is the only one left. */
  sourceFinished: boolean;
}

export class MigrationOrchestrator {
  private readonly store: StateStore;
  private readonly nodes: NodeRegistry;
  private readonly agentFor: AgentResolver;
  private readonly log: MigrationLog;
  private readonly pageServerPorts: PortPool;
  private readonly traffic?: TrafficGate;
  /** Migrations whose traffic the gateway holds: released whatever happens. */
  private readonly held = new Set<string>();

  constructor(opts: MigrationOrchestratorOptions) {
    this.traffic = opts.traffic;
    this.store = opts.store;
    this.nodes = opts.nodes;
    this.agentFor = opts.agentFor;
    this.log = opts.log;
    this.pageServerPorts = new PortPool(opts.pageServerPorts ?? DEFAULT_PAGE_SERVER_PORTS);
  }

  /**
   * Migrates the container and reports each phase to `onEvent` as it starts. Throws without
   * changing anything (and before any event) when the migration cannot start; throws
   * MigrationFailedError, after putting the container back on the source, when it fails later.
   */
  async migrate(name: string, req: MigrateRequest, onEvent: MigrationEventListener = () => {}): Promise<MigrationSummary> {
    const run = await this.prepare(name, req, onEvent);
    try {
      return await this.execute(run);
    } finally {
      if (run.pageServerPort !== undefined) this.pageServerPorts.release(run.pageServerPort);
    }
  }

  async list(): Promise<MigrationRecord[]> {
    const records = (await this.store.list<MigrationRecord>(MIGRATIONS_PREFIX)).map((kv) => kv.value);
    return records.sort((a, b) => a.startedAt - b.startedAt);
  }

  /**
   * Settles the migrations a previous controller left mid-way (it crashed or was killed), so each
   * container runs exactly once again and its lock is released:
   * - the source still runs the container: the migration failed; the target drops any copy;
   * - the target runs it: the migration is adopted as done;
   * - neither does: the source rolls back.
   * Call it before accepting new migrations.
   */
  async resolveInterrupted(): Promise<void> {
    for (const { value: record } of await this.store.list<MigrationRecord>(MIGRATIONS_PREFIX)) {
      if (record.phase === 'done' || record.phase === 'failed') continue;
      try {
        await this.resolve(record);
      } catch (err) {
        this.log.error(
          { migrationId: record.id, err: toChipmunkError(err).toJSON() },
          `could not resolve the interrupted migration ${record.id} of ${record.name}: it keeps its lock until the next controller start`,
        );
      }
    }
  }

  private async prepare(name: string, req: MigrateRequest, onEvent: MigrationEventListener): Promise<Run> {
    const startedAt = Date.now();
    // Retried only when the container record changed between the read and the lock; the next
    // round sees the change (another migration's lock, a stop) and decides on it.
    for (;;) {
      const current = await this.store.get<ContainerRecord>(containerKey(name));
      if (!current) throw new NotFoundError(`unknown container "${name}": see \`chipmunk ps\` for the containers of this cluster`, { name });
      const container = current.value;
      if (container.migration) throw new MigrationInProgressError(name, container.migration.id);
      if (container.busy) {
        // A checkpoint takes seconds: the migration waits for it rather than failing.
        if (Date.now() - startedAt > BUSY_WAIT_MS) {
          throw new ConflictError(`container ${name} is busy (${container.busy.operation} ${container.busy.id}); try again when it ends`, { name, busy: container.busy });
        }
        await sleep(100);
        continue;
      }
      if (container.status !== 'running') {
        throw new InvalidInputError(`container ${name} is ${container.status}: only running containers can be migrated`, { name, status: container.status });
      }
      const target = await this.nodes.require(req.to);
      if (target.name === container.node) throw new InvalidInputError(`container ${name} is already on node ${target.name}`, { name, node: target.name });
      const source = await this.nodes.require(container.node);
      for (const node of [source, target]) if (!(await this.nodes.isReady(node.name))) throw unreachable(node);
      const mode = chooseMode(req.mode, source, target);

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
      };
      const pageServerPort = mode === 'lazy' ? this.pageServerPorts.acquire() : undefined;
      const locked: ContainerRecord = { ...container, migration: { id, phase: 'prepare' } };
      const key = containerKey(name);
      let result: TxnResult | undefined;
      try {
        result = await this.store.txn({
          compare: [{ key, modRevision: current.modRevision }],
          ops: [
            { type: 'put', key, value: locked },
            { type: 'put', key: migrationKey(id), value: record },
          ],
        });
      } finally {
        if (!result?.succeeded && pageServerPort !== undefined) this.pageServerPorts.release(pageServerPort);
      }
      if (result.succeeded) {
        const run: Run = { record, container: locked, containerRevision: result.revision, source, target, pageServerPort, onEvent };
        this.emit(run, record.history[0]);
        return run;
      }
    }
  }

  private async execute(run: Run): Promise<MigrationSummary> {
    const { id, name, from, to, mode } = run.record;
    const source = this.agentFor(run.source);
    const target = this.agentFor(run.target);
    const progress: Progress = { checkpointAttempted: false, restoreAttempted: false, sourceFinished: false };
    try {
      // The target gets ready (image, network namespace, address, ports) while the container
      // still runs: none of it has to happen inside the downtime.
      progress.restoreAttempted = true;
      await target.prepare(id, {
        migrationId: id,
        mode,
        spec: run.container.spec,
        generation: run.container.generation + 1,
        source: { node: from, url: run.source.url },
      });
      await controllerPauses.at('migration:prepare');
      if (this.traffic) {
        await this.traffic.hold(name, id);
        this.held.add(id);
      }
      await this.enter(run, 'checkpoint', { message: `freezing ${name} on ${from}` });
      await controllerPauses.at('migration:dump');
      progress.checkpointAttempted = true;
      const checkpoint = await source.checkpoint(name, {
        migrationId: id,
        mode,
        ...(run.pageServerPort !== undefined ? { pageServerPort: run.pageServerPort } : {}),
      });

      await this.enter(run, 'transfer', {
        totalBytes: checkpoint.imageBytes + checkpoint.upperBytes,
        message: `${to} fetches the checkpoint from ${from} and restores ${name}`,
      });
      await controllerPauses.at('migration:transfer');
      progress.restoreAttempted = true;
      // Bytes as the target receives them: reported live, not recorded (the phase is).
      const transferTotal = checkpoint.imageBytes + checkpoint.upperBytes;
      const poll = setInterval(() => {
        target
          .progress(id)
          .then((p) => p.bytes > 0 && this.emit(run, { migrationId: id, phase: 'transfer', at: Date.now(), bytes: p.bytes, totalBytes: transferTotal }))
          .catch(() => undefined);
      }, TRANSFER_PROGRESS_POLL_MS);
      const restored = await target.restore(id, {
        migrationId: id,
        mode,
        spec: run.container.spec,
        generation: run.container.generation + 1,
        source: { node: from, url: run.source.url },
        ...(checkpoint.pageServer ? { pageServer: checkpoint.pageServer } : {}),
      }).finally(() => clearInterval(poll));

      await this.enter(run, 'verify', { bytes: restored.bytesTransferred, message: `checking that ${name} runs on ${to}` });
      await controllerPauses.at('migration:verify');
      const running = await target.get(name);
      if (running.status !== 'running') {
        throw new RuntimeFailedError(`${name} is ${running.status} on ${to} right after its restore`, { op: 'verify', status: running.status });
      }

      if (this.held.delete(id)) await this.traffic!.release(name, id, movedTo(run.container, to, running));
      await this.enter(run, 'cleanup', {
        message: mode === 'lazy' ? `${from} serves the remaining memory pages, then removes its copy` : `${from} removes its copy`,
      });
      await controllerPauses.at('migration:cleanup');
      await source.finish(id);
      progress.sourceFinished = true;
      // The target's copy is the only one now: a failure to settle is logged, not undone.
      const settled = await target.settle(id).catch((err: unknown) => {
        this.log.warn({ migrationId: id, err: toChipmunkError(err).toJSON() }, `settling migration ${id} on ${to} failed`);
        return { lazyPagesBytes: 0 };
      });

      return await this.complete(run, checkpoint.frozenAt, { ...restored, bytesTransferred: restored.bytesTransferred + settled.lazyPagesBytes }, running);
    } catch (err) {
      throw await this.fail(run, err, progress);
    }
  }

  /** Records the phase (container lock and migration record in one write), then reports it. */
  private async enter(run: Run, phase: MigrationPhaseName, detail: Pick<MigrationEvent, 'message' | 'bytes' | 'totalBytes'>): Promise<void> {
    const event: MigrationEvent = { migrationId: run.record.id, phase, at: Date.now(), ...detail };
    await this.save(run, { ...run.container, migration: { id: run.record.id, phase } }, { ...run.record, phase, history: [...run.record.history, event] });
    this.emit(run, event);
  }

  private async complete(run: Run, frozenAt: number, restored: RestoreResult, running: AgentContainer): Promise<MigrationSummary> {
    const { id, name, from, to, mode, startedAt, history } = run.record;
    const finishedAt = Date.now();
    const summary: MigrationSummary = {
      id,
      name,
      from,
      to,
      mode,
      downtimeMs: restored.restoredAt - frozenAt,
      totalMs: finishedAt - startedAt,
      bytesTransferred: restored.bytesTransferred,
      phases: phaseDurations(history, finishedAt),
    };
    const done: MigrationEvent = { migrationId: id, phase: 'done', at: finishedAt, bytes: restored.bytesTransferred, message: `${name} runs on ${to}` };
    await this.save(run, movedTo(run.container, to, running), { ...run.record, phase: 'done', history: [...history, done], finishedAt, summary });
    this.emit(run, done);
    return summary;
  }

  /**
   * Undoes what the migration did so far and records it as failed. Returns the error to throw:
   * a failure must reach the caller even when undoing or recording it fails as well.
   */
  private async fail(run: Run, err: unknown, progress: Progress): Promise<MigrationFailedError> {
    const { id, name, from, to } = run.record;
    const cause = toChipmunkError(err);
    const phase = failedPhase(run.record.phase, cause);
    // Inside a run, 'prepare' is the target getting ready (validation failures never get here).
    const node = phase === 'prepare' || phase === 'transfer' || phase === 'restore' || phase === 'verify' ? to : from;
    const logPath = typeof cause.details.logPath === 'string' ? cause.details.logPath : undefined;
    const failure = `migration ${id} of ${name} from ${from} to ${to} failed in phase ${phase} on node ${node}: ${cause.message}`;

    if (progress.sourceFinished) {
      // The source removed its copy, so the target's is the only one: undoing now would leave
      // none. Only recording the move failed; the lock stays, and the next controller start adopts it.
      return new MigrationFailedError(`${failure}; ${name} runs on ${to}, but the controller could not record it: restart the controller to adopt it`, {
        phase,
        node,
        rolledBack: false,
      }, cause);
    }

    let container = withoutLock(run.container);
    let outcome = `nothing was changed; ${name} still runs on ${from}`;
    let rolledBack: boolean | undefined;
    if (progress.checkpointAttempted) {
      const back = await this.rollBack(run, progress.restoreAttempted);
      rolledBack = 'running' in back;
      if ('running' in back) {
        container = { ...container, status: back.running.status, generation: back.running.generation, ip: back.running.ip };
        outcome = `${name} runs on ${from} again`;
      } else {
        container = { ...container, status: 'unknown' };
        outcome = `rolling ${name} back on ${from} failed too (${back.error.message}); see \`chipmunk ps\` and the agent log on ${from}`;
      }
    } else if (progress.restoreAttempted) {
      // Only the target was prepared: undo that; the container never stopped on the source.
      await this.agentFor(run.target)
        .abort(id)
        .catch((err: unknown) => this.log.warn({ migrationId: id, err: toChipmunkError(err).toJSON() }, `abort of migration ${id} on ${to} failed`));
    }

    // Held requests go back to the source (where the container runs again, or at least was).
    if (this.held.delete(id)) await this.traffic!.release(name, id, container);
    const error = new MigrationFailedError(
      `${failure}; ${outcome}`,
      { phase, node, ...(logPath !== undefined ? { logPath } : {}), ...(rolledBack !== undefined ? { rolledBack } : {}) },
      cause,
    );
    const failed: MigrationEvent = { migrationId: id, phase: 'failed', at: Date.now(), message: error.message };
    try {
      await this.save(run, container, { ...run.record, phase: 'failed', history: [...run.record.history, failed], finishedAt: failed.at, error: error.toJSON() });
    } catch (storeErr) {
      this.log.error(
        { migrationId: id, err: toChipmunkError(storeErr).toJSON() },
        `could not record the failed migration ${id}: ${name} keeps its lock until the next controller start resolves it`,
      );
    }
    this.emit(run, failed);
    return error;
  }

  /** Puts the container back on the source: the target drops its copy first, so there are never two. */
  private async rollBack(run: Run, targetMayHaveCopy: boolean): Promise<{ running: AgentContainer } | { error: ChipmunkError }> {
    const { id, name, from, to } = run.record;
    try {
      await this.enter(run, 'rollback', { message: targetMayHaveCopy ? `removing ${name} from ${to}, then running it on ${from} again` : `running ${name} on ${from} again` });
    } catch (err) {
      // Recording is secondary here: the container must run again whether or not the store answers.
      this.log.error({ migrationId: id, err: toChipmunkError(err).toJSON() }, `could not record the rollback of migration ${id}`);
    }
    const source = this.agentFor(run.source);
    if (targetMayHaveCopy) {
      try {
        await this.agentFor(run.target).abort(id);
      } catch (err) {
        // Best effort: a target that cannot be reached cannot be asked, and the container must run somewhere.
        this.log.warn({ migrationId: id, err: toChipmunkError(err).toJSON() }, `abort of migration ${id} on ${to} failed; rolling back on ${from} anyway`);
      }
    }
    try {
      return { running: await source.rollback(id) };
    } catch (err) {
      // A checkpoint that failed before freezing leaves the container running, and the agent may
      // then have nothing to roll back: what counts is whether it runs.
      const current = await source.get(name).catch(() => undefined);
      if (current?.status === 'running') return { running: current };
      return { error: toChipmunkError(err) };
    }
  }

  private async resolve(record: MigrationRecord): Promise<void> {
    const { id, name, from, to, phase } = record;
    const current = await this.store.get<ContainerRecord>(containerKey(name));
    if (!current) throw new NotFoundError(`container ${name} of migration ${id} has no record`);
    const [source, target] = await Promise.all([this.nodes.require(from), this.nodes.require(to)]);
    const run: Run = { record, container: current.value, containerRevision: current.modRevision, source, target, onEvent: () => {} };
    const sourceAgent = this.agentFor(source);
    const targetAgent = this.agentFor(target);
    const interrupted = new UnavailableError('the controller stopped before the migration ended', { migrationId: id, phase });

    if (await runningOn(sourceAgent, name)) {
      try {
        await targetAgent.abort(id);
      } catch (err) {
        this.log.warn({ migrationId: id, err: toChipmunkError(err).toJSON() }, `abort of interrupted migration ${id} on ${to} failed`);
      }
      const error = await this.fail(run, interrupted, { checkpointAttempted: false, restoreAttempted: false, sourceFinished: false });
      this.log.warn({ migrationId: id }, error.message);
      return;
    }

    const adopted = await runningOn(targetAgent, name);
    if (adopted) {
      try {
        await sourceAgent.finish(id);
      } catch (err) {
        this.log.warn({ migrationId: id, err: toChipmunkError(err).toJSON() }, `cleanup of interrupted migration ${id} on ${from} failed`);
      }
      const message = `${name} was running on ${to} when the controller restarted: adopted`;
      const done: MigrationEvent = { migrationId: id, phase: 'done', at: Date.now(), message };
      await this.save(run, movedTo(run.container, to, adopted), { ...record, phase: 'done', history: [...record.history, done], finishedAt: done.at });
      this.log.info({ migrationId: id }, message);
      return;
    }

    const error = await this.fail(run, interrupted, { checkpointAttempted: true, restoreAttempted: true, sourceFinished: false });
    this.log.warn({ migrationId: id }, error.message);
  }

  /** Writes the container record and the migration record together, as long as this run still holds the lock. */
  private async save(run: Run, container: ContainerRecord, record: MigrationRecord): Promise<void> {
    const key = containerKey(record.name);
    const result = await this.store.txn({
      compare: [{ key, modRevision: run.containerRevision }],
      ops: [
        { type: 'put', key, value: container },
        { type: 'put', key: migrationKey(record.id), value: record },
      ],
    });
    if (!result.succeeded) throw new StoreConflictError(key, run.containerRevision, (await this.store.get(key))?.modRevision ?? 0);
    run.container = container;
    run.containerRevision = result.revision;
    run.record = record;
  }

  private emit(run: Run, event: MigrationEvent): void {
    try {
      run.onEvent(event);
    } catch (err) {
      // A listener's trouble (a client that went away) must not fail, or undo, the migration.
      this.log.warn({ migrationId: run.record.id, err: toChipmunkError(err).toJSON() }, 'migration event listener failed');
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

/** The phase to blame. The target's restore call covers both fetching and restoring; the agent's error says which failed. */
function failedPhase(phase: MigrationPhaseName, cause: ChipmunkError): MigrationPhase {
  if (phase === 'transfer') return cause.code === 'CHIPMUNK_TRANSFER_FAILED' ? 'transfer' : 'restore';
  // Only the record of a migration that ended says done or failed, and an ended migration does not fail again.
  return phase === 'done' || phase === 'failed' ? 'cleanup' : phase;
}

/** Each phase lasts from its start to the next phase's start; the last one to `endAt`. */
function phaseDurations(history: MigrationEvent[], endAt: number): MigrationSummary['phases'] {
  return history.map((event, i) => ({ phase: event.phase, ms: (history[i + 1]?.at ?? endAt) - event.at }));
}

function movedTo(container: ContainerRecord, node: string, running: AgentContainer): ContainerRecord {
  return { ...withoutLock(container), node, status: 'running', generation: running.generation, ip: running.ip };
}

function withoutLock(container: ContainerRecord): ContainerRecord {
  const unlocked = { ...container };
  delete unlocked.migration;
  return unlocked;
}

async function runningOn(agent: AgentApi, name: string): Promise<AgentContainer | undefined> {
  const container = await agent.get(name).catch(() => undefined);
  return container?.status === 'running' ? container : undefined;
}

/**
 * Page server ports held by the migrations this process runs. Kept in memory: a port matters only
 * while its migration runs here, and migrations a previous process left are resolved (their page
 * servers stopped by rollback or finish) before this one starts new ones.
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
