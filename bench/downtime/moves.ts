/**
 * A move measured as a client sees it, on the runc pair (bench/downtime/pair-cluster.ts), and its
 * frozen window cut into consecutive pieces from the steps the migration record holds (the
 * source's dump, the target's fetch and restore: src/shared/steps.ts), the record's phase times and
 * the controller's route moves, from the last answer before the move to the first after it, so
 * that the pieces add up to the gap. Shared by bench/downtime and bench/migration.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { FreshConnectionProbe, KeptConnectionProbe, KeptRedisProbe, longestGap } from '../../src/devtools/downtime-probe.js';
import type { MigrationMode, MigrationRecord, MigrationStep } from '../../src/shared/protocol.js';
import type { PairCluster } from './pair-cluster.js';

/** The probes' own bound: a copy move of 4 GB on a loaded machine takes minutes (they stopped at 2 and missed its end). */
const PROBE_MAX_MS = 20 * 60_000;
/** The stateful app's port (src/devtools/statefulapp). */
export const APP_PORT = 8080;

/** One move, cut into consecutive pieces (ms) from the last answer before it to the first after. */
export interface MoveResult {
  gapMs: number;
  keptGapMs?: number;
  keptErrors: string[];
  /** The kept connection was the same one from before the move to after it, and saw no error. */
  connectionKept: boolean;
  /** Why not, when not: its first error, or that it was closed and a new one opened. */
  connectionLost?: string;
  recordedDowntimeMs: number;
  /** The whole migration, as its summary says. */
  totalMs: number;
  bytesTransferred: number;
  pieces: Map<string, number>;
}

/**
 * The timeline of a move: each point ends the piece named with it. A point that is missing
 * (copy mode has no lazy-pages daemon; a CRIU log line another version lacks) is skipped, so its
 * time goes to the next piece.
 */
export function piecesOf(record: MigrationRecord, lastBefore: number, firstAfter: number, routeMove?: { began: number; ended: number }): Map<string, number> {
  const event = (phase: string) => record.history.find((e) => e.phase === phase);
  const dumpSteps = event('dump')?.steps ?? [];
  const restoreSteps = event('transfer')?.steps ?? [];
  const step = (steps: MigrationStep[], name: string) => steps.find((s) => s.step === name);
  const start = (s?: MigrationStep) => s?.at;
  const end = (s?: MigrationStep) => (s ? s.at + s.ms : undefined);
  const latest = (...ats: Array<number | undefined>) => (ats.some((at) => at === undefined) ? ats.find((at) => at !== undefined) : Math.max(...(ats as number[])));
  const d = (name: string) => step(dumpSteps, name);
  const r = (name: string) => step(restoreSteps, name);
  const points: Array<[string, number | undefined]> = [
    // Frozen first (pre-freeze): by runc's CRIU wrapper just before the dump's CRIU starts.
    ...(d('pause')
      ? ([
          ['running until frozen (before the dump\'s CRIU starts)', end(d('pause'))],
          ['CRIU starts (frozen)', start(d('criu-init'))],
          ['CRIU init (frozen)', start(d('freeze'))],
        ] as Array<[string, number | undefined]>)
      : ([['running until CRIU freezes it', start(d('freeze'))]] as Array<[string, number | undefined]>)),
    ['CRIU freeze (cgroup frozen, tasks seized)', end(d('freeze'))],
    ['CRIU dump (network lock, state; copy: memory)', end(d('criu-dump'))],
    ['runc checkpoint returns', end(d('runc-checkpoint'))],
    ['layer sync, sizes', end(d('sync-layer'))],
    ['dump answer, phase write, restore call', start(r('fetch-images'))],
    ['fetch images', end(r('fetch-images'))],
    ['fetch files', end(r('fetch-files'))],
    ['bundle (address, rootfs, config)', end(r('bundle'))],
    // Started while the bundle is made (daemon-overlap): only what it takes beyond the bundle.
    ['lazy-pages daemon start', latest(end(r('bundle')), end(r('lazy-pages-daemon')))],
    ['runc restore until CRIU starts', start(r('criu-init'))],
    ['CRIU init', start(r('criu-namespaces'))],
    ['CRIU namespaces before the prestart hooks (fork)', start(r('prestart-hooks'))],
    ['prestart hooks (interface moved in)', end(r('prestart-hooks'))],
    ['CRIU namespaces (fork, cgroups, mounts)', start(r('criu-restore'))],
    ['CRIU restore (files, sockets, memory map)', end(r('criu-restore'))],
    ['runc restore returns', end(r('runc-restore'))],
    ['address routed on the target (network unlock)', end(r('route-address'))],
    // Routed ahead (the restore's answer moves the route): verify and commit are written meanwhile, out of the gap.
    ...(routeMove && routeMove.began < (event('cleanup')?.at ?? Infinity)
      ? ([['restore answer, routes script starts', routeMove.began]] as Array<[string, number | undefined]>)
      : ([
          ['restore answer, verify write', event('verify')?.at],
          ['verify, commit write', event('cleanup')?.at],
          ['commit seen, routes script starts', routeMove?.began],
        ] as Array<[string, number | undefined]>)),
    ['routes script (machine and test hosts)', routeMove?.ended],
    ['first answer (client retry, lazy page faults)', firstAfter],
  ];
  const pieces = new Map<string, number>();
  let previous = lastBefore;
  for (const [name, at] of points) {
    if (at === undefined) continue;
    pieces.set(name, at - previous);
    previous = at;
  }
  return pieces;
}

