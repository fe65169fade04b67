/**
 * Settling a migration: the commit that makes the target's copy the container, and, when
 * something failed before that, finding where the container can still run and putting it there.
 *
 * After a failure the settler asks the agents, in this order:
 *   1. the target runs the new incarnation          -> roll forward (the move went through);
 *   2. the source still runs it (nothing froze it)  -> the target drops what it prepared;
 *   3. the source can run it again from its dump    -> the target confirms it removed its copy,
 *      (copy mode, or a lazy page server nobody        then the source rolls back;
 *      has pulled pages from)
 *   4. the memory left the source and the target   -> lost; a protected container is restored
 *      does not run it (lazy mode past the point       from its newest checkpoint (the failover
 *      of no return, or the source host died)          service), an unprotected one is `lost`.
 * A target that does not confirm its abort while its node is alive blocks the rollback (two
 * copies must never run): the migration stays `rollback` with the container's lock and is tried
 * again every few seconds; a target whose node is dead is fenced instead (its copy is removed
 * when it returns). The same steps settle a migration a previous controller left mid-way.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { MigrationFailedError, NotFoundError, RuntimeFailedError, UnavailableError, toChipmunkError, type ChipmunkError } from '../shared/errors.js';
import type { AgentContainer, MigrationRecord, MigrationSummary, RestoreResult, SettleResult } from '../shared/protocol.js';
import type { AgentApi } from './agent-client.js';
import { unlocked, type ContainerLocks, type ContainerRecord, type HeldLock } from './container-lock.js';
import type { AgentResolver } from './containers.js';
import { controllerPauses } from './faults.js';
import type { Fences } from './fences.js';
import { blamedPhase, type MigrationJournal, type MigrationRun } from './migration-journal.js';
import type { NodeRegistry } from './registry.js';

/** How far a migration got before it failed. */
export interface Progress {
  /** The source may have frozen or dumped the container. */
  dumpStarted: boolean;
}

/** Restores a container whose memory is gone from its newest checkpoint (the failover service). */
export interface ContainerRescuer {
  /** `held` is the container's lock, handed over; `lostOn` is the node it was last on. Returns the record of the container running again. */
  rescue(held: HeldLock, lostOn: string, reason: string): Promise<ContainerRecord>;
}

export interface MigrationSettlerOptions {
  nodes: NodeRegistry;
  agentFor: AgentResolver;
  locks: ContainerLocks;
  fences: Fences;
  journal: MigrationJournal;
  log: Pick<Logger, 'info' | 'warn' | 'error'>;
  rescuer?: ContainerRescuer;
}

type Location =
  | { kind: 'target'; running: AgentContainer }
  | { kind: 'source'; running: AgentContainer }
  | { kind: 'rollback' }
  | { kind: 'lost'; reason: string }
  | { kind: 'away' };

const ABORT_ATTEMPTS = 3;
const ABORT_RETRY_MS = 500;
/** Past the node lease, how long a live migration keeps asking a silent target before it leaves the rollback to the retry loop. */
const ABORT_GRACE_MS = 2_000;
/** A target still restoring (pages arriving) when the failure was seen gets this long to come up. */
const TARGET_GRACE_MS = 10_000;
const TARGET_POLL_MS = 500;

export class MigrationSettler {
  constructor(private readonly opts: MigrationSettlerOptions) {}

