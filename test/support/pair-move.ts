/** A move on a runc pair (test/support/runc-pair.ts) from its source to its target, the way the controller drives one. */
import { randomBytes } from 'node:crypto';
import type { AgentContainer, MigrationMode } from '../../src/shared/protocol.js';
import type { RuntimePair } from '../contract/runtime.contract.js';

/** `restored`: what the controller does once the target runs it, before the source lets go (a container's address routed to it). */
export async function moveOnPair(pair: RuntimePair, c: AgentContainer, mode: MigrationMode, restored?: () => Promise<void>): Promise<AgentContainer> {
  const id = `mig-${mode}-${randomBytes(3).toString('hex')}`;
  const pageServer = mode === 'lazy' ? pair.pageServer() : undefined;
  await pair.target.prepareRestore(c.spec, { migrationId: id, mode, generation: c.generation + 1 });
  try {
    await pair.source.dump(c.name, { migrationId: id, mode, ...(pageServer ? { pageServer } : {}) });
  } catch (err) {
    // What the controller does when the dump fails: the target drops what it prepared.
    await pair.target.abortRestore(id).catch(() => undefined);
    throw err;
  }
  await pair.copyTrees(id);
  const moved = await pair.target.restore(c.spec, { migrationId: id, mode, generation: c.generation + 1, ...(pageServer ? { pageServer } : {}) });
  await restored?.();
  await pair.source.finishMigration(id);
  await pair.target.settleRestore(id);
  return moved;
}
