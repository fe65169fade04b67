/**
 * The fault matrix's cells, shared by bench/faults (the whole matrix, the soak) and
 * test/integration/fault-matrix.test.ts (a CI subset): one protected statefulapp behind the
 * gateway, a client POSTing /increment nonstop, a process paused at a named step
 * (test/support/pauses.ts), the victim SIGKILLed right there, revived, the system left to
 * settle (bounded), then the invariants of test/support/fault-checks.ts.
 *
 * Needs the local cluster up with CHIPMUNK_ENABLE_FAULTS=1 and a short node lease
 * (startLocalCluster(3, { nodeLeaseMs: 1000 })).
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { clusterKill, clusterRevive, readClusterState } from '../../src/cluster/index.js';
import { steadyIncrements } from './clients.js';
import { GATEWAY_HOST, counterFailures, incarnationLeftovers, lockFailures, migrationDebris, structuralFailures, viaGateway, type Copy } from './fault-checks.js';
import { cli, clusterStateDir, localCluster, waitFor } from './local-cluster.js';
import { armPause, resumePause, waitForPause, type PauseHolder } from './pauses.js';

/** Once everything runs as it should, how long leftovers may take to go. */
const LEFTOVER_GRACE_MS = 10_000;

export const MIGRATION_PHASES = ['prepare', 'dump', 'transfer', 'restore', 'verify', 'cleanup'] as const;
export const CHECKPOINT_STEPS = ['cut', 'dump', 'upload', 'commit'] as const;
export const FAILOVER_STEPS = ['restore', 'replay', 'release'] as const;
/**
 * A failover of a container whose route's request log has no checkpoint cut in it yet: exposed
 * after its only checkpoint, its host killed before the next. The failover restores that
 * checkpoint and replays the whole log (position 0).
 */
export const BEFORE_FIRST_CUT = 'before-first-cut';
export const MIGRATION_VICTIMS = ['source-agent', 'target-agent', 'source-host', 'target-host', 'controller', 'gateway'] as const;
/** A checkpoint has one node: the container's (its "source"). */
export const CHECKPOINT_VICTIMS = ['source-agent', 'source-host', 'controller', 'gateway'] as const;
/** The source host is dead already (that started the failover); the target is where it restores. */
export const FAILOVER_VICTIMS = ['target-agent', 'target-host', 'controller', 'gateway'] as const;

export type Victim = (typeof MIGRATION_VICTIMS)[number];
export type CellKind = 'migration' | 'checkpoint' | 'failover';

export interface Cell {
  kind: CellKind;
  /** Migrations only. */
  mode?: 'lazy' | 'copy';
  /** The migration phase, checkpoint step or failover step the kill lands in. */
  step: string;
  victim: Victim;
}

export interface CellResult {
  id: string;
  cell: Cell;
  outcome: 'ok' | 'failed' | 'not reached';
  /** Invariants that did not hold once the settle time ran out. */
  failures: string[];
  /** From the kill to every structural invariant holding; undefined when they never did. */
  settleMs?: number;
  acked: number;
  /** Client requests that failed (no answer, or not 200): their effect is unknown to the client. */
  failed: number;
  /** Where the migration or the checkpoint ended, as its CLI said. */
  operation?: string;
  /** Why a failing invariant cannot hold by design, when it cannot. */
  unavoidable?: string;
  ms: number;
}

export interface CellOptions {
  /** Index of this cell in the run: picks the container name, ports, and nodes (rotating). */
  index: number;
  /** Memory the app touches (MB): big enough that a lazy target is still pulling pages when the kill lands. */
  memoryMb?: number;
  /** How long the victim stays dead before it is revived. */
  downMs?: number;
  /** Bound on settling after the revive. */
  settleMs?: number;
  log?: (line: string) => void;
}

export function cellId(cell: Cell): string {
  return [cell.kind, cell.mode, cell.step, cell.victim].filter(Boolean).join(' ');
}

