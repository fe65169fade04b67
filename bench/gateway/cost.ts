/**
 * bench/gateway/cost.ts: what one request through the gateway costs it, to judge a change to its
 * hot path side by side with the old code (bench/gateway's p99 alone is too noisy on a shared
 * machine): CPU and bytes allocated per request, scavenges and their pauses, next to requests/s
 * and latency. Same set-up as bench/gateway's loopback rows (stateful app, `chipmunk gateway`,
 * wrk at fixed concurrency after a warm-up); HAProxy's row too with --haproxy.
 *
 * --sites: one more load, with V8's sampling heap profiler in the gateway (profiler.mjs): the
 * functions that allocate most, in bytes per request (sampled: roughly, and slower).
 * --cpu-sites: the same with V8's CPU profiler: the functions that take most CPU themselves.
 *
 * --base DIR: another checkout's gateway too (e.g. a worktree of the commit before a change,
 * with node_modules), loaded in turn with this one's, run after run.
 *
 * Usage: npx tsx bench/gateway/cost.ts [--runs 3 --seconds 5 --connections 16 --haproxy --sites --base DIR]
 * Prints tables; writes nothing (--gc-log FILE: node's GC trace lines during the loads).
 */
import { mkdtemp, mkdir, readFile, writeFile } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { removeTree } from '../../src/shared/remove-tree.js';
import { startHaproxy } from '../support/haproxy.js';
import { processCpu } from '../support/proc-cpu.js';
import { wrk, type LoadRow } from '../support/wrk.js';
import { startGateway, startStatefulApp } from './processes.js';

const PROFILER = fileURLToPath(new URL('./profiler.mjs', import.meta.url));
const APP_PORT = 38190;
const GATEWAY_API_PORT = 38191;
const GATEWAY_PORT = 38192;
const HAPROXY_PORT = 38193;
const BASE_API_PORT = 38194;
const BASE_PORT = 38195;
const WARMUP_SECONDS = 2;

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '3' },
    connections: { type: 'string', default: '16' },
    seconds: { type: 'string', default: '5' },
    haproxy: { type: 'boolean', default: false },
    sites: { type: 'boolean', default: false },
    'cpu-sites': { type: 'boolean', default: false },
    'gc-log': { type: 'string' },
    base: { type: 'string' },
  },
});
const runs = Number(values.runs);
const connections = Number(values.connections);
const seconds = Number(values.seconds);

/** What node's --trace-gc-nvp printed while a load ran. */
class GcTally {
  counting = false;
  scavenges = 0;
  fullGcs = 0;
  allocated = 0;
  pauses: number[] = [];

  /** Every line printed while counting, for a closer look (--gc-log). */
  readonly lines: string[] = [];

  line(text: string): void {
    if (!this.counting) return;
    if (values['gc-log']) this.lines.push(text);
    const kind = /\bgc=(\S+)/.exec(text)?.[1];
    if (!kind) return;
    if (kind === 's') this.scavenges++;
    else this.fullGcs++;
    this.allocated += Number(/\ballocated=(\d+)/.exec(text)?.[1] ?? 0);
    this.pauses.push(Number(/\bpause=([\d.]+)/.exec(text)?.[1] ?? 0));
  }

  reset(): void {
    this.scavenges = 0;
    this.fullGcs = 0;
    this.allocated = 0;
    this.pauses = [];
  }
}

interface CostRow extends LoadRow {
  load: number;
  cpuUs?: { user: number; system: number };
  gc?: { bytesPerRequest: number; scavengesPer10k: number; meanPauseMs: number; maxPauseMs: number; gcShare: number; fullGcs: number };
}

async function measured(name: string, port: number, pid: number | undefined, gc: GcTally | undefined): Promise<CostRow> {
  const load = loadavg()[0];
  const before = pid === undefined ? undefined : await processCpu(pid);
  gc?.reset();
  if (gc) gc.counting = true;
  const row: CostRow = { ...(await wrk(name, `http://127.0.0.1:${port}/health`, { connections, seconds })), load };
  if (gc) gc.counting = false;
  const requests = row.rps * seconds;
  if (pid !== undefined && before) {
    const after = await processCpu(pid);
    row.cpuUs = { user: ((after.userMs - before.userMs) * 1000) / requests, system: ((after.systemMs - before.systemMs) * 1000) / requests };
  }
  if (gc) {
    const paused = gc.pauses.reduce((a, b) => a + b, 0);
    row.gc = {
      // A scavenge reports what was allocated since the last GC: the new space's own, not what the last one left running.
      bytesPerRequest: gc.allocated / requests,
      scavengesPer10k: (gc.scavenges * 10_000) / requests,
      meanPauseMs: gc.pauses.length ? paused / gc.pauses.length : 0,
      maxPauseMs: Math.max(0, ...gc.pauses),
      gcShare: paused / (seconds * 1000),
      fullGcs: gc.fullGcs,
    };
  }
  return row;
}

