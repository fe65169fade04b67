/**
 * The failover soak: one protected container under load, its host killed again and again at
 * random moments, some of them mid-checkpoint (the gateway holding the cut) and mid-upload
 * (pause points). Per run: is it back on another host, does it stay there after the dead host
 * returns, did any request fail, counter == acknowledged.
 */
import { readFile, readdir } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { clusterKill, clusterRevive } from '../../src/cluster/index.js';
import { steadyIncrements } from './clients.js';
import { GATEWAY_HOST, counterFailures, structuralFailures } from './fault-checks.js';
import { setUp, tearDown } from './fault-cells.js';
import { cli, clusterStateDir, localCluster, runningCopies } from './local-cluster.js';
import { armPause, resumePause, waitForPause } from './pauses.js';

export type SoakMoment = 'random' | 'mid-checkpoint' | 'mid-upload';

export interface SoakRun {
  run: number;
  moment: SoakMoment;
  from: string;
  to?: string;
  /** From the kill to a running copy elsewhere that the controller records. */
  backMs?: number;
  back: boolean;
  /** Still the only copy, on the same node, after the dead host returned. */
  stayed: boolean;
  acked: number;
  failed: number;
  counterOk: boolean;
  /** The failover's own account (chipmunk failovers): where its time went, ms. */
  timings?: Record<string, number>;
  /** Checkpoints it passed over before one restored. */
  skipped?: number;
  /** Mounts and network namespaces on the machine when the run began: what dead incarnations may leave grows them. */
  mounts?: number;
  netns?: number;
  notes: string[];
}

interface FailoverRow {
  name: string;
  detectedAt: number;
  outcome: string;
  timings: Record<string, number>;
  skipped: unknown[];
  replayed?: number;
}

/** The newest failover of NAME detected after SINCE, as `chipmunk failovers` reports it. */
async function failoverAfter(name: string, since: number): Promise<FailoverRow | undefined> {
  const res = await cli<FailoverRow[]>(['failovers'], { timeoutMs: 10_000 });
  return res.json?.filter?.((f) => f.name === name && f.detectedAt >= since).at(-1);
}

const MOMENTS: SoakMoment[] = ['random', 'mid-checkpoint', 'mid-upload'];

