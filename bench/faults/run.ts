/**
 * bench/faults: the fault matrix of issue 8 and the failover soak, on one 3-node local cluster
 * (1 s node lease, faults enabled).
 *
 * Matrix: for each cell (component killed x phase x mode) a protected statefulapp behind the
 * gateway (checkpointed every 2 s), a client POSTing /increment nonstop; a process pauses at the
 * cell's step (pause points), the victim is SIGKILLed there, revived after 3 s, the system gets
 * a bounded time to settle, then the invariants are checked (test/support/fault-checks.ts).
 *
 * Usage: npm run bench:faults [-- --only REGEX] [--fast] [--soak] [--soak-runs 20] [--no-matrix]
 *   --only REGEX  cells whose id ("migration lazy transfer controller") matches; their rows replace
 *                 those of the same cells in the table already written (marked re-run), the rest stays
 *   --fast        one victim per (kind, mode, step), rotating, and shorter waits
 *   --soak        also the failover soak (20 host kills in a row)
 * Prints the tables and writes bench/results/faults.md.
 */
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { allCells, cellId, logTail, runCell, type Cell, type CellResult } from '../../test/support/fault-cells.js';
import { soak, soakTable, type SoakRun } from '../../test/support/fault-soak.js';
import { ensureClusterHealthy, startLocalCluster, stopLocalCluster } from '../../test/support/local-cluster.js';

const RESULTS = fileURLToPath(new URL('../results/faults.md', import.meta.url));
const NODE_LEASE_MS = 1_000;

const { values } = parseArgs({
  options: {
    only: { type: 'string' },
    fast: { type: 'boolean', default: false },
    soak: { type: 'boolean', default: false },
    'soak-runs': { type: 'string', default: '20' },
    'no-matrix': { type: 'boolean', default: false },
  },
});

const DOWN_MS = values.fast ? 2_000 : 3_000;
const SETTLE_MS = values.fast ? 30_000 : 45_000;

const HEADER = [
  `All on one 2-core machine: 3 test hosts, node lease ${NODE_LEASE_MS} ms; the controller (with the checkpoint store) and the gateway on the same machine.`,
  'Every container protected (checkpoint every 2 s), exposed through the gateway, one client POSTing /increment nonstop.',
  `A process pauses at the cell's step (pause points), the victim is SIGKILLed there, revived ${DOWN_MS / 1000} s later; then up to ${SETTLE_MS / 1000} s to settle.`,
  "Checked: exactly one running copy (runc on every node), the controller's record agrees, protection goes on (no lock left),",
  "no held route, counter == acknowledged == lines of the app's file, no leftover runc container, netns, mount, CRIU daemon or migration image.",
].join('\n');

function matrixSection(results: CellResult[], planned: number, ms: number, previous?: string): string {
  const how = `${values.only ? ` --only ${values.only}` : ''}${values.fast ? ' --fast' : ''}`.trim();
  const partial = results.length < planned ? ` (partial: ${results.length} of ${planned} cells so far)` : '';
  const measured = `${new Date().toISOString()}${how ? ` (${how})` : ''}: ${results.length} cells in ${(ms / 60_000).toFixed(0)} min${partial}`;
  const rows = results.map(matrixRow);
  const kept = values.only && previous ? previousRows(previous) : undefined;
  if (!kept || kept.rows.length === 0) return [`Matrix, measured ${measured}.`, '', matrixTable(rows)].join('\n');
  // Re-run cells replace their rows; the other rows stay as that run measured them.
  const fresh = new Map(results.map((r, i) => [r.id, rows[i]!.replace(/^\| ([^|]+) \| ([^|]+) \|/, '| $1 | $2 (re-run) |')]));
  const merged = kept.rows.map((row) => fresh.get(rowId(row)) ?? row);
  for (const [id, row] of fresh) if (!kept.rows.some((r) => rowId(r) === id)) merged.push(row);
  return [kept.heading, `Re-run, measured ${measured}: the rows marked re-run.`, '', matrixTable(merged)].join('\n');
}

/** The heading lines (before the table) and the rows of a matrix section written before. */
function previousRows(section: string): { heading: string; rows: string[] } {
  const lines = section.split('\n');
  const heading = lines.filter((l) => /^(Matrix|Re-run), measured/.test(l) && !l.startsWith('Re-run')).join('\n');
  return { heading, rows: lines.filter((l) => l.startsWith('| ') && !l.startsWith('| cell ')) };
}

const rowId = (row: string) => row.split(' | ')[0]!.slice(2);

const groupOf = (cell: Cell) => [cell.kind, cell.mode, cell.step].filter(Boolean).join(' ');

function selectCells(): Cell[] {
  let cells = allCells();
  if (values.fast) {
    // One victim per (kind, mode, step), a different one from group to group.
    const groups = [...new Set(cells.map(groupOf))];
    cells = groups.map((group, i) => {
      const members = cells.filter((c) => groupOf(c) === group);
      return members[i % members.length]!;
    });
  }
  if (values.only) {
    const only = new RegExp(values.only);
    cells = cells.filter((cell) => only.test(cellId(cell)));
  }
  return cells;
}

