/**
 * bench/gateway: what the gateway costs next to HAProxy, side by side in one run, and what
 * clients of a server that serves one connection at a time get through each.
 *
 * On loopback, each its own process: the stateful test app (node, GET /health), `chipmunk
 * gateway` and HAProxy (Debian's) in front of it, loaded with wrk at fixed concurrency for a
 * fixed time, `--runs` times (direct, gateway, haproxy in each run), after a warm-up of each. Aim (issue 9): the gateway
 * at >= 0.7x HAProxy's requests/s and <= 2x its p99, in every run.
 * Then Python's http.server (HTTP/1.1, one connection at a time; a fresh one per path) with 4
 * clients sending back to back: answers/s per client, direct, through the gateway and HAProxy.
 * With --cluster (needs the local cluster: only its owner runs this), also what a client sees
 * through the gateway while a container migrates (migration-latency.ts).
 *
 * Usage: npm run bench:gateway [-- --runs 3 --connections 16 --seconds 5 --cluster --compare-node-flags=--min-semi-space-size=16]
 * Prints a table and writes it to bench/results/gateway.md.
 */
import { mkdtemp, mkdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { removeTree } from '../../src/shared/remove-tree.js';
import { startHaproxy } from '../support/haproxy.js';
import { processCpu } from '../support/proc-cpu.js';
import { wrk, type LoadRow } from '../support/wrk.js';
import { perClientLoad, type PerClientRow } from './per-client.js';
import { startGateway, startOneConnectionServer, startStatefulApp } from './processes.js';

const RESULTS = fileURLToPath(new URL('../results/gateway.md', import.meta.url));
// Below the kernel's ephemeral range (32768-60999 by default): a client's own end of a connection
// there once took 38184 and the next run's route could not listen.
const APP_PORT = 24180;
const GATEWAY_API_PORT = 24181;
const GATEWAY_PORT = 24182;
const HAPROXY_PORT = 24183;
const GATEWAY_PY_PORT = 24184;
const HAPROXY_PY_PORT = 24185;
const FLAGGED_API_PORT = 24186;
const FLAGGED_PORT = 24187;
/** Aims of issue 9: gateway requests/s at least this share of HAProxy's, p99 at most this multiple. */
const AIM_THROUGHPUT = 0.7;
const AIM_P99 = 2;

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '3' },
    connections: { type: 'string', default: '16' },
    seconds: { type: 'string', default: '5' },
    cluster: { type: 'boolean', default: false },
    // A second gateway, started with these node flags besides the usual ones, measured in every
    // round next to the first: a flag's effect side by side, e.g. '--min-semi-space-size=16'.
    'compare-node-flags': { type: 'string' },
  },
});
const runs = Number(values.runs);
const connections = Number(values.connections);
const seconds = Number(values.seconds);
const flaggedNodeOptions = values['compare-node-flags']?.split(/\s+/).filter(Boolean);
const FLAGGED_PATH = flaggedNodeOptions ? `gateway ${flaggedNodeOptions.join(' ')}` : undefined;
const PY_CLIENTS = 4;
/** Load on each path before the measured runs, not reported: the gateway's JIT compiles its hot path (HAProxy gets the same). */
const WARMUP_SECONDS = 2;
const PY_TIMEOUT_MS = 2_000;

function progress(text: string): void {
  process.stderr.write(text);
}

interface ProxyRow extends LoadRow {
  /** CPU time (user, system) the proxy used per request, µs; none for direct. */
  cpuUs?: { user: number; system: number };
}

async function throughputRuns(scratch: string): Promise<ProxyRow[][]> {
  const app = await startStatefulApp(APP_PORT, join(scratch, 'app'));
  const gateway = await startGateway(join(scratch, 'gateway'), GATEWAY_API_PORT, [{ name: 'bench', listenPort: GATEWAY_PORT, upstreamPort: APP_PORT }]);
  const flagged = flaggedNodeOptions
    ? await startGateway(join(scratch, 'gateway-flagged'), FLAGGED_API_PORT, [{ name: 'bench', listenPort: FLAGGED_PORT, upstreamPort: APP_PORT }], { nodeOptions: flaggedNodeOptions })
    : undefined;
  const haproxy = await startHaproxy(scratch, [{ listenPort: HAPROXY_PORT, server: { address: '127.0.0.1', port: APP_PORT } }]);
  try {
    progress('warming up... ');
    for (const port of [APP_PORT, GATEWAY_PORT, ...(flagged ? [FLAGGED_PORT] : []), HAPROXY_PORT]) await wrk('warm-up', `http://127.0.0.1:${port}/health`, { connections, seconds: WARMUP_SECONDS });
    progress('done\n');
    const all: ProxyRow[][] = [];
    for (let run = 1; run <= runs; run++) {
      const rows: ProxyRow[] = [];
      const paths: Array<[string, number, number | undefined]> = [
        ['direct', APP_PORT, undefined],
        ['gateway', GATEWAY_PORT, gateway.pid],
        ...(flagged ? [[FLAGGED_PATH!, FLAGGED_PORT, flagged.pid] as [string, number, number]] : []),
        ['haproxy', HAPROXY_PORT, haproxy.pid],
      ];
      // Which gateway goes first alternates from round to round, so neither always meets the machine first.
      if (flagged && run % 2 === 0) [paths[1], paths[2]] = [paths[2]!, paths[1]!];
      for (const [name, port, pid] of paths) {
        progress(`run ${run}: ${name}... `);
        const before = pid === undefined ? undefined : await processCpu(pid);
        const row: ProxyRow = await wrk(name, `http://127.0.0.1:${port}/health`, { connections, seconds });
        if (pid !== undefined && before) {
          const after = await processCpu(pid);
          const requests = row.rps * seconds;
          row.cpuUs = { user: ((after.userMs - before.userMs) * 1000) / requests, system: ((after.systemMs - before.systemMs) * 1000) / requests };
        }
        rows.push(row);
        progress(`${row.rps.toFixed(0)} req/s\n`);
      }
      all.push(rows);
    }
    return all;
  } finally {
    await haproxy.stop();
    await flagged?.stop();
    await gateway.stop();
    await app.stop();
  }
}

