/**
 * What a controller does at start with the operations a previous one left mid-way: every
 * container lock another controller instance took (container-lock.ts) is adopted and settled,
 * so no container stays locked (protection stopped, stop/rm/migrate refused) or down.
 *
 * - a migration: settled by the migration orchestrator's retry loop (migration-settle.ts);
 * - a checkpoint: the container runs on (the agent resumes it); the gateway hold is released;
 * - a stop or a removal: the record follows what the agent reports;
 * - a restore from a checkpoint or a failover: finished if the container runs on its new node
 *   (the logged requests replayed, traffic released), restored from its checkpoints otherwise.
 */
import type { Logger } from 'pino';
import { NotFoundError, toChipmunkError } from '../shared/errors.js';
import type { LoggedTraffic } from './checkpoints.js';
import type { ContainerLocks, HeldLock } from './container-lock.js';
import type { AgentResolver } from './containers.js';
import type { FailoverService } from './failover.js';
import type { NodeRegistry } from './registry.js';

export interface RecoveryOptions {
  locks: ContainerLocks;
  nodes: NodeRegistry;
  agentFor: AgentResolver;
  traffic: LoggedTraffic;
  failovers: FailoverService;
  log: Logger;
}

export async function recoverStaleLocks(opts: RecoveryOptions): Promise<void> {
  for (const stale of await opts.locks.stale()) {
    if (stale.lock.operation === 'migration') continue;
    try {
      const held = await opts.locks.adopt(stale);
      opts.log.warn({ container: held.name, lock: held.lock }, `settling the ${held.lock.operation} of ${held.name} a previous controller left unfinished`);
      await settle(opts, held);
    } catch (err) {
      opts.log.error({ container: stale.name, err: toChipmunkError(err).toJSON() }, `could not settle the ${stale.lock.operation} of ${stale.name} a previous controller left`);
    }
  }
}

async function settle(opts: RecoveryOptions, held: HeldLock): Promise<void> {
  const { locks, nodes, agentFor, traffic, failovers } = opts;
  const node = await nodes.get(held.record.node);
  const agent = node ? agentFor(node) : undefined;
  switch (held.lock.operation) {
    case 'checkpoint': {
      // The agent finishes or abandons its part on its own; what it took locally is dropped.
      await agent?.discardCheckpoint(held.lock.id).catch(() => undefined);
      await traffic.release(held.name, held.lock.id, held.record);
      await locks.release(held);
      return;
    }
    case 'stop':
    case 'remove': {
      const here = await agent?.get(held.name).catch((err: unknown) => (err instanceof NotFoundError ? null : undefined));
      if (here === null && held.lock.operation === 'remove') {
        await locks.remove(held);
        return;
      }
      await locks.release(held, { ...held.record, status: here ? here.status : 'unknown' });
      return;
    }
    case 'protect':
    case 'expose':
      // The record and the route are written or not; the route table's periodic push settles the gateway.
      await locks.release(held);
      return;
    case 'restore':
    case 'failover':
      await failovers.resume(held, await failovers.byLock(held.lock.id));
      return;
    case 'migration':
      return;
  }
}
