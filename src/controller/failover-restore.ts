/**
 * The restore step of a failover: which checkpoints may be used, on which nodes, in which order.
 * The failover service (failover.ts) owns the lock, the hold, fencing and the replay around it.
 */
import type { Logger } from 'pino';
import { FailoverFailedError, toChipmunkError } from '../shared/errors.js';
import type { CheckpointSummary } from '../checkpoint-store/index.js';
import type { CheckpointCatalog, CheckpointService } from './checkpoints.js';
import type { ContainerRecord } from './container-lock.js';
import type { FailoverRecord } from './failover-records.js';
import type { Fences } from './fences.js';
import type { NodeRegistry } from './registry.js';
import type { StateStore } from './store/index.js';

export interface RestoreDeps {
  store: StateStore;
  nodes: NodeRegistry;
  fences: Fences;
  catalog: CheckpointCatalog;
  checkpoints: CheckpointService;
  log: Logger;
  /** Writes the failover record (each attempt is written before it starts). */
  save(record: FailoverRecord): Promise<void>;
}

export interface RestoreRequest {
  /** The failover's record: `attempt`, `skipped`, then `to`, `checkpoint`, `logPosition` are set here. */
  record: FailoverRecord;
  /** The container as its record stood when the failover took its lock. */
  container: ContainerRecord;
  lockId: string;
  /** The route's current request log, if it logs. */
  logId: string | undefined;
}

/**
 * Restores the container from its newest usable checkpoint on the first node that takes it.
 * Returns the new incarnation, its node, and the nodes a restore failed on (one cut short may have left a
 * copy there: the caller fences them).
 */
export async function restoreFromCheckpoints(deps: RestoreDeps, req: RestoreRequest): Promise<{ current: ContainerRecord; to: string; failedOn: Set<string> }> {
  const { catalog, checkpoints, log, save } = deps;
  const { record, container, lockId, logId } = req;
  const { name, from: deadNode } = record;
  const all = await catalog.list(name);
  const intact = all.filter((c) => !c.corrupt);
  // Checkpoints cut in the route's current request log come with the requests after them.
  // One cut in an earlier log (the route was unlogged or removed since), or before the route
  // logged, is used only when there is nothing else.
  const inLog = intact.filter((c) => logId !== undefined && c.logPosition?.logId === logId);
  // A route's log starts only between checkpoints (CheckpointService.startingLog: under the
  // container's lock), so every checkpoint cut outside the current log was cut before it began:
  // the whole log is replayed onto it. Unless a checkpoint was cut in that log, even a corrupt one:
  // the log may then be trimmed, and its first requests gone.
  const wholeLog = logId !== undefined && !all.some((c) => c.logPosition?.logId === logId) ? { logId, seq: 0 } : undefined;
  const replayFrom = (c: CheckpointSummary) => (inLog.includes(c) ? c.logPosition : (wholeLog ?? c.logPosition));
  const good = inLog.length > 0 ? inLog : intact;
  for (const c of inLog.length > 0 ? intact.filter((c) => !inLog.includes(c)) : []) {
    record.skipped.push({ checkpoint: c.id, reason: `cut ${c.logPosition ? `in request log ${c.logPosition.logId ?? '(no id)'}` : 'before the route logged'}, not in the route's current log ${logId}: the requests after it cannot be replayed` });
  }
  if (good.length === 0) throw new FailoverFailedError(`${name} has no checkpoint to restore from: it stays down until ${deadNode} returns`, { name, from: deadNode });
  const targets = await targetsFor(deps, name, deadNode);
  if (targets.length === 0) throw new FailoverFailedError(`no ready node to restore ${name} on: it stays down until a node is ready`, { name, from: deadNode });
  let attempt = 0;
  /** Targets a restore failed on: one cut short (its agent killed) may still leave a copy there. */
  const failedOn = new Set<string>();
  for (const candidate of good) {
    // A failure on one target (its agent does not answer, it still holds a stale copy that its
    // fence has not removed yet) says nothing about the checkpoint: the same one is tried on the
    // next target. Only a corrupt checkpoint, or one no target could restore, is passed over.
    for (let tried = 0; tried < targets.length; tried++) {
      const target = targets[attempt % targets.length]!;
      attempt += 1;
      const generation = container.generation + attempt + 1;
      try {
        // Written first: a controller that dies during the restore finds the copy it may have made.
        record.attempt = { to: target, checkpoint: candidate.id, logPosition: replayFrom(candidate), generation };
        await save(record);
        const readFrom: string[] = [];
        const current = await checkpoints.restoreOn(container, target, candidate.id, `${lockId}-${attempt}`, generation, record.timings, readFrom);
        record.to = target;
        record.checkpoint = candidate.id;
        if (readFrom.length > 0) record.readFrom = readFrom;
        record.logPosition = replayFrom(candidate);
        record.restoredAt = Date.now();
        return { current, to: target, failedOn };
      } catch (err) {
        const corrupt = (await catalog.list(name)).find((c) => c.id === candidate.id)?.corrupt;
        const reason = corrupt ? `corrupt: ${toChipmunkError(err).message}` : toChipmunkError(err).message;
        const nextTarget = !corrupt && tried + 1 < targets.length;
        failedOn.add(target);
        record.skipped.push({ checkpoint: candidate.id, reason: `on ${target}: ${reason}` });
        log.error({ container: name, checkpoint: candidate.id, target, corrupt: Boolean(corrupt) }, `restoring ${name} from checkpoint ${candidate.id} on ${target} failed (${reason}); ${nextTarget ? 'trying it on another node' : 'trying the one before'}`);
        await save(record);
        if (!nextTarget) break;
      }
    }
  }
  throw new FailoverFailedError(`no checkpoint of ${name} could be restored: ${record.skipped.map((s) => `${s.checkpoint}: ${s.reason}`).join('; ')}`, { name, from: deadNode, skipped: record.skipped });
}

/**
 * Ready nodes other than the dead one, fewest containers first; nodes that still hold a fenced
 * (stale) copy of `name` last: their agent removes it at its next heartbeat, and until then a
 * restore there is refused.
 */
async function targetsFor(deps: RestoreDeps, name: string, deadNode: string): Promise<string[]> {
  const ready = (await deps.nodes.listReady()).filter((n) => n.name !== deadNode);
  const load = new Map<string, number>();
  for (const { value } of await deps.store.list<ContainerRecord>('/containers/')) load.set(value.node, (load.get(value.node) ?? 0) + 1);
  const fenced = new Set(await deps.fences.nodesFencing(name));
  const rank = (node: string) => (fenced.has(node) ? 1_000_000 : 0) + (load.get(node) ?? 0);
  return ready.sort((a, b) => rank(a.name) - rank(b.name)).map((n) => n.name);
}