/** A fresh one-connection server per path: a proxy's idle connection to it must not carry over to the next row. */
async function oneConnectionRows(scratch: string): Promise<PerClientRow[]> {
  const rows: PerClientRow[] = [];
  for (const path of ['direct', 'gateway', 'haproxy'] as const) {
    progress(`python http.server, ${PY_CLIENTS} clients, ${path}... `);
    const py = await startOneConnectionServer();
    let proxy: { stop(): Promise<void> } | undefined;
    try {
      let port = py.port;
      if (path === 'gateway') {
        proxy = await startGateway(join(scratch, 'gateway-py'), GATEWAY_API_PORT, [{ name: 'py', listenPort: GATEWAY_PY_PORT, upstreamPort: py.port }]);
        port = GATEWAY_PY_PORT;
      } else if (path === 'haproxy') {
        proxy = await startHaproxy(scratch, [{ listenPort: HAPROXY_PY_PORT, server: { address: '127.0.0.1', port: py.port } }]);
        port = HAPROXY_PY_PORT;
      }
      rows.push(await perClientLoad(path, `http://127.0.0.1:${port}`, PY_CLIENTS, seconds, PY_TIMEOUT_MS));
      progress(`${rows.at(-1)!.rates.map((r) => r.toFixed(0)).join(' / ')} answers/s\n`);
    } finally {
      await proxy?.stop();
      await py.stop();
    }
  }
  return rows;
}

function report(all: ProxyRow[][], py: PerClientRow[], migration: string | undefined): string {
  const lines = [
    `wrk, ${connections} connections, ${seconds} s each after a ${WARMUP_SECONDS} s warm-up of each path, GET /health of the stateful app (node) on 127.0.0.1; wrk, app, gateway and HAProxy (2.6, Debian's defaults) share one 2-core machine.`,
    '',
    '| run | path | requests/s | p50 | p99 | errors | proxy CPU per request (user + system) |',
    '|---|---|---:|---:|---:|---:|---:|',
  ];
  const verdicts: string[] = [];
  for (const [i, rows] of all.entries()) {
    for (const r of rows) {
      const cpu = r.cpuUs ? `${r.cpuUs.user.toFixed(1)} + ${r.cpuUs.system.toFixed(1)} µs` : '';
      lines.push(`| ${i + 1} | ${r.path} | ${r.rps.toFixed(0)} | ${r.p50Ms.toFixed(2)} ms | ${r.p99Ms.toFixed(2)} ms | ${r.errors} | ${cpu} |`);
    }
    const ha = rows.find((r) => r.path === 'haproxy')!;
    for (const gw of rows.filter((r) => r.path === 'gateway' || r.path === FLAGGED_PATH)) {
      const ratio = gw.rps / ha.rps;
      const p99 = gw.p99Ms / ha.p99Ms;
      const met = ratio >= AIM_THROUGHPUT && p99 <= AIM_P99;
      const which = FLAGGED_PATH ? ` ${gw.path}` : '';
      verdicts.push(`run ${i + 1}${which}: throughput ${ratio.toFixed(2)}x, p99 ${p99.toFixed(2)}x (${met ? 'aim met' : 'aim missed'})`);
    }
  }
  lines.push('', `gateway/haproxy (aim: >= ${AIM_THROUGHPUT}x requests/s, <= ${AIM_P99}x p99): ${verdicts.join('; ')}.`, '');
  lines.push(
    `Python's http.server (HTTP/1.1, one connection at a time), ${PY_CLIENTS} clients each sending GET back to back on its own keep-alive connection for ${seconds} s, a request failing after ${PY_TIMEOUT_MS} ms without an answer:`,
    '',
    '| path | answers/s per client | failed (time-outs) |',
    '|---|---|---:|',
    ...py.map((r) => `| ${r.path} | ${r.rates.map((x) => x.toFixed(0)).join(' / ')} | ${r.failures} |`),
  );
  if (migration) lines.push('', migration);
  return lines.join('\n');
}

async function main(): Promise<void> {
  const scratch = await mkdtemp(join(tmpdir(), 'chipmunk-bench-gw-'));
  try {
    await mkdir(join(scratch, 'app'));
    const all = await throughputRuns(scratch);
    const py = await oneConnectionRows(scratch);
    let migration: string | undefined;
    if (values.cluster) {
      const { latencyDuringMigrations } = await import('./migration-latency.js');
      migration = await latencyDuringMigrations();
    }
    const out = report(all, py, migration);
    console.log(out);
    await mkdir(join(RESULTS, '..'), { recursive: true });
    await writeFile(RESULTS, `# bench/gateway\n\nMeasured ${new Date().toISOString()}.\n\n${out}\n`);
  } finally {
    await removeTree(scratch);
  }
}

await main();
