/**
 * One program of the compatibility suite on the local cluster: protected, exposed behind the
 * gateway (HTTP routes for nginx and the Python services, TCP routes for the others), a client of its own protocol writing
 * nonstop (test/support/compat-programs.ts), then a lazy move, a copy move and a failover (its
 * node's host killed, revived later). After each, the program's own client checks that every
 * acknowledged write is there.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { clusterKill, clusterRevive } from '../../src/cluster/index.js';
import { describeKeys, nonstopWriter, waitUntilServing, type CompatProgram, type Endpoint } from '../../test/support/compat-programs.js';
import { tearDown } from '../../test/support/fault-cells.js';
import { GATEWAY_HOST } from '../../test/support/fault-checks.js';
import { cli, clusterStateDir, localCluster, runningCopies } from '../../test/support/local-cluster.js';

export const CELL_KINDS = ['lazy move', 'copy move', 'failover'] as const;
export type CellKind = (typeof CELL_KINDS)[number];

export interface CellResult {
  kind: CellKind;
  /** `ok`, or why the operation failed (its error). */
  operation: string;
  /** From the start of the operation until the program answered its client through the gateway again. */
  backMs?: number;
  /**
   * It answered again but acknowledged no write from then until the end of the cell (writeMs, and
   * the write in flight then): one that refuses writes after a move, as SQLite in DELETE mode on a
   * directory layer. A write held up for a while is only slow (maxWriteMs).
   */
  writesStopped: boolean;
  /** Writes acknowledged during this cell, and in all so far. */
  acked: number;
  totalAcked: number;
  /** Acknowledged keys the program's own client did not find (and no earlier cell reported). */
  missing: number[];
  reconnects: number;
  retries: number;
  maxWriteMs: number;
  notes: string[];
}

export interface ProgramResult {
  program: CompatProgram['name'];
  route: 'http' | 'tcp';
  /** Set when the program could not be run, exposed or protected: why. */
  setup: string[];
  cells: CellResult[];
}

export interface ProgramOptions {
  index: number;
  /** How long the client writes before and after each operation. */
  writeMs: number;
  log: (line: string) => void;
}

/** Protected with a checkpoint every 2 s: what a failover comes back from. */
const CHECKPOINT_EVERY = '2s';
const BACK_TIMEOUT_MS = 90_000;

export async function runProgram(program: CompatProgram, opts: ProgramOptions): Promise<ProgramResult> {
  const nodes = localCluster().nodes;
  const name = `compat-${program.name}`;
  const hostPort = 28500 + opts.index;
  const gateway: Endpoint = { host: GATEWAY_HOST, port: 28600 + opts.index };
  const result: ProgramResult = { program: program.name, route: program.protocol, setup: [], cells: [] };
  const failed = (what: string, r: { code: number | null; error?: { message: string }; stderr: string }) =>
    r.code === 0 ? undefined : `${what}: ${r.error?.message ?? r.stderr.trim().slice(-300)}`;
  try {
    const run = await cli(['run', '--name', name, '--node', nodes[0]!, '-p', `${hostPort}:${program.containerPort}`, program.image, ...program.command], { timeoutMs: 120_000 });
    const runFailure = failed('run', run);
    if (runFailure) return { ...result, setup: [runFailure] };
    const expose = await cli(['expose', name, '--port', String(program.containerPort), '--listen', String(gateway.port), '--protocol', program.protocol]);
    const exposeFailure = failed('expose', expose);
    if (exposeFailure) return { ...result, setup: [exposeFailure] };
    await waitUntilServing(program, gateway, 60_000);
    // Protection after the first answer: a program that cannot be checkpointed still runs and moves (or not) on its own.
    const protect = await cli(['protect', name, '--every', CHECKPOINT_EVERY], { timeoutMs: 120_000 });
    const protectFailure = failed('protect', protect);
    if (protectFailure) result.setup.push(protectFailure);
    let acked = 0;
    const lost = new Set<number>();
    for (const kind of CELL_KINDS) {
      opts.log(`${program.name}: ${kind}`);
      const cell = await runCell(program, kind, { name, gateway, from: acked + 1, lost, writeMs: opts.writeMs, log: opts.log });
      result.cells.push(cell);
      acked = cell.totalAcked;
      for (const i of cell.missing) lost.add(i);
      opts.log(`${program.name}: ${kind}: ${cell.operation}, ${cell.acked} acked, ${cell.missing.length} missing, ${cell.reconnects} reconnects`);
    }
    return result;
  } finally {
    await cli(['unexpose', name]);
    const notRemoved = await tearDown(name, 30_000);
    if (notRemoved) opts.log(`${name}: ${notRemoved}`);
  }
}