/**
 * Every cell of the matrix, in a stable order that takes turns between lazy migrations, copy
 * migrations, checkpoints and failovers, so that a run cut short has covered each kind.
 */
export function allCells(): Cell[] {
  const groups: Cell[][] = [[], [], [], []];
  for (const [i, mode] of (['lazy', 'copy'] as const).entries()) {
    for (const step of MIGRATION_PHASES) for (const victim of MIGRATION_VICTIMS) groups[i]!.push({ kind: 'migration', mode, step, victim });
  }
  for (const step of CHECKPOINT_STEPS) for (const victim of CHECKPOINT_VICTIMS) groups[2]!.push({ kind: 'checkpoint', step, victim });
  for (const step of FAILOVER_STEPS) for (const victim of FAILOVER_VICTIMS) groups[3]!.push({ kind: 'failover', step, victim });
  groups[3]!.push({ kind: 'failover', step: BEFORE_FIRST_CUT, victim: 'source-host' });
  const cells: Cell[] = [];
  // Spread each group evenly over the run: a cell's place is its rank within its group, scaled.
  const placed = groups.flatMap((group) => group.map((cell, i) => ({ cell, at: (i + 0.5) / group.length })));
  for (const { cell } of placed.sort((a, b) => a.at - b.at)) cells.push(cell);
  return cells;
}

/**
 * Why the failing invariants cannot hold by design, if that is so. Every container here is
 * protected, so a copy can always come back from its checkpoint; what cannot be helped is a
 * client's request in flight through a gateway that dies: its answer is lost with the process,
 * so the counter may exceed the acknowledged writes by at most the failed requests.
 */
export function unavoidableReason(cell: Cell, failures: string[], counts: { acked: number; failed: number; counter?: number }): string | undefined {
  const onlyCounter = failures.length > 0 && failures.every((f) => /^counter \d+ != acknowledged/.test(f));
  const { acked, failed, counter } = counts;
  if (cell.victim === 'gateway' && onlyCounter && counter !== undefined && counter >= acked && counter <= acked + failed) {
    return `requests in flight through the gateway when it died lost their answers (${counter - acked} of ${failed} failed ones were applied): the client cannot know`;
  }
  return undefined;
}

/** Who pauses, at which step, so that the kill lands in the cell's phase. */
function pausePlan(cell: Cell, source: string, target: string, others: string[]): { holders: PauseHolder[]; step: string } {
  if (cell.kind === 'migration') {
    switch (cell.step) {
      case 'prepare':
        return { holders: ['controller'], step: 'migration:prepare' };
      case 'dump':
        return { holders: [source], step: 'migration:dump' };
      case 'transfer':
        return { holders: [target], step: 'migration:transfer' };
      case 'restore':
        return { holders: [target], step: cell.mode === 'lazy' ? 'restore:pages-pulling' : 'restore:done' };
      default:
        return { holders: ['controller'], step: `migration:${cell.step}` };
    }
  }
  if (cell.kind === 'checkpoint') return cell.step === 'cut' ? { holders: ['controller'], step: 'checkpoint:cut' } : { holders: [source], step: `checkpoint:${cell.step}` };
  // A failover restores on a node the controller picks: both candidates pause mid-fetch, the one reached is the target.
  if (cell.step === 'restore') return { holders: others, step: 'migration:transfer' };
  return { holders: ['controller'], step: `failover:${cell.step}` };
}

async function agentPid(node: string): Promise<number> {
  const state = await readClusterState(clusterStateDir());
  return state!.nodes.find((n) => n.name === node)!.agentPid;
}

/** SIGKILL: an agent alone, a whole test host, the controller or the gateway. Returns what to revive. */
async function kill(what: { agent: string } | { target: string }): Promise<string> {
  if ('agent' in what) {
    process.kill(await agentPid(what.agent), 'SIGKILL');
    return what.agent;
  }
  await clusterKill(what.target, { stateDir: clusterStateDir() });
  return what.target;
}

