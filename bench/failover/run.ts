/**
 * bench/failover: what protection costs and what it buys, measured in one run.
 *
 * 1. Failover: a protected 256 MB stateful app behind the gateway, a client sending POST
 *    /increment nonstop, and its test host killed (`chipmunk cluster kill`): time from the kill
 *    to the client's first successful answer from the new host, for several node leases, with
 *    the controller's own phases (detection, restore, replay and switch) and failed requests.
 * 2. Checkpoints: 64 MB / 256 MB / 1 GB apps that change 1% and 10% of their memory between
 *    checkpoints: how long each checkpoint froze the app, and the bytes it newly stored next
 *    to the bytes that changed.
 * 3. Throughput through the gateway with request logging on (a protected container) and off
 *    (an unprotected one), side by side: wrk POST /increment at fixed concurrency.
 *
 * Usage: npm run bench:failover [-- --leases 1000,2000,5000 --sizes 64,256,1024 --seconds 5 --parts failover,checkpoints,logging]
 * Prints the tables and writes them to bench/results/failover.md.
 */
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Agent, request } from 'undici';
import { DEFAULT_STATE_DIR, readClusterState } from '../../src/cluster/index.js';
import { ensureTestImages } from '../../src/devtools/images.js';
import { runChipmunk } from '../../src/devtools/run-chipmunk.js';
import { changedBytes, pageHashes } from '../support/page-diff.js';
import { wrk, type LoadRow } from '../support/wrk.js';

const RESULTS = fileURLToPath(new URL('../results/failover.md', import.meta.url));
const GATEWAY = '127.0.0.1';
const MiB = 1024 * 1024;

const { values } = parseArgs({
  options: {
    leases: { type: 'string', default: '1000,2000,5000' },
    sizes: { type: 'string', default: '64,256,1024' },
    seconds: { type: 'string', default: '5' },
    connections: { type: 'string', default: '16' },
    parts: { type: 'string', default: 'failover,checkpoints,logging' },
  },
});
const parts = new Set(values.parts.split(','));
const leases = values.leases.split(',').map(Number);
const sizes = values.sizes.split(',').map(Number);
const seconds = Number(values.seconds);
const connections = Number(values.connections);

interface Failover {
  name: string;
  outcome: string;
  timings: Record<string, number>;
  to?: string;
  detectedAt: number;
  restoredAt?: number;
  finishedAt?: number;
  replayed?: number;
}

interface Checkpoint {
  id: string;
  logicalBytes: number;
  newBytes: number;
  logPosition: number | null;
  frozenMs: number;
}

const json = async <T>(args: string[]): Promise<T> => JSON.parse(await runChipmunk([...args.slice(0, args[0] === 'cluster' ? 2 : 1), '--json', ...args.slice(args[0] === 'cluster' ? 2 : 1)])) as T;

async function waitFor<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe().catch(() => undefined);
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(100);
  }
}

async function answersThroughGateway(port: number): Promise<true | undefined> {
  const res = await request(`http://${GATEWAY}:${port}/health`, { headersTimeout: 5_000 });
  await res.body.dump();
  return res.statusCode === 200 ? true : undefined;
}

// ---------------------------------------------------------------- 1. failover

interface FailoverRow {
  leaseMs: number;
  firstAnswerMs: number;
  detectMs: number;
  restoreMs: number;
  replayMs: number;
  fetchMs: number;
  criuMs: number;
  replayed: number;
  requests: number;
  failed: number;
}