  /**
   * The commit: the record names the target, and from here nothing is undone. Then held traffic
   * goes to the target, the source removes its copy (asked again later if it does not answer)
   * and the target drops its images.
   */
  async rollForward(run: MigrationRun, running: AgentContainer, measured?: { frozenAt: number; restored: RestoreResult }): Promise<MigrationSummary> {
    const { id, name, from, to, mode } = run.record;
    const committed: ContainerRecord = { ...run.held.record, node: to, status: 'running', generation: running.generation, ip: running.ip };
    await this.opts.journal.enter(run, 'cleanup', { message: mode === 'lazy' ? `${from} serves the remaining memory pages, then removes its copy` : `${from} removes its copy` }, committed);
    await this.opts.fences.clear(to, name);
    await this.opts.journal.release(run, committed);
    await controllerPauses.at('migration:cleanup');
    const cleanupPending = !(await this.finishSource(run.record));
    const settled: SettleResult = await this.agent(run, 'target')
      .settle(id)
      .catch((err: unknown) => {
        this.opts.log.warn({ migrationId: id, err: toChipmunkError(err).toJSON() }, `settling migration ${id} on ${to} failed`);
        return { lazyPagesBytes: 0 };
      });
    if (settled.lazyPagesFailed) return this.lostAfterCommit(run, committed, settled.lazyPagesFailed, cleanupPending);
    const finishedAt = Date.now();
    const restored = measured?.restored;
    const summary: MigrationSummary = {
      id,
      name,
      from,
      to,
      mode,
      downtimeMs: measured && restored ? restored.restoredAt - measured.frozenAt : 0,
      totalMs: finishedAt - run.record.startedAt,
      bytesTransferred: (restored?.bytesTransferred ?? 0) + settled.lazyPagesBytes,
      phases: run.record.history.map((event, i) => ({
        phase: event.phase,
        ms: (run.record.history[i + 1]?.at ?? finishedAt) - event.at,
        ...(event.steps ? { steps: event.steps.map(({ step, ms }) => ({ step, ms })) } : {}),
      })),
    };
    await this.opts.journal.end(run, committed, { phase: 'done', summary, ...(cleanupPending ? { cleanupPending } : {}) }, `${name} runs on ${to}`);
    return summary;
  }

  /** A failure during the run: settles the container, then throws (or returns the summary when it rolled forward). */
  async afterFailure(run: MigrationRun, err: unknown, progress: Progress): Promise<MigrationSummary> {
    const cause = toChipmunkError(err);
    if (!progress.dumpStarted) {
      // Nothing froze the container: only the target's preparation is undone.
      await this.agent(run, 'target')
        .abort(run.record.id)
        .catch((abortErr: unknown) => this.opts.log.warn({ migrationId: run.record.id, err: toChipmunkError(abortErr).toJSON() }, `abort of migration ${run.record.id} on ${run.record.to} failed`));
      const observed = await this.agent(run, 'source').get(run.record.name).catch(() => undefined);
      const container = { ...run.held.record, status: observed?.status ?? run.held.record.status };
      await this.opts.journal.release(run, container);
      throw await this.fail(run, container, cause, `nothing was changed; ${run.record.name} ${container.status === 'running' ? 'still runs' : `is ${container.status}`} on ${run.record.from}`);
    }
    return this.settle(run, cause, true);
  }

  /**
   * Settles a migration that is not running in this process: one a previous controller left, or
   * one of this controller's that could not be settled yet.
   */
  async resolve(record: MigrationRecord): Promise<void> {
    const { locks, nodes, journal, log } = this.opts;
    const current = await locks.get(record.name);
    if (current?.value.lock?.id !== record.id) {
      // Removed, or the lock went to another operation (a failover): this migration has nothing left to decide.
      const event = { migrationId: record.id, phase: 'failed' as const, at: Date.now(), message: `the container's lock went to another operation (${current?.value.lock?.id ?? 'none'}) before the migration was settled` };
      await journal.amend({ ...record, phase: 'failed', history: [...record.history, event], finishedAt: event.at });
      return;
    }
    const stale: HeldLock = { name: record.name, lock: current.value.lock, record: current.value };
    const held = stale.lock.owner === locks.owner ? stale : await locks.adopt(stale);
    const [source, target] = await Promise.all([nodes.require(record.from), nodes.require(record.to)]);
    const run: MigrationRun = { record, held, source, target, onEvent: () => {} };
    if (held.record.node === record.to) {
      // Committed before the controller stopped: only the cleanup was left.
      const running = await this.agent(run, 'target').get(record.name).catch(() => undefined);
      await this.finishCommitted(run, running);
      return;
    }
    const cause = record.error
      ? new MigrationFailedError(record.error.message, { phase: blamedPhase(record.phase), node: record.from })
      : new UnavailableError('the controller stopped before the migration ended', { migrationId: record.id, phase: record.phase });
    try {
      await this.settle(run, cause, false);
      log.info({ migrationId: record.id }, `settled migration ${record.id} of ${record.name}: ${run.record.phase}`);
    } catch (err) {
      if (!(err instanceof MigrationFailedError)) throw err;
      log.warn({ migrationId: record.id }, err.message);
    }
  }

  /** Asks the source of an ended migration again to remove its copy. */
  async retryCleanup(record: MigrationRecord): Promise<void> {
    if (await this.finishSource(record)) await this.opts.journal.amend({ ...record, cleanupPending: false });
  }