async function nodeOf(name: string): Promise<string | undefined> {
  const res = await cli<Array<{ name: string; node: string }>>(['ps'], { timeoutMs: 10_000 });
  return res.json?.find((c) => c.name === name)?.node;
}

interface CellContext {
  name: string;
  gateway: Endpoint;
  from: number;
  /** Keys earlier cells found missing. */
  lost: ReadonlySet<number>;
  writeMs: number;
  log: (line: string) => void;
}

async function runCell(program: CompatProgram, kind: CellKind, ctx: CellContext): Promise<CellResult> {
  const nodes = localCluster().nodes;
  const from = await nodeOf(ctx.name);
  const cell: CellResult = { kind, operation: 'ok', writesStopped: false, acked: 0, totalAcked: ctx.from - 1, missing: [], reconnects: 0, retries: 0, maxWriteMs: 0, notes: [] };
  if (!from) return { ...cell, operation: `${ctx.name} is on no node` };
  const writer = nonstopWriter(program, () => ctx.gateway, ctx.from, ctx.writeMs * 2 + BACK_TIMEOUT_MS + 60_000);
  let revive: string | undefined;
  let ackedWhenBack: number | undefined;
  try {
    await sleep(ctx.writeMs);
    const started = Date.now();
    if (kind === 'failover') {
      const checkpoints = await cli<unknown[]>(['checkpoints', ctx.name], { timeoutMs: 10_000 });
      if (Array.isArray(checkpoints.json) && checkpoints.json.length === 0) cell.notes.push('no checkpoint of it to fail over from (its checkpoints failed: see the controller log)');
      await clusterKill(from, { stateDir: clusterStateDir() });
      revive = from;
      const back = await backElsewhere(program, ctx, from);
      if (back) {
        cell.backMs = Date.now() - started;
        ackedWhenBack = writer.stats.acked;
      }
      else cell.operation = `not back on another node within ${BACK_TIMEOUT_MS / 1000} s (chipmunk ps: ${await nodeOf(ctx.name)})`;
    } else {
      const to = nodes[(nodes.indexOf(from) + 1) % nodes.length]!;
      const mode = kind === 'lazy move' ? 'lazy' : 'copy';
      const migrate = await cli(['migrate', ctx.name, '--to', to, '--mode', mode], { timeoutMs: 180_000 });
      if (migrate.code !== 0) cell.operation = migrate.error?.message ?? migrate.stderr.trim().slice(-400);
      await waitUntilServing(program, ctx.gateway, 30_000).then(
        () => {
          cell.backMs = Date.now() - started;
          ackedWhenBack = writer.stats.acked;
        },
        (err: Error) => cell.notes.push(err.message),
      );
    }
    await sleep(ctx.writeMs);
    if (revive) {
      await clusterRevive(revive, { stateDir: clusterStateDir() }).catch((err: Error) => cell.notes.push(`revive ${revive}: ${err.message}`));
      revive = undefined;
      // The returning host must not run a second copy.
      await sleep(5_000);
      const copies = await runningCopies(ctx.name);
      if (copies.length !== 1) cell.notes.push(`${copies.length} running copies after ${from} returned: ${copies.map((c) => c.node).join(', ')}`);
    }
  } finally {
    if (revive) await clusterRevive(revive, { stateDir: clusterStateDir() }).catch(() => undefined);
    const stats = await writer.stop();
    cell.acked = stats.acked - (ctx.from - 1);
    cell.totalAcked = stats.acked;
    cell.reconnects = stats.reconnects;
    cell.retries = stats.retries;
    cell.maxWriteMs = stats.maxWriteMs;
    if (ackedWhenBack !== undefined && stats.acked === ackedWhenBack) {
      cell.writesStopped = true;
      cell.notes.push(`no write acknowledged from when it answered again until the end of the cell (${ctx.writeMs / 1000} s more)`);
    }
    if (stats.retries > 0) cell.notes.push(...new Set(stats.errors.slice(0, 2)));
  }
  try {
    await waitUntilServing(program, ctx.gateway, 30_000);
    cell.missing = (await program.check(ctx.gateway, cell.totalAcked)).missing.filter((i) => !ctx.lost.has(i));
  } catch (err) {
    cell.notes.push(`check failed: ${(err as Error).message}`);
  }
  const contiguous = cell.missing.length > 0 && cell.missing.at(-1)! - cell.missing[0]! === cell.missing.length - 1;
  if (kind === 'failover' && program.protocol === 'tcp' && contiguous) {
    cell.notes.push('the lost writes are one run, as when writes between the last checkpoint and the kill are lost: a TCP route keeps no request log to replay');
  }
  return cell;
}