async function measureFailover(leaseMs: number): Promise<FailoverRow> {
  const port = 28280;
  await runChipmunk(['cluster', 'down']);
  await runChipmunk(['cluster', 'up', '--nodes', '3', '--node-lease', `${leaseMs}ms`]);
  await runChipmunk(['run', '--name', 'fo', '--node', 'node1', '-p', `${port}:8080`, '-e', 'MEMORY_MB=256', '--memory', '768m', '--checkpoint-every', '10s', 'chipmunk/statefulapp']);
  await runChipmunk(['expose', 'fo', '--port', '8080', '--listen', String(port)]);
  await waitFor('the app through the gateway', 60_000, () => answersThroughGateway(port));
  await waitFor('a checkpoint cut at a log position', 120_000, async () => ((await json<Checkpoint[]>(['checkpoints', 'fo'])).some((c) => c.logPosition !== null) ? true : undefined));

  const agent = new Agent({ keepAliveTimeout: 10_000 });
  let stop = false;
  /** Completion times of successful answers: the first after the kill came from the new host. */
  const answeredAt: number[] = [];
  let requests = 0;
  let failed = 0;
  const client = (async () => {
    while (!stop) {
      try {
        const res = await request(`http://${GATEWAY}:${port}/increment`, { method: 'POST', dispatcher: agent, headersTimeout: 120_000 });
        await res.body.dump();
        requests++;
        const at = Date.now();
        if (res.statusCode !== 200) failed++;
        else answeredAt.push(at);
      } catch {
        failed++;
      }
    }
  })();
  await sleep(2_000);
  const killedAt = (await json<{ killedAt: number }>(['cluster', 'kill', 'node1'])).killedAt;
  // Every process of node1 is dead once the command returns: any answer after that is the new host's.
  const killReturnedAt = Date.now();
  const failover = await waitFor('the failover', 180_000, async () => (await json<Failover[]>(['failovers'])).find((f) => f.name === 'fo' && f.outcome !== 'running'));
  const firstAnswerAfterKill = await waitFor('an answer after the kill', 60_000, async () => answeredAt.find((at) => at > killReturnedAt));
  await sleep(1_000);
  stop = true;
  await client;
  await agent.close();
  if (failover.outcome !== 'done') throw new Error(`failover with a ${leaseMs} ms lease failed: ${JSON.stringify(failover)}`);
  if (failover.detectedAt < killedAt) throw new Error(`node1 was declared dead before it was killed (a false failover, lease ${leaseMs} ms): ${JSON.stringify(failover)}`);
  return {
    leaseMs,
    firstAnswerMs: firstAnswerAfterKill - killedAt,
    detectMs: failover.detectedAt - killedAt,
    restoreMs: failover.restoredAt! - failover.detectedAt,
    replayMs: failover.finishedAt! - failover.restoredAt!,
    fetchMs: failover.timings.fetchMs ?? 0,
    criuMs: failover.timings.criuMs ?? 0,
    replayed: failover.replayed ?? 0,
    requests,
    failed,
  };
}

// ---------------------------------------------------------------- 2. checkpoints

interface CheckpointRow {
  sizeMb: number;
  changedPercent: number | 'first';
  /** What the app deliberately rewrote (its /touch). */
  touchedBytes: number;
  /** Pages of the process whose content changed since the checkpoint before (read from /proc/PID/mem): the bytes that changed. */
  changedBytes: number;
  frozenMs: number;
  logicalBytes: number;
  newBytes: number;
}