  private async settle(run: MigrationRun, cause: ChipmunkError, live: boolean): Promise<MigrationSummary> {
    const { id, name, from, to } = run.record;
    const where = await this.locate(run);
    switch (where.kind) {
      case 'target':
        this.opts.log.warn({ migrationId: id, err: cause.toJSON() }, `migration ${id} of ${name} failed (${cause.message}), but ${name} runs on ${to}: it goes through`);
        return this.rollForward(run, where.running);
      case 'source': {
        // Nothing was dumped, so the target cannot run a copy: its preparation is undone as far as it answers.
        await this.abortTarget(run, false);
        const container = { ...run.held.record, status: 'running' as const, generation: where.running.generation, ip: where.running.ip };
        await this.opts.journal.release(run, container);
        throw await this.fail(run, container, cause, `${name} still runs on ${from}`);
      }
      case 'rollback': {
        await this.opts.journal.enter(run, 'rollback', { message: `removing ${name} from ${to}, then running it on ${from} again` }).catch(() => undefined);
        if (!(await this.abortTarget(run, live))) throw await this.pending(run, cause, `${to} did not confirm that it removed its copy, and rolling back before it does could run ${name} twice`, live);
        let running: AgentContainer;
        try {
          running = await this.agent(run, 'source').rollback(id);
        } catch (err) {
          throw await this.pending(run, toChipmunkError(err), `rolling ${name} back on ${from} failed (${toChipmunkError(err).message})`, live);
        }
        const container = { ...run.held.record, status: running.status, generation: running.generation, ip: running.ip };
        await this.opts.journal.release(run, container);
        throw await this.fail(run, container, cause, `${name} runs on ${from} again`, { rolledBack: true });
      }
      case 'away':
        if (await this.opts.nodes.isReady(from)) throw await this.pending(run, cause, `${from} does not answer about its dump of ${name}`, live);
        return this.lost(run, cause, `${from} is dead (its lease expired) and ${to} does not run ${name}`, live);
      case 'lost':
        return this.lost(run, cause, where.reason, live);
    }
  }

  /**
   * After the commit, the target's lazy-pages daemon did not get every page (its source went
   * away mid-transfer): the copy there runs on memory it never got, so it is not the container.
   * It goes; a protected container is restored from its newest checkpoint (its requests since
   * replayed), an unprotected one is lost: nothing of it is left anywhere.
   */
  private async lostAfterCommit(run: MigrationRun, committed: ContainerRecord, why: string, cleanupPending: boolean): Promise<never> {
    const { id, name, from, to } = run.record;
    const reason = `its copy on ${to} did not get all of its memory from ${from} (${why})`;
    // The source's dumped incarnation goes too, whenever its node answers: its cleanup is asked
    // again (cleanupPending), and its node is fenced in case it was restarted without it.
    await this.opts.fences.fence(from, name, committed.generation);
    this.opts.log.error({ migrationId: id }, `migration ${id} of ${name}: ${reason}: that copy is removed`);
    await this.agent(run, 'target')
      .remove(name)
      .catch((err: unknown) => this.opts.log.warn({ migrationId: id, err: toChipmunkError(err).toJSON() }, `removing the incomplete copy of ${name} on ${to} failed: it is fenced`));
    const cause = new RuntimeFailedError(`${name} ${reason}`, { op: 'lazy-pages' });
    const { rescuer } = this.opts;
    if (committed.protection && rescuer) {
      const message = `${name} ${reason}: restoring it from its newest checkpoint`;
      const failed = new MigrationFailedError(`migration ${id} of ${name} failed after it moved: ${message}`, { phase: 'cleanup', node: to }, cause);
      const event = { migrationId: id, phase: 'failed' as const, at: Date.now(), message: failed.message };
      await this.opts.journal.amend({ ...run.record, phase: 'failed', history: [...run.record.history, event], finishedAt: event.at, error: failed.toJSON(), ...(cleanupPending ? { cleanupPending } : {}) });
      this.opts.journal.emit(run, event);
      const handed = await this.opts.locks.handOver(run.held, 'failover');
      const restored = await rescuer.rescue(handed, to, reason);
      throw new MigrationFailedError(`${failed.message}; it runs on ${restored.node} again (see \`chipmunk failovers\`)`, { phase: 'cleanup', node: to, rescued: true }, cause);
    }
    await this.opts.fences.fence(to, name, committed.generation + 1);
    throw await this.fail(run, { ...committed, status: 'lost' }, cause, `${name} is lost: ${reason}. An unprotected container cannot survive this (\`chipmunk protect\` gives it checkpoints to come back from)`);
  }

