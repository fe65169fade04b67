/**
 * bench/gateway/cost.ts: what one request through the gateway costs it, to judge a change to its
 * hot path side by side with the old code (bench/gateway's p99 alone is too noisy on a shared
 * machine): CPU and bytes allocated per request, scavenges and their pauses, next to requests/s
 * and latency. Same set-up as bench/gateway's loopback rows (stateful app, `chipmunk gateway`,
 * wrk at fixed concurrency after a warm-up); HAProxy's row too with --haproxy.
 *
 * --sites: one more load, with V8's sampling heap profiler in the gateway (heap-sampler.mjs):
 * the functions that allocate most, in bytes per request (sampled: roughly, and slower).
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

const HEAP_SAMPLER = fileURLToPath(new URL('./heap-sampler.mjs', import.meta.url));
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

async function allocationSites(scratch: string): Promise<string> {
  const profilePath = join(scratch, 'heap-profile.json');
  const gateway = await startGateway(join(scratch, 'gateway-sites'), GATEWAY_API_PORT, [{ name: 'bench', listenPort: GATEWAY_PORT, upstreamPort: APP_PORT }], {
    nodeOptions: ['--import', HEAP_SAMPLER],
    env: { CHIPMUNK_BENCH_HEAP_PROFILE: profilePath },
  });
  try {
    await wrk('warm-up', `http://127.0.0.1:${GATEWAY_PORT}/health`, { connections, seconds: WARMUP_SECONDS });
    process.kill(gateway.pid, 'SIGUSR2');
    await sleep(100);
    const row = await wrk('sampled', `http://127.0.0.1:${GATEWAY_PORT}/health`, { connections, seconds });
    process.kill(gateway.pid, 'SIGUSR2');
    let text: string | undefined;
    for (let i = 0; i < 100 && text === undefined; i++) {
      await sleep(100);
      text = await readFile(profilePath, 'utf8').catch(() => undefined);
    }
    if (text === undefined) throw new Error('the gateway wrote no heap profile');
    return sitesTable(JSON.parse(text) as { head: ProfileNode }, row.rps * seconds);
  } finally {
    await gateway.stop();
  }
}

interface ProfileNode {
  callFrame: { functionName: string; url: string; lineNumber: number };
  selfSize: number;
  children: ProfileNode[];
}

function sitesTable(profile: { head: ProfileNode }, requests: number): string {
  const bySite = new Map<string, number>();
  let total = 0;
  const walk = (node: ProfileNode): void => {
    const { functionName, url, lineNumber } = node.callFrame;
    const site = `${functionName || '(anonymous)'} ${url.replace(/^.*\/(src|node_modules)\//, '$1/')}:${lineNumber + 1}`;
    if (node.selfSize) bySite.set(site, (bySite.get(site) ?? 0) + node.selfSize);
    total += node.selfSize;
    for (const child of node.children) walk(child);
  };
  walk(profile.head);
  const lines = [`Allocation by function, sampled (${(total / requests).toFixed(0)} bytes per request in all):`, '', '| function | bytes per request |', '|---|---:|'];
  for (const [site, bytes] of [...bySite].sort((a, b) => b[1] - a[1]).slice(0, 25)) lines.push(`| ${site} | ${(bytes / requests).toFixed(0)} |`);
  return lines.join('\n');
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
  } finally {
    await app.stop();
    await removeTree(scratch);
  }
}

await main();
