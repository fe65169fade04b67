/**
 * The CI subset of the fault matrix (bench/faults runs all of it), through the same cell code
 * (test/support/fault-cells.ts): a protected app under load, a process paused at a step, the
 * victim SIGKILLed exactly there, revived, then every invariant of test/support/fault-checks.ts.
 *
 * A cell that fails because its issue-8 item is not fixed yet is marked `todo` with what broke,
 * so the suite stays green; drop the todo with the fix.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { cellId, runCell, type Cell } from '../support/fault-cells.js';
import { ensureClusterHealthy, useLocalCluster } from '../support/local-cluster.js';

const NODE_LEASE_MS = 1_000;

const CELLS: Array<{ cell: Cell; todo?: string }> = [
  {
    cell: { kind: 'migration', mode: 'lazy', step: 'transfer', victim: 'controller' },
    todo: 'issue 8 item 1: controller killed during a lazy transfer: the restarted controller adopts the target, which keeps the migration images (leftover migrations/ID/images)',
  },
  {
    cell: { kind: 'migration', mode: 'lazy', step: 'restore', victim: 'target-host' },
    todo: 'issue 8 items 1, 7: target host killed while pulling pages: the source rolls back, but the returned target keeps its dead incarnation (stopped runc container, netns, rootfs mount, images)',
  },
  {
    cell: { kind: 'migration', mode: 'copy', step: 'transfer', victim: 'source-host' },
    todo: 'issue 8 item 3: source host killed mid-transfer of a protected container: rollback fails (agent unreachable); after the host returns, its dead incarnation keeps its netns and rootfs mount',
  },
  {
    cell: { kind: 'checkpoint', step: 'cut', victim: 'controller' },
    todo: 'issue 8 item 4: controller killed at the checkpoint cut: the busy lock stays in the store, protection stops (`checkpoint` waits for the lock)',
  },
];

useLocalCluster({ nodes: 3, nodeLeaseMs: NODE_LEASE_MS });

describe('fault matrix (CI subset)', { timeout: 600_000 }, () => {
  for (const [index, { cell, todo }] of CELLS.entries()) {
    it(cellId(cell), { timeout: 150_000, ...(todo ? { todo } : {}) }, async () => {
      await ensureClusterHealthy();
      const result = await runCell(cell, { index, downMs: 2_000, settleMs: 30_000 });
      assert.equal(result.outcome, 'ok', `${result.failures.join('; ')}${result.operation ? ` [${result.operation}]` : ''}`);
    });
  }
});
