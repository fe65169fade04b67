/**
 * bench/checkpoint-freeze: how long a checkpoint (protection's, every `everyMs`) keeps the
 * container frozen, and where that time goes, per way of copying its files
 * (RuncRuntimeOptions.checkpointFreeze: copy-in-freeze, pre-copy), on the runc pair.
 *
 * For each program (PostgreSQL with its own client writing rows between checkpoints; the stateful
 * app holding 256 MB, a file and a counter written between checkpoints) and each method: a fresh
 * pair, the program started, then N checkpoints one period apart, each discarded once taken.
 * Prints frozen ms p50/p99 and the p50 of each step: pause, files (copy inside the freeze), CRIU
 * dump, resume; and `pre-copy`, spent before the freeze while the program runs.
 *
 * Usage (root, after `npm run setup`; its own pair network):
 *   CHIPMUNK_RUNC_PAIR_NET=5 npm run bench:freeze -- [--checkpoints 10] [--period-ms 2000]
 *     [--only postgres|statefulapp] [--methods copy-in-freeze,pre-copy]
 * Writes bench/results/checkpoint-freeze.md.
 */
import { writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import type { CheckpointFreezeMethod, FrozenPhases } from '../../src/agent/runtime/types.js';
import { ensureImage, type TestImageName } from '../../src/devtools/images.js';
import { runUnchecked } from '../../src/shared/exec.js';
import type { ContainerSpec } from '../../src/shared/protocol.js';
import { COMPAT_PROGRAMS, waitUntilServing, writeKeys } from '../../test/support/compat-programs.js';
import { CRIU, RUNC_PAIR_NODES, makeRuncPair, prepareRuncPairs } from '../../test/support/runc-pair.js';

const RESULTS = fileURLToPath(new URL('../results/checkpoint-freeze.md', import.meta.url));
const HOST_PORT = 18190;
const METHODS: CheckpointFreezeMethod[] = ['copy-in-freeze', 'pre-copy'];

const { values } = parseArgs({
  options: {
    checkpoints: { type: 'string', default: '10' },
    'period-ms': { type: 'string', default: '2000' },
    only: { type: 'string' },
    methods: { type: 'string', default: METHODS.join(',') },
  },
});
const checkpoints = Number(values.checkpoints);
if (!Number.isInteger(checkpoints) || checkpoints < 2 || checkpoints > 100) throw new Error(`--checkpoints ${values.checkpoints}: give 2 to 100`);
const periodMs = Number(values['period-ms']);
if (!Number.isInteger(periodMs) || periodMs < 500) throw new Error(`--period-ms ${values['period-ms']}: give at least 500`);
const methods = values.methods!.split(',') as CheckpointFreezeMethod[];
for (const m of methods) if (!METHODS.includes(m)) throw new Error(`--methods: '${m}' is not one of ${METHODS.join(', ')}`);

const src = RUNC_PAIR_NODES[0];
const endpoint = { host: src.address, port: HOST_PORT };

/** A program: how to run it, and what it writes between two checkpoints (the i-th). */
interface Program {
  name: string;
  image: TestImageName;
  spec(name: string): ContainerSpec;
  ready(): Promise<void>;
  write(i: number): Promise<void>;
}

const postgres: Program = {
  name: 'postgres',
  image: COMPAT_PROGRAMS.postgres.image,
  spec: (name) => ({ name, image: COMPAT_PROGRAMS.postgres.image, command: [], env: {}, ports: [{ hostPort: HOST_PORT, containerPort: COMPAT_PROGRAMS.postgres.containerPort, protocol: 'tcp' }], memoryBytes: 0 }),
  ready: async () => void (await waitUntilServing(COMPAT_PROGRAMS.postgres, endpoint, 60_000)),
  write: (i) => writeKeys(COMPAT_PROGRAMS.postgres, endpoint, i * 20 + 1, i * 20 + 20),
};

const statefulapp: Program = {
  name: 'statefulapp 256 MB',
  image: 'chipmunk/statefulapp',
  spec: (name) => ({ name, image: 'chipmunk/statefulapp', command: [], env: { MEMORY_MB: '256' }, ports: [{ hostPort: HOST_PORT, containerPort: 8080, protocol: 'tcp' }], memoryBytes: 0 }),
  async ready() {
    const deadline = Date.now() + 60_000;
    while ((await http('GET', '/health').catch(() => 0)) !== 200) {
      if (Date.now() > deadline) throw new Error('the stateful app did not answer within 60 s');
      await sleep(200);
    }
  },
  async write(i) {
    await http('POST', '/increment');
    await http('POST', `/files?name=f${i % 5}&content=round${i}`);
  },
};

async function http(method: string, path: string): Promise<number> {
  const res = await fetch(`http://${endpoint.host}:${endpoint.port}${path}`, { method, signal: AbortSignal.timeout(10_000) });
  await res.arrayBuffer();
  if (res.status >= 400) throw new Error(`${method} ${path}: HTTP ${res.status}`);
  return res.status;
}

interface Sample {
  frozenMs: number;
  phases: FrozenPhases;
  filesBytes: number;
  imageBytes: number;
}

async function measure(program: Program, method: CheckpointFreezeMethod, log: (l: string) => void): Promise<Sample[]> {
  const pair = await makeRuncPair({ checkpointFreeze: method });
  const samples: Sample[] = [];
  try {
    const c = await pair.source.run(program.spec('freeze'));
    await program.ready();
    for (let i = 0; i < checkpoints; i++) {
      const began = Date.now();
      await program.write(i);
      await sleep(Math.max(0, periodMs - (Date.now() - began)));
      const ckpt = await pair.source.checkpoint(c.name, `freeze-${i}`);
      await pair.source.discardCheckpoint(`freeze-${i}`);
      samples.push({ frozenMs: ckpt.frozenMs, phases: ckpt.frozenPhases, filesBytes: ckpt.filesBytes, imageBytes: ckpt.imageBytes });
    }
    log(`${program.name} ${method}: frozen ${samples.map((s) => s.frozenMs).join(' ')} ms`);
  } finally {
    await pair.cleanup();
  }
  return samples;
}

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)] ?? 0;
}