/** Revives TARGET if it is down (a revive of something running is a conflict, ignored). */
async function reviveIfDown(target: string): Promise<string | undefined> {
  try {
    await clusterRevive(target, { stateDir: clusterStateDir() });
    return undefined;
  } catch (err) {
    const message = (err as Error).message;
    return /only a killed/.test(message) ? undefined : `revive ${target} failed: ${message}`;
  }
}

export async function runCell(cell: Cell, opts: CellOptions): Promise<CellResult> {
  const started = Date.now();
  const log = opts.log ?? (() => {});
  const nodes = localCluster().nodes;
  const source = nodes[opts.index % nodes.length]!;
  const target = nodes[(opts.index + 1) % nodes.length]!;
  const others = nodes.filter((n) => n !== source);
  const name = `fm${opts.index}`;
  const port = 28400 + (opts.index % 500);
  const id = cellId(cell);
  const result: CellResult = { id, cell, outcome: 'failed', failures: [], acked: 0, failed: 0, ms: 0 };

  const revive = new Set<string>();
  const plan = pausePlan(cell, source, target, others);
  let client: ReturnType<typeof steadyIncrements> | undefined;
  const beforeFirstCut = cell.step === BEFORE_FIRST_CUT;
  try {
    if (beforeFirstCut) await setUpBeforeFirstCut(name, source, port, opts.memoryMb ?? 64);
    else await setUp(name, source, port, opts.memoryMb ?? 64);
    // What earlier cells left (migration images, mounts) is theirs, not this cell's.
    const leftBefore = new Set(await migrationDebris());
    client = steadyIncrements(`http://${GATEWAY_HOST}:${port}`, 1, 300_000);
    await sleep(1_000);
    let operation: Promise<string> | undefined;
    let killedAt: number;
    if (beforeFirstCut) {
      // No pause: the host dies with the client writing, long before the next scheduled cut.
      killedAt = Date.now();
      revive.add(await kill({ target: source }));
      log(`${id}: killed ${source} before the first cut in the log`);
    } else {
      for (const holder of plan.holders) await armPause(holder, plan.step);
      if (cell.kind === 'migration') {
        operation = cli(['migrate', name, '--to', target, '--mode', cell.mode!], { timeoutMs: 120_000 }).then((r) => (r.code === 0 ? 'migrated' : `migrate: ${r.error?.message ?? r.stderr.trim().slice(-300)}`));
      } else if (cell.kind === 'failover') {
        revive.add(await kill({ target: source }));
      }
      // Checkpoints come by themselves: the container is checkpointed every 2 s.
      let holder: PauseHolder;
      try {
        holder = await waitForPause(plan.holders, 45_000, `${plan.step} on ${plan.holders.join(' or ')}`);
      } catch (err) {
        result.outcome = 'not reached';
        result.failures.push((err as Error).message);
        if (operation) result.operation = await operation;
        return result;
      }
      for (const other of plan.holders) if (other !== holder) await resumePause(other);
      // The failover's target: the node that paused restoring, or (later steps) where the record says it is now.
      const failoverTarget = cell.kind === 'failover' ? (cell.step === 'restore' ? holder : await recordedNode(name)) : undefined;
      const victimNode = cell.victim.startsWith('source') ? source : (failoverTarget ?? target);
      const victim =
        cell.victim === 'controller' || cell.victim === 'gateway'
          ? { target: cell.victim }
          : cell.victim.endsWith('agent')
            ? { agent: victimNode }
            : { target: victimNode };
      killedAt = Date.now();
      revive.add(await kill(victim));
      log(`${id}: ${plan.step} reached on ${holder}; killed ${JSON.stringify(victim)}`);
      const holderDied = holder === ('target' in victim ? victim.target : victim.agent);
      if (!holderDied) await resumePause(holder);
    }
    await sleep(opts.downMs ?? 3_000);
    for (const down of revive) {
      const failure = await reviveIfDown(down);
      if (failure) result.failures.push(failure);
    }
    revive.clear();

    // Settle: every structural invariant at once, and no leftovers.
    const settleDeadline = Date.now() + (opts.settleMs ?? 60_000);
    let last: { failures: string[]; copy?: Copy } = { failures: [] };
    let left: string[] = [];
    let leftoverDeadline = settleDeadline;
    for (;;) {
      last = await structuralFailures(name, port);
      if (last.failures.length === 0) {
        if (result.settleMs === undefined) {
          result.settleMs = Date.now() - killedAt;
          // Cleaning up after a fault takes a moment, not the whole settle time.
          leftoverDeadline = Math.min(settleDeadline, Date.now() + LEFTOVER_GRACE_MS);
        }
        left = [...(await incarnationLeftovers(name, last.copy)), ...(await migrationDebris()).filter((l) => !leftBefore.has(l))];
        if (left.length === 0 || Date.now() > leftoverDeadline) break;
      }
      if (Date.now() > settleDeadline) break;
      await sleep(500);
    }
    if (operation) result.operation = await Promise.race([operation, sleep(5_000).then(() => 'still running after the settle time')]);
    result.failures.push(...last.failures, ...left.map((l) => `leftover ${l}`));
    // Checkpoints every 20 s here (see setUpBeforeFirstCut): the next scheduled one may take that long.
    if (last.failures.length === 0) result.failures.push(...(await lockFailures(name, Date.now(), beforeFirstCut ? 25_000 : 8_000)));
    if (beforeFirstCut) {
      const replay = await wholeLogReplay(name, killedAt);
      result.operation = replay.said;
      if (!replay.reached) {
        result.outcome = 'not reached';
        result.failures.push(replay.said);
        return result;
      }
    }
    const stats = await Promise.race([client.stop(), sleep(20_000).then(() => undefined)]);
    if (!stats) result.failures.push('client stuck: a request got no answer for 20 s after the settle');
    result.acked = client.stats.ok;
    result.failed = client.stats.failed;
    let counter: number | undefined;
    if (last.failures.length === 0 && stats) {
      const checked = await counterFailures(port, stats.ok);
      result.failures.push(...checked.failures);
      counter = checked.counter;
    }
    const unavoidable = unavoidableReason(cell, result.failures, { acked: result.acked, failed: result.failed, counter });
    if (unavoidable) result.unavoidable = unavoidable;
    result.outcome = result.failures.length === 0 ? 'ok' : 'failed';
    return result;
  } finally {
    for (const holder of ['controller', ...nodes]) await resumePause(holder);
    for (const down of revive) await reviveIfDown(down);
    if (client) await Promise.race([client.stop(), sleep(5_000)]);
    // A lock left for good (reported above) makes rm wait a minute for nothing.
    const lockLeft = result.failures.some((f) => f.startsWith('protection stopped'));
    const notRemoved = await tearDown(name, lockLeft ? 5_000 : 75_000);
    if (notRemoved) opts.log?.(`  ${notRemoved}: left running`);
    result.ms = Date.now() - started;
  }
}