/**
 * Moves `name` to `to` once while two clients watch its cluster address: new connections about
 * every millisecond (the client-seen gap) and one kept connection sending a request every
 * `keptIntervalMs` (kept or reset). `url`: the stateful app's, or redis://ADDRESS:6379 (PING).
 */
export async function moveOnce(
  cluster: PairCluster,
  name: string,
  address: string,
  to: string,
  mode: MigrationMode,
  keptIntervalMs = 1,
  url = `http://${address}:${APP_PORT}/health`,
): Promise<MoveResult> {
  const fresh = new FreshConnectionProbe(url, PROBE_MAX_MS);
  const kept = url.startsWith('redis:') ? new KeptRedisProbe(url, PROBE_MAX_MS, keptIntervalMs) : new KeptConnectionProbe(url, PROBE_MAX_MS, keptIntervalMs);
  fresh.start();
  kept.start();
  await sleep(300);
  const since = Date.now();
  let summary: { id: string; downtimeMs: number; totalMs: number; bytesTransferred: number } | undefined;
  for await (const line of await cluster.client.migrate(name, { to, mode })) {
    if ('error' in line) throw new Error(`migration of ${name} to ${to} failed: ${line.error.message}`);
    if ('summary' in line) summary = line.summary;
  }
  if (!summary) throw new Error(`migration of ${name} to ${to}: the stream ended without a summary`);
  await sleep(300);
  const [freshTimes, keptTimes] = await Promise.all([fresh.stop(), kept.stop()]);
  const gap = longestGap(freshTimes.answers, since);
  if (!gap) throw new Error(`no answers around the move of ${name}: the probe saw ${freshTimes.requests} requests unanswered`);
  const record = (await cluster.client.migrations()).find((m) => m.id === summary!.id);
  if (!record) throw new Error(`migration ${summary.id} is not in the controller's records`);
  const routeMove = (await cluster.routeMoves(address)).find((m) => m.began >= since);
  return {
    gapMs: gap.gapMs,
    keptGapMs: longestGap(keptTimes.answers, since)?.gapMs,
    keptErrors: keptTimes.errors,
    connectionKept: keptTimes.errors.length === 0 && keptTimes.connections === 1,
    ...(keptTimes.errors.length > 0
      ? { connectionLost: keptTimes.errors[0] }
      : keptTimes.connections !== 1
        ? { connectionLost: `closed without an error; the client opened ${keptTimes.connections} connections` }
        : {}),
    recordedDowntimeMs: summary.downtimeMs,
    totalMs: summary.totalMs,
    bytesTransferred: summary.bytesTransferred,
    pieces: piecesOf(record, gap.lastBefore, gap.firstAfter, routeMove),
  };
}

export function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!;
}

export const ms = (v: number | undefined) => (v === undefined ? '-' : `${Math.round(v)} ms`);

/** The frozen window of `results`' moves, piece by piece (p50, p99), under the heading `title`. */
export function breakdownTable(title: string, results: MoveResult[]): string {
  const gaps = results.map((r) => r.gapMs);
  const keptGaps = results.flatMap((r) => (r.keptGapMs === undefined ? [] : [r.keptGapMs]));
  const keptErrors = results.filter((r) => r.keptErrors.length > 0).length;
  const recorded = results.map((r) => r.recordedDowntimeMs);
  const names = [...new Set(results.flatMap((r) => [...r.pieces.keys()]))];
  const lines = [
    `### ${title}, ${results.length} moves`,
    '',
    '| | p50 | p99 |',
    '|---|---:|---:|',
    `| **client-seen gap** (new connections every ~1 ms) | **${ms(percentile(gaps, 50))}** | **${ms(percentile(gaps, 99))}** |`,
    `| kept connection's gap (TCP retransmission included) | ${keptGaps.length ? ms(percentile(keptGaps, 50)) : '-'} | ${keptGaps.length ? ms(percentile(keptGaps, 99)) : '-'} |`,
    `| downtime the record says (frozen to restored) | ${ms(percentile(recorded, 50))} | ${ms(percentile(recorded, 99))} |`,
    ...names.map((n) => {
      const values = results.map((r) => r.pieces.get(n) ?? 0);
      return `| ${n} | ${ms(percentile(values, 50))} | ${ms(percentile(values, 99))} |`;
    }),
    '',
    `Kept connection: ${keptErrors === 0 ? 'no error in any move' : `errors in ${keptErrors} of ${results.length} moves (${results.flatMap((r) => r.keptErrors).slice(0, 3).join('; ')})`}, ${results.filter((r) => r.connectionKept).length} of ${results.length} kept. ` +
      `The pieces are consecutive: their p50s add up to about the gap's p50. Gaps per move: ${gaps.map((g) => Math.round(g)).join(', ')} ms.`,
    '',
  ];
  return lines.join('\n');
}