async function measureCheckpoints(sizeMb: number): Promise<CheckpointRow[]> {
  const name = `ck${sizeMb}`;
  const port = 28300;
  await runChipmunk(['run', '--name', name, '--node', 'node2', '-p', `${port}:8080`, '-e', `MEMORY_MB=${sizeMb}`, '--memory', `${sizeMb + 512}m`, 'chipmunk/statefulapp']);
  try {
    await runChipmunk(['expose', name, '--port', '8080', '--listen', String(port)]);
    await waitFor(`${name} through the gateway`, 120_000, () => answersThroughGateway(port));
    const rows: CheckpointRow[] = [];
    const pid = await appPid(name, 'node2');
    const first = await json<Checkpoint>(['checkpoint', name]);
    rows.push({ sizeMb, changedPercent: 'first', touchedBytes: 0, changedBytes: first.logicalBytes, frozenMs: first.frozenMs, logicalBytes: first.logicalBytes, newBytes: first.newBytes });
    let before = await pageHashes(pid);
    for (const percent of [1, 10]) {
      const res = await request(`http://${GATEWAY}:${port}/touch?percent=${percent}`, { method: 'POST' });
      const touched = (await res.body.json()) as { touchedMB: number };
      const after = await pageHashes(pid);
      const c = await json<Checkpoint>(['checkpoint', name]);
      rows.push({ sizeMb, changedPercent: percent, touchedBytes: touched.touchedMB * MiB, changedBytes: changedBytes(before, after), frozenMs: c.frozenMs, logicalBytes: c.logicalBytes, newBytes: c.newBytes });
      before = await pageHashes(pid);
    }
    return rows;
  } finally {
    await runChipmunk(['rm', name]).catch(() => undefined);
  }
}

/** The host pid of the container's main process, from its agent. */
async function appPid(name: string, node: string): Promise<number> {
  const state = await readClusterState(DEFAULT_STATE_DIR);
  const entry = state?.nodes.find((n) => n.name === node);
  if (!state || !entry) throw new Error(`no ${node} in the local cluster`);
  const token = (await readFile(state.tokenFile, 'utf8')).trim();
  const res = await request(`http://${entry.address}:7401/v1/containers/${name}`, { headers: { authorization: `Bearer ${token}` } });
  const container = (await res.body.json()) as { pid?: number };
  if (!container.pid) throw new Error(`the agent of ${node} reports no pid for ${name}`);
  return container.pid;
}

// ---------------------------------------------------------------- 3. logging on vs off

async function measureLogging(): Promise<LoadRow[]> {
  const ports = { on: 28310, off: 28311 };
  await runChipmunk(['run', '--name', 'log-on', '--node', 'node3', '-p', `${ports.on}:8080`, '-e', 'MEMORY_MB=16', '--checkpoint-every', '1h', 'chipmunk/statefulapp']);
  await runChipmunk(['run', '--name', 'log-off', '--node', 'node3', '-p', `${ports.off}:8080`, '-e', 'MEMORY_MB=16', 'chipmunk/statefulapp']);
  await runChipmunk(['expose', 'log-on', '--port', '8080', '--listen', String(ports.on)]);
  await runChipmunk(['expose', 'log-off', '--port', '8080', '--listen', String(ports.off)]);
  for (const port of Object.values(ports)) await waitFor('the app through the gateway', 60_000, () => answersThroughGateway(port));
  await waitFor('log-on checkpointed at a log position', 60_000, async () => ((await json<Checkpoint[]>(['checkpoints', 'log-on'])).some((c) => c.logPosition !== null) ? true : undefined));
  const rows: LoadRow[] = [];
  // Alternating, twice each: the machine's noise hits both.
  for (const round of [1, 2]) {
    for (const which of ['off', 'on'] as const) {
      rows.push(await wrk(`logging ${which} (round ${round})`, `http://${GATEWAY}:${ports[which]}/increment`, { connections, seconds, method: 'POST' }));
    }
  }
  return rows;
}

// ---------------------------------------------------------------- report

const mb = (bytes: number) => `${(bytes / MiB).toFixed(1)} MiB`;