async function recordedNode(name: string): Promise<string | undefined> {
  const res = await cli<Array<{ name: string; node: string }>>(['ps'], { timeoutMs: 10_000 });
  return res.json?.find((c) => c.name === name)?.node;
}

/** A protected app on NODE, exposed on PORT, answering through the gateway, with a checkpoint cut at a log position. */
export async function setUp(name: string, node: string, port: number, memoryMb: number, every = '2s'): Promise<void> {
  const run = await cli(['run', '--name', name, '--node', node, '-p', `${port}:8080`, '-e', `MEMORY_MB=${memoryMb}`, '--memory', `${memoryMb + 256}m`, '--checkpoint-every', every, 'chipmunk/statefulapp']);
  if (run.code !== 0) throw new Error(`run ${name} on ${node}: ${run.error?.message ?? run.stderr}`);
  const expose = await cli(['expose', name, '--port', '8080', '--listen', String(port)]);
  if (expose.code !== 0) throw new Error(`expose ${name}: ${expose.error?.message ?? expose.stderr}`);
  await waitFor(() => viaGateway(port, '/health'), 30_000, `${name} answers through the gateway`);
  await waitFor(async () => (await cli<Array<{ logPosition: number | null }>>(['checkpoints', name])).json?.some?.((c) => c.logPosition !== null), 30_000, `a checkpoint of ${name} at a log position`);
}

