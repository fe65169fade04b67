/**
 * bench/migration: what moving a container costs, side by side in one run, on the runc pair (a
 * controller and two agents in this process over the pair's two test hosts,
 * bench/downtime/pair-cluster.ts; no local cluster).
 *
 * For each memory size (the stateful app touches every page of it), three ways to move it:
 *   lazy   chipmunk, post-copy (CRIU page server + userfaultfd), N moves back and forth
 *   copy   chipmunk, stop-and-copy, N moves back and forth
 *   podman `podman container checkpoint --export`, copy the archive, `podman container restore
 *          --import` (Podman's own network, on this machine: no second host; --podman-moves runs)
 * Downtime is what clients see (bench/downtime/moves.ts): new connections to the container's
 * address about every millisecond, last answer before the move to the first after it; p50 and
 * p99 over the moves. "connections kept": one client connection sending a request every 10 ms
 * across each move, kept (the same connection, no error) or reset. Then, per size, the frozen
 * window of the lazy moves piece by piece. Memory is checked intact after the last move.
 *
 * Usage (root, after `npm run setup`; 4 GB needs about 9 GB free):
 *   CHIPMUNK_RUNC_PAIR_NET=3 npm run bench:migration -- [--sizes 64,256,1024,4096] [--modes lazy,copy,podman]
 *     [--moves 10] [--copy-moves N (default --moves)] [--large-copy-moves 3 (copy, 2 GB and more)] [--podman-moves 1] [--out FILE]
 * Prints the tables and writes them to bench/results/migration.md (or FILE).
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { request } from 'undici';
import { firstAnswer } from '../../src/devtools/downtime-probe.js';
import { ensureImage } from '../../src/devtools/images.js';
import { run } from '../../src/shared/exec.js';
import { APP_PORT, breakdownTable, moveOnce, ms, percentile, type MoveResult } from '../downtime/moves.js';
import { startPairCluster, type PairCluster } from '../downtime/pair-cluster.js';
import { podmanMoves, type PodmanMove } from './podman.js';

const RESULTS = fileURLToPath(new URL('../results/migration.md', import.meta.url));
/** The issue's kept connection: a request every 10 ms. */
const KEPT_INTERVAL_MS = 10;
const MAX_MOVES = 30;

type Way = 'lazy' | 'copy' | 'podman';

const { values } = parseArgs({
  options: {
    sizes: { type: 'string', default: '64,256,1024,4096' },
    modes: { type: 'string', default: 'lazy,copy,podman' },
    moves: { type: 'string', default: '10' },
    'copy-moves': { type: 'string' },
    'large-copy-moves': { type: 'string', default: '3' },
    'podman-moves': { type: 'string', default: '1' },
    out: { type: 'string', default: RESULTS },
  },
});
const count = (flag: string, value: string | undefined) => {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > MAX_MOVES) throw new Error(`--${flag} ${value}: give 1 to ${MAX_MOVES}`);
  return n;
};
const sizes = values.sizes!.split(',').map(Number);
if (sizes.some((s) => !Number.isInteger(s) || s < 1 || s > 4096)) throw new Error(`--sizes ${values.sizes}: give sizes in MB, 1 to 4096, comma-separated`);
const ways = values.modes!.split(',') as Way[];
if (ways.some((w) => !['lazy', 'copy', 'podman'].includes(w))) throw new Error(`--modes ${values.modes}: lazy, copy and/or podman, comma-separated`);
const movesOf: Record<Way, number> = {
  lazy: count('moves', values.moves),
  copy: count('copy-moves', values['copy-moves'] ?? values.moves),
  podman: count('podman-moves', values['podman-moves']),
};
/** A copy move of 2 GB or more takes a minute or more (all of its memory is dumped, sent and read back): fewer of them. */
const LARGE_MB = 2048;
const largeCopyMoves = count('large-copy-moves', values['large-copy-moves']);
const movesFor = (way: Way, sizeMB: number) => (way === 'copy' && sizeMB >= LARGE_MB ? Math.min(largeCopyMoves, movesOf.copy) : movesOf[way]);

interface Row {
  sizeMB: number;
  way: Way;
  downtimes: number[];
  /** chipmunk's moves: how many kept the client's connection. */
  kept?: number;
  totals: number[];
  frozen: number[];
  bytes: number[];
  note?: string;
  moves?: MoveResult[];
}

/** N moves of one chipmunk way, back and forth between the pair's nodes; memory checked after the last. */
async function chipmunkWay(cluster: PairCluster, sizeMB: number, mode: 'lazy' | 'copy'): Promise<Row> {
  const name = `bm-${mode}-${sizeMB}`;
  const view = await cluster.client.run({ spec: { name, image: 'chipmunk/statefulapp', env: { MEMORY_MB: String(sizeMB) } }, node: cluster.source });
  try {
    if (!view.address) throw new Error(`${name} got no cluster address: the bench needs one`);
    await firstAnswer(`http://${view.address}:${APP_PORT}/health`, 300_000);
    const moves: MoveResult[] = [];
    const total = movesFor(mode, sizeMB);
    for (let i = 0; i < total; i++) {
      const to = i % 2 === 0 ? cluster.target : cluster.source;
      const move = await moveOnce(cluster, name, view.address, to, mode, KEPT_INTERVAL_MS);
      moves.push(move);
      process.stderr.write(`  ${sizeMB} MB ${mode} move ${i + 1}/${total}: downtime ${Math.round(move.gapMs)} ms, connection ${move.connectionKept ? 'kept' : 'RESET'}\n`);
    }
    const verify = (await (await request(`http://${view.address}:${APP_PORT}/verify-memory`, { bodyTimeout: 300_000, headersTimeout: 300_000 })).body.json()) as { ok: boolean };
    return {
      sizeMB,
      way: mode,
      downtimes: moves.map((m) => m.gapMs),
      kept: moves.filter((m) => m.connectionKept).length,
      totals: moves.map((m) => m.totalMs),
      frozen: moves.map((m) => m.recordedDowntimeMs),
      bytes: moves.map((m) => m.bytesTransferred),
      ...(verify.ok ? {} : { note: 'MEMORY CORRUPTED' }),
      moves,
    };
  } finally {
    await cluster.client.remove(name).catch(() => cluster.client.stop(name).then(() => cluster.client.remove(name)).catch(() => undefined));
  }
}

