/**
 * bench/gateway: what the gateway costs, side by side in one run, and what a client sees
 * through it while the container moves.
 *
 * On a 2-node local cluster, the stateful app on node1 (GET /health), loaded with wrk at fixed
 * concurrency for a fixed time each:
 *   direct   the container's published port on its node
 *   gateway  chipmunk's gateway (127.0.0.1)
 *   haproxy  HAProxy (Debian's) as a plain HTTP reverse proxy in front of the same port
 * Then, with two clients sending POST /increment through the gateway, the container migrates
 * (lazy) and back (copy): request latency max and p99 during that, and failures.
 *
 * Usage: npm run bench:gateway [-- --connections 16 --seconds 5]
 * Prints a table and writes it to bench/results/gateway.md.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, mkdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Agent, request } from 'undici';
import { ensureTestImages } from '../../src/devtools/images.js';
import { runChipmunk } from '../../src/devtools/run-chipmunk.js';
import { removeTree } from '../../src/shared/remove-tree.js';
import { wrk, type LoadRow } from '../support/wrk.js';

const RESULTS = fileURLToPath(new URL('../results/gateway.md', import.meta.url));
const NODE1 = '198.18.0.11';
const GATEWAY_PORT = 28080;
const HAPROXY_PORT = 38080;

const { values } = parseArgs({ options: { connections: { type: 'string', default: '16' }, seconds: { type: 'string', default: '5' } } });
const connections = Number(values.connections);
const seconds = Number(values.seconds);

async function startHaproxy(dir: string): Promise<() => void> {
  const cfg = join(dir, 'haproxy.cfg');
  await writeFile(
    cfg,
    [
      'global',
      '  maxconn 4096',
      'defaults',
      '  mode http',
      '  option http-keep-alive',
      '  timeout connect 5s',
      '  timeout client 60s',
      '  timeout server 60s',
      'frontend bench',
      `  bind 127.0.0.1:${HAPROXY_PORT}`,
      '  default_backend app',
      'backend app',
      `  server node1 ${NODE1}:8080`,
      '',
    ].join('\n'),
  );
  const child = spawn('haproxy', ['-db', '-f', cfg], { stdio: 'ignore' });
  await new Promise((r) => setTimeout(r, 500));
  if (child.exitCode !== null) throw new Error(`haproxy exited at start (config ${cfg})`);
  return () => child.kill('SIGTERM');
}

async function latencyDuringMigrations(): Promise<{ requests: number; failed: number; p99Ms: number; maxMs: number }> {
  const agent = new Agent({ keepAliveTimeout: 10_000 });
  const latencies: number[] = [];
  let failed = 0;
  let stop = false;
  const loops = [0, 1].map(async () => {
    while (!stop) {
      const t = performance.now();
      try {
        const res = await request(`http://127.0.0.1:${GATEWAY_PORT}/increment`, { method: 'POST', dispatcher: agent, headersTimeout: 60_000 });
        await res.body.dump();
        if (res.statusCode !== 200) failed++;
      } catch {
        failed++;
      }
      latencies.push(performance.now() - t);
    }
  });
  await new Promise((r) => setTimeout(r, 500));
  await runChipmunk(['migrate', 'bench', '--to', 'node2', '--mode', 'lazy']);
  await new Promise((r) => setTimeout(r, 500));
  await runChipmunk(['migrate', 'bench', '--to', 'node1', '--mode', 'copy']);
  await new Promise((r) => setTimeout(r, 500));
  stop = true;
  await Promise.all(loops);
  await agent.close();
  latencies.sort((a, b) => a - b);
  return {
    requests: latencies.length,
    failed,
    p99Ms: latencies[Math.floor(latencies.length * 0.99)] ?? 0,
    maxMs: latencies.at(-1) ?? 0,
  };
}

async function main(): Promise<void> {
  await ensureTestImages();
  const scratch = await mkdtemp(join(tmpdir(), 'chipmunk-bench-gw-'));
  let stopHaproxy: (() => void) | undefined;
  try {
    await runChipmunk(['cluster', 'down']).catch(() => undefined);
    await runChipmunk(['cluster', 'up', '--nodes', '2']);
    await runChipmunk(['run', '--name', 'bench', '--node', 'node1', '-p', '8080:8080', '-e', 'MEMORY_MB=32', 'chipmunk/statefulapp']);
    await runChipmunk(['expose', 'bench', '--port', '8080', '--listen', String(GATEWAY_PORT)]);
    stopHaproxy = await startHaproxy(scratch);
    await new Promise((r) => setTimeout(r, 1_000));
    const rows: LoadRow[] = [];
    for (const [name, url] of [
      ['direct', `http://${NODE1}:8080/health`],
      ['gateway', `http://127.0.0.1:${GATEWAY_PORT}/health`],
      ['haproxy', `http://127.0.0.1:${HAPROXY_PORT}/health`],
    ] as const) {
      process.stderr.write(`${name}... `);
      rows.push(await wrk(name, url, { connections, seconds }));
      process.stderr.write(`${rows.at(-1)!.rps.toFixed(0)} req/s\n`);
    }
    stopHaproxy();
    stopHaproxy = undefined;
    process.stderr.write('latency during two migrations... ');
    const moving = await latencyDuringMigrations();
    process.stderr.write('done\n');

    const gw = rows.find((r) => r.path === 'gateway')!;
    const ha = rows.find((r) => r.path === 'haproxy')!;
    const lines = [
      `wrk, ${connections} connections, ${seconds} s each, GET /health of the stateful app on node1; all on one 2-core machine.`,
      '',
      '| path | requests/s | p50 | p99 | errors |',
      '|---|---:|---:|---:|---:|',
      ...rows.map((r) => `| ${r.path} | ${r.rps.toFixed(0)} | ${r.p50Ms.toFixed(2)} ms | ${r.p99Ms.toFixed(2)} ms | ${r.errors} |`),
      '',
      `gateway/haproxy: throughput ${((gw.rps / ha.rps) * 100).toFixed(0)}%, p99 ${(gw.p99Ms / ha.p99Ms).toFixed(2)}x.`,
      '',
      `Through the gateway during a lazy migration and a copy migration back (2 clients, POST /increment): ${moving.requests} requests, ${moving.failed} failed, p99 ${moving.p99Ms.toFixed(1)} ms, max ${moving.maxMs.toFixed(0)} ms.`,
    ];
    const out = lines.join('\n');
    console.log(out);
    await mkdir(join(RESULTS, '..'), { recursive: true });
    await writeFile(RESULTS, `# bench/gateway\n\nMeasured ${new Date().toISOString()}.\n\n${out}\n`);
  } finally {
    stopHaproxy?.();
    await runChipmunk(['cluster', 'down']).catch(() => undefined);
    await removeTree(scratch);
  }
}

await main();