/** After its host died: one running copy on another node, answering its own client through the gateway. */
async function backElsewhere(program: CompatProgram, ctx: CellContext, from: string): Promise<boolean> {
  const deadline = Date.now() + BACK_TIMEOUT_MS;
  while (Date.now() < deadline) {
    const copies = await runningCopies(ctx.name).catch(() => []);
    if (copies.length === 1 && copies[0]!.node !== from) {
      try {
        await program.ping(ctx.gateway);
        return true;
      } catch {
        // not answering yet
      }
    }
    await sleep(250);
  }
  return false;
}

/** The table of docs/compatibility.md: a row per program, a column per operation. */
export function resultsTable(results: ProgramResult[]): string {
  const lines = [
    `| program | route | ${CELL_KINDS.join(' | ')} | notes |`,
    `|---|---|${CELL_KINDS.map(() => '---').join('|')}|---|`,
    ...results.map((r) => {
      const cells = CELL_KINDS.map((kind) => {
        const c = r.cells.find((x) => x.kind === kind);
        return c ? cellText(c) : r.setup.length ? 'not run' : '-';
      });
      const notes = [...r.setup, ...r.cells.flatMap((c) => c.notes.map((n) => `${c.kind}: ${n}`))];
      return `| ${r.program} | ${r.route} | ${cells.join(' | ')} | ${clean(notes.join('; '), 600)} |`;
    }),
  ];
  return lines.join('\n');
}

function cellText(c: CellResult): string {
  const what =
    c.operation !== 'ok' ? `**FAILS**: ${clean(c.operation, 300)}` : c.missing.length > 0 ? '**LOSES WRITES**' : c.writesStopped ? '**TAKES NO WRITES** after it' : '**works**';
  const back = c.backMs !== undefined ? `, answers ${(c.backMs / 1000).toFixed(1)} s after it began` : '';
  const lost = c.missing.length ? `, ${c.missing.length} of ${c.totalAcked} acknowledged writes missing (${describeKeys(c.missing)})` : `, all ${c.totalAcked} acknowledged writes there`;
  return `${what}${back}${lost}; ${c.acked} writes in the cell, ${c.reconnects} reconnects, slowest write ${c.maxWriteMs} ms`;
}

const clean = (text: string, max: number) => text.replace(/\|/g, '/').replace(/\n/g, ' ').slice(0, max);