/** One load with a profiler in the gateway; the profile of the measured part, and the requests it served. */
async function profiled(scratch: string, kind: 'heap' | 'cpu'): Promise<{ profile: unknown; requests: number }> {
  const profilePath = join(scratch, `${kind}-profile.json`);
  const gateway = await startGateway(join(scratch, `gateway-${kind}`), GATEWAY_API_PORT, [{ name: 'bench', listenPort: GATEWAY_PORT, upstreamPort: APP_PORT }], {
    nodeOptions: ['--import', PROFILER],
    env: { CHIPMUNK_BENCH_PROFILE: profilePath, CHIPMUNK_BENCH_PROFILE_KIND: kind },
  });
  try {
    await wrk('warm-up', `http://127.0.0.1:${GATEWAY_PORT}/health`, { connections, seconds: WARMUP_SECONDS });
    process.kill(gateway.pid, 'SIGUSR2');
    await sleep(100);
    const row = await wrk('profiled', `http://127.0.0.1:${GATEWAY_PORT}/health`, { connections, seconds });
    process.kill(gateway.pid, 'SIGUSR2');
    for (let i = 0; i < 100; i++) {
      await sleep(100);
      const text = await readFile(profilePath, 'utf8').catch(() => undefined);
      if (text !== undefined) return { profile: JSON.parse(text), requests: row.rps * seconds };
    }
    throw new Error('the gateway wrote no profile');
  } finally {
    await gateway.stop();
  }
}

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
  columnNumber: number;
}

/** A function's name and where it is (tsx compiles a file to few lines: the column tells functions of one name apart). */
function siteName({ functionName, url, lineNumber, columnNumber }: CallFrame): string {
  return `${functionName || '(anonymous)'} ${url.replace(/^.*\/(src|node_modules)\//, '$1/')}:${lineNumber + 1}:${columnNumber + 1}`;
}

function topTable(title: string, unit: string, bySite: Map<string, number>, divisor: number, total: number): string {
  const lines = [`${title} (${(total / divisor).toFixed(unit === 'µs' ? 1 : 0)} ${unit} per request in all):`, '', `| function | ${unit} per request |`, '|---|---:|'];
  for (const [site, amount] of [...bySite].sort((a, b) => b[1] - a[1]).slice(0, 30)) lines.push(`| ${site} | ${(amount / divisor).toFixed(unit === 'µs' ? 2 : 0)} |`);
  return lines.join('\n');
}

interface HeapNode {
  callFrame: CallFrame;
  selfSize: number;
  children: HeapNode[];
}

async function allocationSites(scratch: string): Promise<string> {
  const { profile, requests } = await profiled(scratch, 'heap');
  const bySite = new Map<string, number>();
  /** Per site, bytes by the caller that allocated them through it (a builtin's own name says little). */
  const byCaller = new Map<string, Map<string, number>>();
  let total = 0;
  const walk = (node: HeapNode, caller: string): void => {
    const site = siteName(node.callFrame);
    if (node.selfSize) {
      bySite.set(site, (bySite.get(site) ?? 0) + node.selfSize);
      const callers = byCaller.get(site) ?? new Map<string, number>();
      byCaller.set(site, callers.set(caller, (callers.get(caller) ?? 0) + node.selfSize));
    }
    total += node.selfSize;
    for (const child of node.children) walk(child, site);
  };
  walk((profile as { head: HeapNode }).head, '');
  const named = new Map<string, number>();
  for (const [site, bytes] of bySite) {
    const [caller] = [...(byCaller.get(site) as Map<string, number>)].sort((a, b) => b[1] - a[1])[0];
    named.set(`${site} (mostly from ${caller || 'the event loop'})`, bytes);
  }
  return topTable('Allocation by function, sampled', 'bytes', named, requests, total);
}