/**
 * A protected app on NODE whose only checkpoint was cut before its route logged: checkpointed
 * every 20 s, exposed once its first checkpoint is in; the cell's kill then comes seconds before
 * the next cut.
 */
async function setUpBeforeFirstCut(name: string, node: string, port: number, memoryMb: number): Promise<void> {
  const run = await cli(['run', '--name', name, '--node', node, '-p', `${port}:8080`, '-e', `MEMORY_MB=${memoryMb}`, '--memory', `${memoryMb + 256}m`, '--checkpoint-every', '20s', 'chipmunk/statefulapp']);
  if (run.code !== 0) throw new Error(`run ${name} on ${node}: ${run.error?.message ?? run.stderr}`);
  await waitFor(async () => ((await cli<unknown[]>(['checkpoints', name])).json?.length ?? 0) > 0, 30_000, `a first checkpoint of ${name}`);
  const expose = await cli(['expose', name, '--port', '8080', '--listen', String(port)]);
  if (expose.code !== 0) throw new Error(`expose ${name}: ${expose.error?.message ?? expose.stderr}`);
  await waitFor(() => viaGateway(port, '/health'), 30_000, `${name} answers through the gateway`);
}

/** The failover of NAME since KILLEDAT: whether it replayed the whole log (position 0), and what it did. */
async function wholeLogReplay(name: string, killedAt: number): Promise<{ reached: boolean; said: string }> {
  type Record = { name: string; detectedAt: number; outcome: string; checkpoint?: string; logPosition?: { logId?: string; seq: number } | null; replayed?: number; delivered?: number; noReplay?: string };
  const records = ((await cli<Record[]>(['failovers'], { timeoutMs: 10_000 })).json ?? []).filter((r) => r.name === name && r.detectedAt >= killedAt);
  const done = records.find((r) => r.outcome === 'done');
  if (!done) return { reached: false, said: `no finished failover of ${name} (${records.map((r) => r.outcome).join(', ') || 'none'})` };
  const at = done.logPosition ? `${done.logPosition.seq}@${done.logPosition.logId ?? '?'}` : 'no position';
  const said = `failover from ${done.checkpoint ?? '?'} at ${at}: replayed ${done.replayed ?? 0}, delivered ${done.delivered ?? 0}${done.noReplay ? `; NO REPLAY: ${done.noReplay}` : ''}`;
  return { reached: done.logPosition?.seq === 0, said };
}

/**
 * rm, retried while a lock that is still being released refuses it (bounded: a lock left for
 * good, a bug the cell reports, makes rm wait and fail; the container then stays until the
 * cluster goes down). Returns the error when it could not be removed.
 */
export async function tearDown(name: string, maxMs = 75_000): Promise<string | undefined> {
  const deadline = Date.now() + maxMs;
  let why = '';
  while (Date.now() < deadline) {
    const rm = await cli(['rm', name], { timeoutMs: Math.max(1_000, deadline - Date.now()) });
    if (rm.code === 0 || rm.error?.code === 'CHIPMUNK_NOT_FOUND') return undefined;
    why = rm.error?.message ?? rm.stderr.trim().slice(-200);
    await sleep(2_000);
  }
  return `rm ${name} failed: ${why}`;
}

/** The end of a daemon's log, for a failing cell's report. */
export async function logTail(daemon: string, lines = 20): Promise<string> {
  const text = await readFile(join(clusterStateDir(), 'logs', `${daemon}.log`), 'utf8').catch(() => '');
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}