async function main(): Promise<void> {
  await ensureTestImages();
  try {
    const failovers: FailoverRow[] = [];
    for (const lease of parts.has('failover') ? leases : []) {
      process.stderr.write(`failover with a ${lease} ms lease... `);
      failovers.push(await measureFailover(lease));
      process.stderr.write(`${failovers.at(-1)!.firstAnswerMs} ms\n`);
    }

    const checkpoints: CheckpointRow[] = [];
    let logging: LoadRow[] = [];
    if (parts.has('checkpoints') || parts.has('logging')) {
      await runChipmunk(['cluster', 'down']);
      await runChipmunk(['cluster', 'up', '--nodes', '3']);
    }
    for (const size of parts.has('checkpoints') ? sizes : []) {
      process.stderr.write(`checkpoints of a ${size} MB app... `);
      checkpoints.push(...(await measureCheckpoints(size)));
      process.stderr.write('done\n');
    }
    if (parts.has('logging')) {
      process.stderr.write('gateway throughput, logging on vs off... ');
      logging = await measureLogging();
      process.stderr.write('done\n');
    }

    const mean = (which: string) => {
      const rows = logging.filter((r) => r.path.startsWith(`logging ${which}`));
      return rows.reduce((sum, r) => sum + r.rps, 0) / rows.length;
    };
    const lines = ['All on one 2-core machine, 3 test hosts; the gateway and the controller (with the checkpoint store) on the same machine.'];
    if (failovers.length > 0) {
      lines.push(
        '',
        'Failover of a protected 256 MB app behind the gateway, one client sending POST /increment nonstop, its host killed (every process at once):',
        '',
        '| node lease | kill -> first answer from the new host | detection | restore (fetch from store + prepare; runc restore) | replay + switch | replayed | requests | failed |',
        '|---:|---:|---:|---:|---:|---:|---:|---:|',
        ...failovers.map(
          (f) => `| ${f.leaseMs} ms | ${f.firstAnswerMs} ms | ${f.detectMs} ms | ${f.restoreMs} ms (${f.fetchMs}; ${f.criuMs}) | ${f.replayMs} ms | ${f.replayed} | ${f.requests} | ${f.failed} |`,
        ),
      );
    }
    if (checkpoints.length > 0) {
      lines.push(
        '',
        'Checkpoints: the app rewrites N% of its memory (in 1 MiB blocks) between checkpoints; "changed" is every page of the process',
        'whose content changed in that time, read from /proc/PID/mem (the rewrite plus what the node.js runtime touched); "first" is the app\'s first checkpoint:',
        '',
        '| app memory | rewrite | app rewrote | changed (pages) | frozen | checkpoint size | newly stored | stored / changed | stored / rewrote |',
        '|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
        ...checkpoints.map((c) =>
          c.changedPercent === 'first'
            ? `| ${c.sizeMb} MB | first | - | - | ${c.frozenMs} ms | ${mb(c.logicalBytes)} | ${mb(c.newBytes)} | - | - |`
            : `| ${c.sizeMb} MB | ${c.changedPercent}% | ${mb(c.touchedBytes)} | ${mb(c.changedBytes)} | ${c.frozenMs} ms | ${mb(c.logicalBytes)} | ${mb(c.newBytes)} | ${(c.newBytes / c.changedBytes).toFixed(2)}x | ${(c.newBytes / c.touchedBytes).toFixed(2)}x |`,
        ),
      );
    }
    if (logging.length > 0) {
      lines.push(
        '',
        `Through the gateway, wrk POST /increment, ${connections} connections, ${seconds} s each, alternating:`,
        '',
        '| route | requests/s | p50 | p99 | errors |',
        '|---|---:|---:|---:|---:|',
        ...logging.map((r) => `| ${r.path} | ${r.rps.toFixed(0)} | ${r.p50Ms.toFixed(2)} ms | ${r.p99Ms.toFixed(2)} ms | ${r.errors} |`),
        '',
        `Logging on / off: throughput ${((mean('on') / mean('off')) * 100).toFixed(0)}% (means of the rounds).`,
      );
    }
    const out = lines.join('\n');
    console.log(out);
    await mkdir(join(RESULTS, '..'), { recursive: true });
    await writeFile(RESULTS, `# bench/failover\n\nMeasured ${new Date().toISOString()}.\n\n${out}\n`);
  } finally {
    await runChipmunk(['cluster', 'down']).catch(() => undefined);
  }
}

await main();
