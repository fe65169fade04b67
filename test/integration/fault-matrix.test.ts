/**
 * The CI subset of the fault matrix (bench/faults runs all of it), through the same cell code
 * (test/support/fault-cells.ts): a protected app under load, a process paused at a step, the
 * victim SIGKILLed exactly there, revived, then every invariant of test/support/fault-checks.ts.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { cellId, runCell, type Cell } from '../support/fault-cells.js';
import { ensureClusterHealthy, useLocalCluster } from '../support/local-cluster.js';

const NODE_LEASE_MS = 1_000;

/** The four the issue names for CI: every one must end with its invariants holding. */
const CELLS: Cell[] = [
  { kind: 'migration', mode: 'lazy', step: 'transfer', victim: 'controller' },
  { kind: 'migration', mode: 'lazy', step: 'restore', victim: 'target-host' },
  { kind: 'migration', mode: 'copy', step: 'transfer', victim: 'source-host' },
  { kind: 'checkpoint', step: 'cut', victim: 'controller' },
];

useLocalCluster({ nodes: 3, nodeLeaseMs: NODE_LEASE_MS });

describe('fault matrix (CI subset)', { timeout: 600_000 }, () => {
  for (const [index, cell] of CELLS.entries()) {
    it(cellId(cell), { timeout: 150_000 }, async () => {
      await ensureClusterHealthy();
      const result = await runCell(cell, { index, downMs: 2_000, settleMs: 30_000 });
      assert.equal(result.outcome, 'ok', `${result.failures.join('; ')}${result.operation ? ` [${result.operation}]` : ''}`);
    });
  }
});