export async function soak(runs: number, log: (line: string) => void = () => {}): Promise<SoakRun[]> {
  const name = 'soak';
  const port = 28390;
  await setUp(name, localCluster().nodes[0]!, port, 64);
  const rows: SoakRun[] = [];
  let ackedBefore = 0;
  try {
    for (let run = 1; run <= runs; run++) {
      const moment = MOMENTS[(run - 1) % MOMENTS.length]!;
      const from = (await runningCopies(name))[0]?.node;
      const row: SoakRun = { run, moment, from: from ?? '?', back: false, stayed: false, acked: 0, failed: 0, counterOk: false, notes: [] };
      rows.push(row);
      if (!from) {
        row.notes.push('no running copy before the kill');
        break;
      }
      row.mounts = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').filter(Boolean).length;
      row.netns = (await readdir('/var/run/netns').catch(() => [])).length;
      const client = steadyIncrements(`http://${GATEWAY_HOST}:${port}`, 1, 300_000);
      await sleep(500 + Math.random() * 2_000);
      if (moment !== 'random') {
        const holder = moment === 'mid-checkpoint' ? 'controller' : from;
        await armPause(holder, moment === 'mid-checkpoint' ? 'checkpoint:cut' : 'checkpoint:upload');
        await waitForPause([holder], 15_000, `${moment} of ${name}`).catch((err: Error) => row.notes.push(err.message));
      }
      const { killedAt } = await clusterKill(from, { stateDir: clusterStateDir() });
      await resumePause('controller');
      // Back: one copy on another node, and the controller's record agrees.
      const deadline = Date.now() + 60_000;
      while (Date.now() < deadline) {
        const state = await structuralFailures(name, port);
        if (state.failures.length === 0 && state.copy && state.copy.node !== from) {
          row.back = true;
          row.to = state.copy.node;
          row.backMs = Date.now() - killedAt;
          break;
        }
        await sleep(250);
      }
      const failover = await failoverAfter(name, killedAt - 60_000).catch(() => undefined);
      if (failover) {
        row.timings = { ...failover.timings, detectMs: failover.detectedAt - killedAt, ...(failover.replayed !== undefined ? { replayed: failover.replayed } : {}) };
        row.skipped = failover.skipped.length;
      }
      await clusterRevive(from, { stateDir: clusterStateDir() }).catch((err: Error) => row.notes.push(`revive ${from}: ${err.message}`));
      await sleep(5_000);
      const after = await runningCopies(name);
      row.stayed = row.back && after.length === 1 && after[0]!.node === row.to;
      if (!row.stayed) row.notes.push(`after ${from} returned: ${after.map((c) => c.id).join(', ') || 'no copy'}`);
      const stats = await client.stop();
      row.acked = stats.ok;
      row.failed = stats.failed;
      if (stats.failed) row.notes.push(...new Set(stats.errors.slice(0, 3)));
      ackedBefore += stats.ok;
      const counter = await counterFailures(port, ackedBefore);
      row.counterOk = counter.failures.length === 0;
      row.notes.push(...counter.failures);
      // Counting goes on from what the app really has, so one bad run does not fail every later one.
      if (counter.counter !== undefined) ackedBefore = counter.counter;
      log(`soak run ${run} (${moment}): ${from} -> ${row.to ?? '?'} ${row.back ? `in ${row.backMs} ms` : 'NOT BACK'}, stayed ${row.stayed}, ${row.acked} acked, ${row.failed} failed${row.notes.length ? `; ${row.notes.join('; ')}` : ''}`);
      if (!row.back) break;
      // Protection must have a checkpoint on the new node before the next kill, or there is nothing to fail over from.
      await sleep(3_000);
    }
  } finally {
    for (const holder of ['controller', ...localCluster().nodes]) await resumePause(holder);
    await tearDown(name);
  }
  return rows;
}

export function soakTable(rows: SoakRun[]): string {
  const lines = [
    '| run | killed at | from | to | back after | failover: detected / lock / restore (fetch, criu) / replay / release, ms | back elsewhere | stayed after the host returned | acknowledged | failed | counter == acknowledged | mounts, netns before | notes |',
    '|---:|---|---|---|---:|---|---|---|---:|---:|---|---|---|',
    ...rows.map(
      (r) =>
        `| ${r.run} | ${r.moment} | ${r.from} | ${r.to ?? '-'} | ${r.backMs !== undefined ? `${r.backMs} ms` : '-'} | ${timingsCell(r)} | ${r.back ? 'yes' : 'NO'} | ${r.stayed ? 'yes' : 'NO'} | ${r.acked} | ${r.failed} | ${r.counterOk ? 'yes' : 'NO'} | ${r.mounts ?? '?'}, ${r.netns ?? '?'} | ${r.notes.join('; ').replace(/\|/g, '/').slice(0, 200)} |`,
    ),
  ];
  const good = rows.filter((r) => r.back && r.stayed && r.failed === 0 && r.counterOk).length;
  lines.push('', `${good} of ${rows.length} runs: back on another host, stayed there, 0 failed requests, counter == acknowledged.`);
  return lines.join('\n');
}

/** "1010 / 3 / 1900 (1200, 600) / 40 / 5", plus the checkpoints passed over and the records replayed. */
function timingsCell(row: SoakRun): string {
  const t = row.timings;
  if (!t) return '-';
  const ms = (key: string) => (t[key] !== undefined ? String(Math.round(t[key]!)) : '?');
  const extra = [row.skipped ? `${row.skipped} skipped` : '', t.replayed !== undefined ? `${t.replayed} replayed` : ''].filter(Boolean).join(', ');
  return `${ms('detectMs')} / ${ms('lockMs')} / ${ms('restoreMs')} (${ms('fetchMs')}, ${ms('criuMs')}) / ${ms('replayMs')} / ${ms('releaseMs')}${extra ? `; ${extra}` : ''}`;
}
