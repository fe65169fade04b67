/**
 * bench/downtime: where the client-seen gap of a move goes, step by step, on the runc pair (no
 * local cluster needed: a controller and two agents in this process, bench/downtime/pair-cluster.ts).
 *
 * For each memory size, the stateful app (src/devtools/statefulapp, every page touched) moves N
 * times between the pair's two nodes (back and forth, lazy mode by default), measured and cut
 * into the pieces of its frozen window by bench/downtime/moves.ts. Prints p50 (and p99) per
 * piece. `--compare LEVER[,LEVER]` measures levers of src/shared/downtime-levers.ts side by side
 * (several at once: all with against all without).
 *
 * Usage (root, after `npm run setup`):
 *   CHIPMUNK_RUNC_PAIR_NET=3 npx tsx bench/downtime/run.ts [--moves 10] [--sizes 256,64] [--redis] [--mode lazy|copy] [--compare LEVER] [--out FILE]
 * `--redis` adds Redis with 400,000 keys of 1 KB (bench/downtime/redis.ts).
 * Writes bench/results/downtime-breakdown.md (or FILE).
 */
import { rm, writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { ensureImage, type TestImageName } from '../../src/devtools/images.js';
import { firstAnswer } from '../../src/devtools/downtime-probe.js';
import type { MigrationMode } from '../../src/shared/protocol.js';
import { CRIU_KERNEL_CACHE } from '../../src/agent/host/criu-kernel-cache.js';
import { APP_PORT, breakdownTable, moveOnce, ms, percentile, type MoveResult } from './moves.js';
import { startPairCluster } from './pair-cluster.js';
import { REDIS_COMMAND, REDIS_PORT, fillRedis, redisReady } from './redis.js';

const RESULTS = fileURLToPath(new URL('../results/downtime-breakdown.md', import.meta.url));
const MAX_MOVES = 30;
/** Issue 11's Redis case: 400,000 keys of 1 KB, about 420 MB of memory. */
const REDIS_KEYS = 400_000;
const REDIS_VALUE_BYTES = 1024;

const { values } = parseArgs({
  options: {
    moves: { type: 'string', default: '10' },
    sizes: { type: 'string', default: '256,64' },
    mode: { type: 'string', default: 'lazy' },
    out: { type: 'string', default: RESULTS },
    compare: { type: 'string' },
    redis: { type: 'boolean', default: false },
  },
});
const moves = Number(values.moves);
if (!Number.isInteger(moves) || moves < 1 || moves > MAX_MOVES) throw new Error(`--moves ${values.moves}: give 1 to ${MAX_MOVES}`);
const sizes = values.sizes ? values.sizes.split(',').map(Number) : [];
if (sizes.some((s) => !Number.isInteger(s) || s < 1 || s > 4096)) throw new Error(`--sizes ${values.sizes}: give sizes in MB, 1 to 4096, comma-separated`);
const mode = values.mode as MigrationMode;
/**
 * `--compare LEVER`: the moves take turns (two by two, so each way goes in both directions) with
 * the lever and without it (CHIPMUNK_DOWNTIME_OFF=LEVER, read where the lever acts), side by side
 * under the same load; each gets its table.
 */
const variants = values.compare ? [`with ${values.compare}`, `without ${values.compare}`] : [''];
if (mode !== 'lazy' && mode !== 'copy') throw new Error(`--mode ${values.mode}: lazy or copy`);

/** One container the bench moves: the stateful app with SIZE MB, or Redis with its data. */
interface Case {
  label: string;
  name: string;
  spec: { image: TestImageName; env?: Record<string, string>; command?: string[] };
  url(address: string): string;
  /** Resolves once it answers, with its data in place. */
  ready(address: string): Promise<void>;
}

const cases: Case[] = sizes.map((sizeMB) => ({
  label: `${sizeMB} MB`,
  name: `dt-${sizeMB}`,
  spec: { image: 'chipmunk/statefulapp', env: { MEMORY_MB: String(sizeMB) } },
  url: (address) => `http://${address}:${APP_PORT}/health`,
  ready: async (address) => void (await firstAnswer(`http://${address}:${APP_PORT}/health`, 120_000)),
}));
if (values.redis) {
  cases.push({
    label: `Redis ${REDIS_KEYS / 1000}k keys of ${REDIS_VALUE_BYTES} B`,
    name: 'dt-redis',
    spec: { image: 'chipmunk/redis', command: REDIS_COMMAND },
    url: (address) => `redis://${address}:${REDIS_PORT}`,
    ready: async (address) => {
      await redisReady(address, 60_000);
      await fillRedis(address, REDIS_KEYS, REDIS_VALUE_BYTES);
    },
  });
}

async function main(): Promise<void> {
  await ensureImage('chipmunk/statefulapp');
  if (values.redis) await ensureImage('chipmunk/redis');
  const cluster = await startPairCluster();
  const sections: string[] = [];
  const summary: string[] = values.compare
    ? ['| memory | lever | client-seen gap p50 | p99 | kept connection p50 | recorded downtime p50 |', '|---|---|---:|---:|---:|---:|']
    : ['| memory | client-seen gap p50 | p99 | kept connection p50 | recorded downtime p50 |', '|---|---:|---:|---:|---:|'];
  try {
    for (const c of cases) {
      const { name } = c;
      const view = await cluster.client.run({ spec: { name, ...c.spec }, node: cluster.source });
      if (!view.address) throw new Error(`${name} got no cluster address: the bench needs one`);
      await c.ready(view.address);
      const rows = new Map<string, MoveResult[]>(variants.map((v) => [v, []]));
      for (let i = 0; i < moves * variants.length; i++) {
        const to = i % 2 === 0 ? cluster.target : cluster.source;
        const variant = variants[Math.floor(i / 2) % variants.length]!;
        if (variant.startsWith('without ')) process.env.CHIPMUNK_DOWNTIME_OFF = values.compare;
        else delete process.env.CHIPMUNK_DOWNTIME_OFF;
        // Without the cache lever, no cache: every CRIU run of the move probes the kernel again.
        if (variant.startsWith('without ') && values.compare!.split(',').includes('kerndat-cache')) await rm(CRIU_KERNEL_CACHE, { force: true });
        const result = await moveOnce(cluster, name, view.address, to, mode, 1, c.url(view.address));
        rows.get(variant)!.push(result);
        console.error(`${c.label} ${variant} move ${i + 1}/${moves * variants.length} to ${to}: client-seen gap ${Math.round(result.gapMs)} ms, kept connection ${ms(result.keptGapMs)}${result.keptErrors.length ? ` (errors: ${result.keptErrors[0]})` : ''}`);
      }
      delete process.env.CHIPMUNK_DOWNTIME_OFF;
      await cluster.client.remove(name).catch(() => cluster.client.stop(name).then(() => cluster.client.remove(name)));
      for (const [variant, results] of rows) {
        const section = breakdownTable(`${c.label}, ${mode}${variant ? `, ${variant}` : ''}`, results);
        console.log(section);
        sections.push(section);
        summary.push(`| ${c.label} |${values.compare ? ` ${variant} |` : ''} ${ms(percentile(results.map((r) => r.gapMs), 50))} | ${ms(percentile(results.map((r) => r.gapMs), 99))} | ${ms(percentile(results.flatMap((r) => (r.keptGapMs === undefined ? [] : [r.keptGapMs])), 50))} | ${ms(percentile(results.map((r) => r.recordedDowntimeMs), 50))} |`);
      }
    }
  } finally {
    await cluster.close();
  }
  const header = `# bench/downtime: the frozen window of a move, step by step\n\nMeasured ${new Date().toISOString()} on the runc pair (2 cores shared with other work), one run: \`CHIPMUNK_RUNC_PAIR_NET=${process.env.CHIPMUNK_RUNC_PAIR_NET ?? 2} npx tsx bench/downtime/run.ts --moves ${moves} --sizes ${values.sizes} --mode ${mode}${values.redis ? ' --redis' : ''}${values.compare ? ` --compare ${values.compare}` : ''}\`.\n\n`;
  console.log(summary.join('\n'));
  await writeFile(values.out!, `${header}${summary.join('\n')}\n\n${sections.join('\n')}`);
  console.log(`written to ${values.out}`);
}

await main();