function matrixRow(r: CellResult): string {
  const outcome = r.outcome === 'ok' ? 'ok' : r.unavoidable ? 'unavoidable' : r.outcome === 'not reached' ? 'NOT REACHED' : 'FAILED';
  const broke = [...r.failures, ...(r.unavoidable ? [`unavoidable: ${r.unavoidable}`] : []), ...(r.operation && r.operation !== 'migrated' ? [r.operation] : [])];
  return `| ${r.id} | ${outcome} | ${r.settleMs !== undefined ? `${(r.settleMs / 1000).toFixed(1)} s` : '-'} | ${r.acked} | ${r.failed} | ${broke.join('; ').replace(/\|/g, '/').replace(/\n/g, ' ').slice(0, 400)} |`;
}

function matrixTable(rows: string[]): string {
  const outcomes = rows.map((row) => row.split(' | ')[1]!.replace(' (re-run)', ''));
  const ok = outcomes.filter((o) => o === 'ok').length;
  const unavoidable = outcomes.filter((o) => o === 'unavoidable').length;
  return [
    '| cell (kind, mode, step, killed) | outcome | settled after | acknowledged | failed requests | what broke |',
    '|---|---|---:|---:|---:|---|',
    ...rows,
    '',
    `${ok} of ${rows.length} cells ok, ${unavoidable} unavoidable, ${rows.length - ok - unavoidable} failed or not reached.`,
  ].join('\n');
}

async function main(): Promise<void> {
  const cells = values['no-matrix'] ? [] : selectCells();
  const started = Date.now();
  const log = (line: string) => process.stderr.write(`[${((Date.now() - started) / 1000).toFixed(0)} s] ${line}\n`);
  // The table a re-run (--only) merges its rows into: as it was before this run.
  const previousMatrix = sectionOf(await readFile(RESULTS, 'utf8').catch(() => ''), 'matrix');
  await startLocalCluster(3, { nodeLeaseMs: NODE_LEASE_MS });
  const results: CellResult[] = [];
  let soakRows: SoakRun[] = [];
  let soakStarted = Date.now();
  try {
    for (const [i, cell] of cells.entries()) {
      await ensureClusterHealthy(log);
      log(`cell ${i + 1}/${cells.length}: ${cellId(cell)}`);
      let result: CellResult;
      try {
        result = await runCell(cell, { index: i, downMs: DOWN_MS, settleMs: SETTLE_MS, log });
      } catch (err) {
        result = { id: cellId(cell), cell, outcome: 'failed', failures: [`harness error: ${(err as Error).message}`], acked: 0, failed: 0, ms: 0 };
      }
      results.push(result);
      log(`  -> ${result.outcome}${result.settleMs !== undefined ? ` settled ${result.settleMs} ms` : ''}${result.failures.length ? `: ${result.failures.join('; ')}` : ''}${result.operation ? ` [${result.operation}]` : ''} (${(result.ms / 1000).toFixed(0)} s)`);
      if (result.outcome !== 'ok' && !result.unavoidable) log(`  controller log (end):\n${await logTail('controller', 8)}`);
      // Written after every cell: a long run stopped half-way still leaves its results.
      await writeResults(HEADER, { matrix: matrixSection(results, cells.length, Date.now() - started, previousMatrix) });
    }
    soakStarted = Date.now();
    if (values.soak) {
      await ensureClusterHealthy(log);
      soakRows = await soak(Number(values['soak-runs']), log);
    }
  } finally {
    if (process.env.CHIPMUNK_KEEP_CLUSTER === '1') log('CHIPMUNK_KEEP_CLUSTER=1: leaving the local cluster up');
    else await stopLocalCluster().catch((err: Error) => log(`cluster down failed: ${err.message}`));
  }

  const at = new Date().toISOString();
  const sections: Record<string, string> = {};
  if (results.length > 0) sections.matrix = matrixSection(results, cells.length, soakStarted - started, previousMatrix);
  if (soakRows.length > 0) {
    sections.soak = [`Failover soak, measured ${at}: ${soakRows.length} host kills in a row of one protected 64 MB app under load (checkpoint every 2 s; killed at a random moment, mid-checkpoint (the controller paused at the cut) or mid-upload (the agent paused at the upload)):`, '', soakTable(soakRows)].join('\n');
  }
  console.log([HEADER, ...Object.values(sections)].join('\n\n'));
  await writeResults(HEADER, sections);
}

/** bench/results/faults.md: a section this run produced replaces the one before; the other stays. */
async function writeResults(header: string, sections: Record<string, string>): Promise<void> {
  const previous = await readFile(RESULTS, 'utf8').catch(() => '');
  const kept = (name: string) => sectionOf(previous, name);
  const body = ['matrix', 'soak']
    .map((name) => sections[name] ?? kept(name))
    .map((text, i) => (text ? `<!-- ${['matrix', 'soak'][i]} -->\n${text}\n<!-- /${['matrix', 'soak'][i]} -->` : undefined))
    .filter(Boolean);
  await mkdir(join(RESULTS, '..'), { recursive: true });
  await writeFile(RESULTS, `# bench/faults\n\n${header}\n\n${body.join('\n\n')}\n`);
}


function sectionOf(text: string, name: string): string | undefined {
  return new RegExp(`<!-- ${name} -->\\n([\\s\\S]*?)\\n<!-- /${name} -->`).exec(text)?.[1];
}

await main();