async function cpuSites(scratch: string): Promise<string> {
  const { profile, requests } = await profiled(scratch, 'cpu');
  const { nodes, samples, timeDeltas } = profile as { nodes: Array<{ id: number; callFrame: CallFrame }>; samples: number[]; timeDeltas: number[] };
  const site = new Map(nodes.map((n) => [n.id, siteName(n.callFrame)]));
  const bySite = new Map<string, number>();
  let busy = 0;
  // A sample stands for the time until the next one (µs): samples come late on a loaded machine.
  for (let i = 0; i < samples.length - 1; i++) {
    const name = site.get(samples[i]) as string;
    if (name.startsWith('(idle)')) continue;
    busy += timeDeltas[i + 1];
    bySite.set(name, (bySite.get(name) ?? 0) + timeDeltas[i + 1]);
  }
  return topTable("Main thread's time by function, sampled (not idle; a system call's time counts as its caller's)", 'µs', bySite, requests, busy);
}

function table(rows: CostRow[]): string {
  const lines = [
    '| path | load avg | requests/s | p50 | p99 | CPU per request (user + system) | bytes allocated per request | scavenges per 10k requests | scavenge pause mean / max | GC share of time |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ];
  for (const r of rows) {
    const cpu = r.cpuUs ? `${r.cpuUs.user.toFixed(1)} + ${r.cpuUs.system.toFixed(1)} µs` : '';
    const gc = r.gc
      ? `${r.gc.bytesPerRequest.toFixed(0)} | ${r.gc.scavengesPer10k.toFixed(2)} | ${r.gc.meanPauseMs.toFixed(2)} / ${r.gc.maxPauseMs.toFixed(2)} ms | ${(r.gc.gcShare * 100).toFixed(1)}%${r.gc.fullGcs ? ` (${r.gc.fullGcs} full GCs)` : ''}`
      : ' | | | ';
    lines.push(`| ${r.path} | ${r.load.toFixed(1)} | ${r.rps.toFixed(0)} | ${r.p50Ms.toFixed(2)} ms | ${r.p99Ms.toFixed(2)} ms | ${cpu} | ${gc} |`);
  }
  return lines.join('\n');
}

async function main(): Promise<void> {
  const scratch = await mkdtemp(join(tmpdir(), 'chipmunk-bench-gw-cost-'));
  await mkdir(join(scratch, 'app'));
  const app = await startStatefulApp(APP_PORT, join(scratch, 'app'));
  const route = (listenPort: number) => [{ name: 'bench', listenPort, upstreamPort: APP_PORT }];
  const gateways: Array<{ label: string; port: number; pid: number; gc: GcTally; stop(): Promise<void> }> = [];
  const haproxy = values.haproxy ? await startHaproxy(scratch, [{ listenPort: HAPROXY_PORT, server: { address: '127.0.0.1', port: APP_PORT } }]) : undefined;
  try {
    for (const [label, port, apiPort, chipmunk] of [
      ['this', GATEWAY_PORT, GATEWAY_API_PORT, undefined],
      ...(values.base ? [['base', BASE_PORT, BASE_API_PORT, join(values.base, 'bin', 'chipmunk.mjs')] as const] : []),
    ] as const) {
      const gc = new GcTally();
      const running = await startGateway(join(scratch, `gateway-${label}`), apiPort, route(port), { nodeOptions: ['--trace-gc-nvp'], onStdoutLine: (line) => gc.line(line), chipmunk });
      gateways.push({ label, port, gc, ...running });
    }
    for (const g of gateways) await wrk('warm-up', `http://127.0.0.1:${g.port}/health`, { connections, seconds: WARMUP_SECONDS });
    if (haproxy) await wrk('warm-up', `http://127.0.0.1:${HAPROXY_PORT}/health`, { connections, seconds: WARMUP_SECONDS });
    const rows: CostRow[] = [];
    for (let run = 1; run <= runs; run++) {
      for (const g of gateways) rows.push(await measured(`${g.label} ${run}`, g.port, g.pid, g.gc));
      if (haproxy) rows.push(await measured(`haproxy ${run}`, HAPROXY_PORT, haproxy.pid, undefined));
      process.stderr.write(`run ${run} done\n`);
    }
    console.log(table(rows));
    if (values['gc-log']) await writeFile(values['gc-log'], `${gateways[0].gc.lines.join('\n')}\n`);
  } finally {
    await haproxy?.stop();
    for (const g of gateways) await g.stop();
  }
  try {
    if (values.sites) console.log(`\n${await allocationSites(scratch)}`);
    if (values['cpu-sites']) console.log(`\n${await cpuSites(scratch)}`);
  } finally {
    await app.stop();
    await removeTree(scratch);
  }
}

await main();