  /** The memory is gone from the source and the target does not run the container. */
  private async lost(run: MigrationRun, cause: ChipmunkError, reason: string, live: boolean): Promise<never> {
    const { name, from } = run.record;
    await this.abortTarget(run, live);
    const { rescuer } = this.opts;
    if (run.held.record.protection && rescuer) {
      const message = `${name} could not run on either node (${reason}): restoring it from its newest checkpoint`;
      await this.opts.journal.enter(run, 'rollback', { message });
      const failed = new MigrationFailedError(`migration ${run.record.id} of ${name} failed: ${cause.message}; ${message}`, { phase: blamedPhase(run.record.phase, cause.code), node: from }, cause);
      const event = { migrationId: run.record.id, phase: 'failed' as const, at: Date.now(), message: failed.message };
      await this.opts.journal.amend({ ...run.record, phase: 'failed', history: [...run.record.history, event], finishedAt: event.at, error: failed.toJSON() });
      this.opts.journal.emit(run, event);
      const handed = await this.opts.locks.handOver(run.held, 'failover');
      const restored = await rescuer.rescue(handed, from, reason);
      throw new MigrationFailedError(`${failed.message}; it runs on ${restored.node} again (see \`chipmunk failovers\`)`, { phase: blamedPhase(run.record.phase, cause.code), node: from, rescued: true }, cause);
    }
    if (!live && !(await this.opts.nodes.isReady(from)) && run.record.mode === 'copy') {
      // The dump is on the dead source's disk: once it is back, the rollback may still work.
      throw await this.pending(run, cause, `${from} is dead; ${name} can run there again from its dump when it returns`, live);
    }
    const container: ContainerRecord = { ...run.held.record, status: 'lost' };
    throw await this.fail(run, container, cause, `${name} is lost: ${reason}. An unprotected container cannot survive this (\`chipmunk protect\` gives it checkpoints to come back from)`);
  }

  /** Where the container runs, or can run again. */
  private async locate(run: MigrationRun): Promise<Location> {
    const { id, name, mode } = run.record;
    const sourceGeneration = run.record.generation ?? run.held.record.generation;
    const target = this.agent(run, 'target');
    const onTarget = await runningOn(target, name);
    if (onTarget && onTarget.generation > sourceGeneration) return { kind: 'target', running: onTarget };
    const source = this.agent(run, 'source');
    const onSource = await source.get(name).catch((err: unknown) => (err instanceof NotFoundError ? null : undefined));
    if (onSource?.status === 'running') return { kind: 'source', running: onSource };
    const state = await source.dumpState(id).catch(() => undefined);
    if (onSource === undefined || state === undefined) return { kind: 'away' };
    if (state.canRollBack) return { kind: 'rollback' };
    if (mode === 'lazy') {
      // The target pulled pages: the container can only run there. It may still be coming up.
      const deadline = Date.now() + TARGET_GRACE_MS;
      while (Date.now() < deadline) {
        const running = await runningOn(target, name);
        if (running && running.generation > sourceGeneration) return { kind: 'target', running };
        await sleep(TARGET_POLL_MS);
      }
    }
    return { kind: 'lost', reason: state.reason ?? `${run.record.from} can no longer run it from its dump` };
  }

  /**
   * Whether the target confirmed it holds no copy. A target whose node is dead is fenced
   * instead: its agent removes that copy when it comes back, before anything runs twice.
   */
  private async abortTarget(run: MigrationRun, live: boolean): Promise<boolean> {
    const { id, name, to } = run.record;
    const target = this.agent(run, 'target');
    // A client waits on a live migration: it gets a settled answer when the target's node is
    // declared dead within its lease, instead of an unsettled one at once.
    const deadline = Date.now() + (live ? this.opts.nodes.leaseMs + ABORT_GRACE_MS : 0);
    for (let attempt = 1; ; attempt++) {
      try {
        await target.abort(id);
        return true;
      } catch (err) {
        if (attempt === 1) this.opts.log.warn({ migrationId: id, err: toChipmunkError(err).toJSON() }, `abort of migration ${id} on ${to} failed; asking again until it answers or its node is dead`);
      }
      if (!(await this.opts.nodes.isReady(to))) break;
      if (attempt >= ABORT_ATTEMPTS && Date.now() >= deadline) return false;
      await sleep(ABORT_RETRY_MS);
    }
    const sourceGeneration = run.record.generation ?? run.held.record.generation;
    await this.opts.fences.fence(to, name, sourceGeneration + 2);
    this.opts.log.warn({ migrationId: id }, `${to} is dead: its copy of ${name} (if any) is fenced and will be removed when it returns`);
    return true;
  }