const p50 = (xs: number[]) => quantile(xs, 0.5);
const mb = (b: number) => (b / 1024 ** 2).toFixed(1);

function row(program: string, method: string, s: Sample[]): string {
  const phase = (k: keyof FrozenPhases) => p50(s.map((x) => x.phases[k]));
  const frozen = s.map((x) => x.frozenMs);
  return `| ${program} | ${method} | ${p50(frozen)} | ${quantile(frozen, 0.99)} | ${phase('pauseMs')} | ${phase('filesMs')} | ${phase('dumpMs')} | ${phase('resumeMs')} | ${phase('preCopyMs')} | ${mb(p50(s.map((x) => x.filesBytes)))} | ${mb(p50(s.map((x) => x.imageBytes)))} |`;
}

async function main(): Promise<void> {
  const started = Date.now();
  const log = (line: string) => process.stderr.write(`[${((Date.now() - started) / 1000).toFixed(0)} s] ${line}\n`);
  const programs = [postgres, statefulapp].filter((p) => !values.only || new RegExp(values.only).test(p.name));
  for (const p of programs) await ensureImage(p.image);
  await prepareRuncPairs();
  const dirty = await runUnchecked(CRIU, ['check', '--feature', 'mem_dirty_track']);
  const rows: string[] = [];
  for (const program of programs) {
    for (const method of methods) rows.push(row(program.name, method, await measure(program, method, log)));
  }
  const [load1] = (await import('node:os')).loadavg();
  const table = [
    `${checkpoints} checkpoints ${periodMs} ms apart per row, runc pair, load average ${load1!.toFixed(1)} on this machine at the end; ms unless said.`,
    `CRIU soft-dirty tracking (pre-dump, incremental memory): ${dirty.code === 0 ? 'supported' : 'NOT supported by this kernel (criu check --feature mem_dirty_track)'}.`,
    '',
    '| program | method | frozen p50 | frozen p99 | pause | files | dump | resume | pre-copy (running) | files MB | images MB |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
    ...rows,
  ].join('\n');
  process.stdout.write(`${table}\n`);
  await writeFile(RESULTS, `# bench/checkpoint-freeze\n\n${table}\n`);
}

main().catch((err) => {
  process.stderr.write(`${(err as Error).stack ?? err}\n`);
  process.exit(1);
});
