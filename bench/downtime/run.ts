/**
 * bench/downtime: where the client-seen gap of a move goes, step by step, on the runc pair (no
 * local cluster needed: a controller and two agents in this process, bench/downtime/pair-cluster.ts).
 *
 * For each memory size, the stateful app (src/devtools/statefulapp, every page touched) moves N
 * times between the pair's two nodes (back and forth, lazy mode by default) while two clients
 * watch its cluster address: new connections about every millisecond (FreshConnectionProbe: the
 * client-seen gap) and one kept connection (KeptConnectionProbe: its gap includes TCP's
 * retransmission wait; it must see no error). The frozen window is then cut into consecutive
 * pieces from the steps the migration record holds (the source's dump, the target's fetch and
 * restore, src/shared/steps.ts) and the record's phase times, from the last answer before the
 * move to the first after it, so the pieces add up to the gap. Prints p50 (and p99) per piece.
 *
 * Usage (root, after `npm run setup`):
 *   CHIPMUNK_RUNC_PAIR_NET=3 npx tsx bench/downtime/run.ts [--moves 10] [--sizes 256,64] [--mode lazy|copy] [--out FILE]
 * Writes bench/results/downtime-breakdown.md (or FILE).
 */
import { writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { ensureImage } from '../../src/devtools/images.js';
import { FreshConnectionProbe, KeptConnectionProbe, firstAnswer, longestGap } from '../../src/devtools/downtime-probe.js';
import type { MigrationMode, MigrationRecord, MigrationStep } from '../../src/shared/protocol.js';
import { startPairCluster, type PairCluster } from './pair-cluster.js';

const RESULTS = fileURLToPath(new URL('../results/downtime-breakdown.md', import.meta.url));
const APP_PORT = 8080;
const MAX_MOVES = 30;

const { values } = parseArgs({
  options: {
    moves: { type: 'string', default: '10' },
    sizes: { type: 'string', default: '256,64' },
    mode: { type: 'string', default: 'lazy' },
    out: { type: 'string', default: RESULTS },
    compare: { type: 'string' },
  },
});
const moves = Number(values.moves);
if (!Number.isInteger(moves) || moves < 1 || moves > MAX_MOVES) throw new Error(`--moves ${values.moves}: give 1 to ${MAX_MOVES}`);
const sizes = values.sizes!.split(',').map(Number);
if (sizes.some((s) => !Number.isInteger(s) || s < 1 || s > 4096)) throw new Error(`--sizes ${values.sizes}: give sizes in MB, 1 to 4096, comma-separated`);
const mode = values.mode as MigrationMode;
/**
 * `--compare LEVER`: the moves take turns (two by two, so each way goes in both directions) with
 * the lever and without it (CHIPMUNK_DOWNTIME_OFF=LEVER, read where the lever acts), side by side
 * under the same load; each gets its table.
 */
const variants = values.compare ? [`with ${values.compare}`, `without ${values.compare}`] : [''];
if (mode !== 'lazy' && mode !== 'copy') throw new Error(`--mode ${values.mode}: lazy or copy`);

/** One move, cut into consecutive pieces (ms) from the last answer before it to the first after. */
interface MoveResult {
  gapMs: number;
  keptGapMs?: number;
  keptErrors: string[];
  recordedDowntimeMs: number;
  pieces: Map<string, number>;
}

/**
 * The timeline of a move: each point ends the piece named with it. A point that is missing
 * (copy mode has no lazy-pages daemon; a CRIU log line another version lacks) is skipped, so its
 * time goes to the next piece.
 */
function piecesOf(record: MigrationRecord, lastBefore: number, firstAfter: number, routeMove?: { began: number; ended: number }): Map<string, number> {
  const event = (phase: string) => record.history.find((e) => e.phase === phase);
  const dumpSteps = event('dump')?.steps ?? [];
  const restoreSteps = event('transfer')?.steps ?? [];
  const step = (steps: MigrationStep[], name: string) => steps.find((s) => s.step === name);
  const start = (s?: MigrationStep) => s?.at;
  const end = (s?: MigrationStep) => (s ? s.at + s.ms : undefined);
  const d = (name: string) => step(dumpSteps, name);
  const r = (name: string) => step(restoreSteps, name);
  const points: Array<[string, number | undefined]> = [
    ['running until CRIU freezes it', start(d('freeze'))],
    ['CRIU freeze (cgroup frozen, tasks seized)', end(d('freeze'))],
    ['CRIU dump (network lock, state; copy: memory)', end(d('criu-dump'))],
    ['runc checkpoint returns', end(d('runc-checkpoint'))],
    ['layer sync, sizes', end(d('sync-layer'))],
    ['dump answer, phase write, restore call', start(r('fetch-images'))],
    ['fetch images', end(r('fetch-images'))],
    ['fetch files', end(r('fetch-files'))],
    ['bundle (address, rootfs, config)', end(r('bundle'))],
    ['lazy-pages daemon start', end(r('lazy-pages-daemon'))],
    ['runc restore until CRIU starts', start(r('criu-init'))],
    ['CRIU init', start(r('criu-namespaces'))],
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

async function moveOnce(cluster: PairCluster, name: string, address: string, to: string): Promise<MoveResult> {
  const url = `http://${address}:${APP_PORT}/health`;
  const fresh = new FreshConnectionProbe(url);
  const kept = new KeptConnectionProbe(url);
  fresh.start();
  kept.start();
  await sleep(300);
  const since = Date.now();
  let summary: { id: string; downtimeMs: number } | undefined;
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
    recordedDowntimeMs: summary.downtimeMs,
    pieces: piecesOf(record, gap.lastBefore, gap.firstAfter, routeMove),
  };
}

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!;
}

const ms = (v: number | undefined) => (v === undefined ? '-' : `${Math.round(v)} ms`);

function table(sizeMB: number, results: MoveResult[], variant: string): string {
  const gaps = results.map((r) => r.gapMs);
  const keptGaps = results.flatMap((r) => (r.keptGapMs === undefined ? [] : [r.keptGapMs]));
  const keptErrors = results.filter((r) => r.keptErrors.length > 0).length;
  const recorded = results.map((r) => r.recordedDowntimeMs);
  const names = [...new Set(results.flatMap((r) => [...r.pieces.keys()]))];
  const lines = [
    `### ${sizeMB} MB, ${mode}${variant ? `, ${variant}` : ''}, ${results.length} moves`,
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
    `Kept connection: ${keptErrors === 0 ? 'no error in any move' : `errors in ${keptErrors} of ${results.length} moves (${results.flatMap((r) => r.keptErrors).slice(0, 3).join('; ')})`}. ` +
      `The pieces are consecutive: their p50s add up to about the gap's p50. Gaps per move: ${gaps.map((g) => Math.round(g)).join(', ')} ms.`,
    '',
  ];
  return lines.join('\n');
}

async function main(): Promise<void> {
  await ensureImage('chipmunk/statefulapp');
  const cluster = await startPairCluster();
  const sections: string[] = [];
  const summary: string[] = values.compare
    ? ['| memory | lever | client-seen gap p50 | p99 | kept connection p50 | recorded downtime p50 |', '|---:|---|---:|---:|---:|---:|']
    : ['| memory | client-seen gap p50 | p99 | kept connection p50 | recorded downtime p50 |', '|---:|---:|---:|---:|---:|'];
  try {
    for (const sizeMB of sizes) {
      const name = `dt-${sizeMB}`;
      const view = await cluster.client.run({ spec: { name, image: 'chipmunk/statefulapp', env: { MEMORY_MB: String(sizeMB) } }, node: cluster.source });
      if (!view.address) throw new Error(`${name} got no cluster address: the bench needs one`);
      const url = `http://${view.address}:${APP_PORT}/health`;
      await firstAnswer(url, 120_000);
      const rows = new Map<string, MoveResult[]>(variants.map((v) => [v, []]));
      for (let i = 0; i < moves * variants.length; i++) {
        const to = i % 2 === 0 ? cluster.target : cluster.source;
        const variant = variants[Math.floor(i / 2) % variants.length]!;
        if (variant.startsWith('without ')) process.env.CHIPMUNK_DOWNTIME_OFF = values.compare;
        else delete process.env.CHIPMUNK_DOWNTIME_OFF;
        const result = await moveOnce(cluster, name, view.address, to);
        rows.get(variant)!.push(result);
        console.error(`${sizeMB} MB ${variant} move ${i + 1}/${moves * variants.length} to ${to}: client-seen gap ${Math.round(result.gapMs)} ms, kept connection ${ms(result.keptGapMs)}${result.keptErrors.length ? ` (errors: ${result.keptErrors[0]})` : ''}`);
      }
      delete process.env.CHIPMUNK_DOWNTIME_OFF;
      await cluster.client.remove(name).catch(() => cluster.client.stop(name).then(() => cluster.client.remove(name)));
      for (const [variant, results] of rows) {
        const section = table(sizeMB, results, variant);
        console.log(section);
        sections.push(section);
        summary.push(`| ${sizeMB} MB |${values.compare ? ` ${variant} |` : ''} ${ms(percentile(results.map((r) => r.gapMs), 50))} | ${ms(percentile(results.map((r) => r.gapMs), 99))} | ${ms(percentile(results.flatMap((r) => (r.keptGapMs === undefined ? [] : [r.keptGapMs])), 50))} | ${ms(percentile(results.map((r) => r.recordedDowntimeMs), 50))} |`);
      }
    }
  } finally {
    await cluster.close();
  }
  const header = `# bench/downtime: the frozen window of a move, step by step\n\nMeasured ${new Date().toISOString()} on the runc pair (2 cores shared with other work), one run: \`CHIPMUNK_RUNC_PAIR_NET=${process.env.CHIPMUNK_RUNC_PAIR_NET ?? 2} npx tsx bench/downtime/run.ts --moves ${moves} --sizes ${values.sizes} --mode ${mode}${values.compare ? ` --compare ${values.compare}` : ''}\`.\n\n`;
  console.log(summary.join('\n'));
  await writeFile(values.out!, `${header}${summary.join('\n')}\n\n${sections.join('\n')}`);
  console.log(`written to ${values.out}`);
}

await main();