  /** The cleanup of a committed migration, when it is all that was left. */
  private async finishCommitted(run: MigrationRun, running: AgentContainer | undefined): Promise<void> {
    await this.opts.journal.release(run, run.held.record);
    const cleanupPending = !(await this.finishSource(run.record));
    await this.agent(run, 'target').settle(run.record.id).catch(() => undefined);
    const message = `${run.record.name} runs on ${run.record.to}${running ? '' : ' (its agent does not answer now: a failover takes over if its node is dead)'}`;
    await this.opts.journal.end(run, run.held.record, { phase: 'done', ...(cleanupPending ? { cleanupPending } : {}) }, message);
  }

  /** Asks the source to remove its copy (after the commit). False when it did not confirm: asked again later. */
  private async finishSource(record: MigrationRecord): Promise<boolean> {
    const node = await this.opts.nodes.get(record.from);
    if (!node) return true;
    try {
      await this.opts.agentFor(node).finish(record.id);
      return true;
    } catch (err) {
      if (err instanceof NotFoundError) return true;
      this.opts.log.warn({ migrationId: record.id, err: toChipmunkError(err).toJSON() }, `${record.from} did not confirm removing its copy of ${record.name}: asked again later`);
      return false;
    }
  }

  /** Not settled yet: the lock stays, the record says rollback, and the retry loop comes back to it. */
  private async pending(run: MigrationRun, cause: ChipmunkError, why: string, live: boolean): Promise<MigrationFailedError> {
    const message = `${why}: ${run.record.name} stays where it is, locked, and chipmunk tries again every few seconds (see \`chipmunk migrations\`)`;
    if (run.record.phase !== 'rollback') await this.opts.journal.enter(run, 'rollback', { message }).catch(() => undefined);
    if (!live) this.opts.log.warn({ migrationId: run.record.id }, message);
    return new MigrationFailedError(`migration ${run.record.id} of ${run.record.name} failed: ${cause.message}; ${message}`, { phase: blamedPhase(run.record.phase, cause.code), node: run.record.from }, cause);
  }

  private async fail(run: MigrationRun, container: ContainerRecord, cause: ChipmunkError, outcome: string, extra: { rolledBack?: boolean } = {}): Promise<MigrationFailedError> {
    const { id, name, from, to } = run.record;
    const phase = blamedPhase(run.record.phase === 'rollback' ? lastWorkingPhase(run.record) : run.record.phase, cause.code);
    const node = phase === 'prepare' || phase === 'transfer' || phase === 'restore' || phase === 'verify' ? to : from;
    const logPath = typeof cause.details.logPath === 'string' ? cause.details.logPath : undefined;
    const error = new MigrationFailedError(
      `migration ${id} of ${name} from ${from} to ${to} failed in phase ${phase} on node ${node}: ${cause.message}; ${outcome}`,
      { phase, node, ...(logPath !== undefined ? { logPath } : {}), ...extra },
      cause,
    );
    try {
      await this.opts.journal.end(run, unlocked(container), { phase: 'failed', error: error.toJSON() }, error.message);
    } catch (storeErr) {
      this.opts.log.error({ migrationId: id, err: toChipmunkError(storeErr).toJSON() }, `could not record the failed migration ${id}: it is settled again in a few seconds`);
    }
    return error;
  }

  private agent(run: MigrationRun, role: 'source' | 'target'): AgentApi {
    return this.opts.agentFor(role === 'source' ? run.source : run.target);
  }
}

/** The phase the migration was in before it started rolling back. */
function lastWorkingPhase(record: MigrationRecord) {
  const working = [...record.history].reverse().find((event) => event.phase !== 'rollback' && event.phase !== 'failed');
  return working?.phase ?? 'prepare';
}

async function runningOn(agent: AgentApi, name: string): Promise<AgentContainer | undefined> {
  const container = await agent.get(name).catch(() => undefined);
  return container?.status === 'running' ? container : undefined;
}