function podmanRow(sizeMB: number, runs: PodmanMove[]): Row {
  return {
    sizeMB,
    way: 'podman',
    downtimes: runs.flatMap((r) => (r.downtimeMs === undefined ? [] : [r.downtimeMs])),
    totals: runs.map((r) => r.totalMs),
    frozen: [],
    bytes: runs.map((r) => r.bytes),
  };
}

const p = (values: number[], pct: number) => (values.length ? ms(percentile(values, pct)) : '-');

function table(rows: Row[]): string {
  const lines = [
    '| memory | way | moves | client-seen downtime p50 | p99 | connections kept | total p50 | frozen (agents) p50 | moved p50 |',
    '|---:|---|---:|---:|---:|---|---:|---:|---:|',
  ];
  for (const r of rows) {
    const kept = r.kept === undefined ? 'reset (new address)' : r.kept === r.downtimes.length ? `kept (${r.kept} of ${r.downtimes.length})` : `reset in ${r.downtimes.length - r.kept} of ${r.downtimes.length}`;
    const moved = r.bytes.length ? `${(percentile(r.bytes, 50) / 2 ** 20).toFixed(1)} MiB` : '-';
    lines.push(`| ${r.sizeMB} MB | ${r.way} | ${r.downtimes.length} | ${p(r.downtimes, 50)} | ${p(r.downtimes, 99)} | ${kept} | ${p(r.totals, 50)} | ${p(r.frozen, 50)} | ${moved}${r.note ? ` ${r.note}` : ''} |`);
  }
  const lost = rows.flatMap((r) => (r.moves ?? []).flatMap((m, i) => (m.connectionKept ? [] : [`${r.sizeMB} MB ${r.way} move ${i + 1}: ${m.connectionLost} (its gap ${ms(m.keptGapMs)}, new connections' ${ms(m.gapMs)})`])));
  if (lost.length) lines.push('', `Connections not kept: ${lost.join('; ')}.`);
  for (const size of sizes) {
    const lazy = rows.find((r) => r.sizeMB === size && r.way === 'lazy');
    const pod = rows.find((r) => r.sizeMB === size && r.way === 'podman');
    if (lazy?.downtimes.length && pod?.downtimes.length) {
      lines.push('', `${size} MB: lazy downtime p50 is ${(percentile(lazy.downtimes, 50) / percentile(pod.downtimes, 50)).toFixed(2)}x the Podman way's.`);
    }
  }
  return lines.join('\n');
}

async function main(): Promise<void> {
  await ensureImage('chipmunk/statefulapp');
  const rows: Row[] = [];
  const chipmunkWays = ways.filter((w): w is 'lazy' | 'copy' => w !== 'podman');
  const cluster = chipmunkWays.length ? await startPairCluster() : undefined;
  try {
    for (const size of sizes) {
      for (const way of ways) {
        process.stderr.write(`${size} MB, ${way}:\n`);
        const row = way === 'podman' ? podmanRow(size, await podmanMoves(size, movesFor('podman', size))) : await chipmunkWay(cluster!, size, way);
        rows.push(row);
        process.stderr.write(`${size} MB, ${way}: downtime p50 ${p(row.downtimes, 50)}, p99 ${p(row.downtimes, 99)}\n`);
      }
    }
  } finally {
    await cluster?.close();
  }
  const breakdowns = rows.filter((r) => r.way === 'lazy' && r.moves).map((r) => breakdownTable(`${r.sizeMB} MB, lazy: the frozen window`, r.moves!));
  const out = `${table(rows)}\n\n## Where the lazy downtime goes\n\n${breakdowns.join('\n')}`;
  console.log(out);
  const header =
    `# bench/migration\n\nMeasured ${new Date().toISOString()} on the runc pair (${(await run('nproc', [])).stdout.trim()} cores shared with other work), one run: ` +
    `\`CHIPMUNK_RUNC_PAIR_NET=${process.env.CHIPMUNK_RUNC_PAIR_NET ?? 2} npm run bench:migration -- --sizes ${values.sizes} --modes ${values.modes} --moves ${movesOf.lazy} --copy-moves ${movesOf.copy} --large-copy-moves ${largeCopyMoves} --podman-moves ${movesOf.podman}\`.\n\n`;
  await mkdir(dirname(values.out!), { recursive: true });
  await writeFile(values.out!, `${header}${out}\n`);
  console.error(`written to ${values.out}`);
}

await main();
