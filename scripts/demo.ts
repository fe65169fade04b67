/**
 * `npm run demo`: the main job end to end on one machine. Starts a 3-node local cluster,
 * runs a stateful HTTP app holding memory, sends it requests, migrates it node1 -> node2 ->
 * node3 lazily while a client polls it, shows that its state survived and what each move
 * cost. Then protects it behind the gateway, kills its host, and shows it back on another
 * host with every acknowledged request. Last, an HA cluster (a controller and an etcd member on
 * every node) loses the host of its leading controller. Tears everything down (also on failure).
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { request } from 'undici';
import { DowntimeProbe } from '../src/devtools/downtime-probe.js';
import { ensureTestImages } from '../src/devtools/images.js';

const BIN = fileURLToPath(new URL('../bin/chipmunk.mjs', import.meta.url));
const MEMORY_MB = Number(process.env.DEMO_MEMORY_MB ?? 256);
const PORT = 8080;
const GATEWAY_PORT = 28080;
/** Short, so the failover part does not keep the operator waiting. */
const NODE_LEASE_MS = 2_000;
const address = (node: string) => `198.18.0.${10 + Number(node.replace('node', ''))}`;

interface MigrationJson {
  name: string;
  from: string;
  to: string;
  mode: string;
  downtimeMs: number;
  totalMs: number;
  bytesTransferred: number;
}

function chipmunk(args: string[], opts: { json?: boolean; quiet?: boolean } = {}): Promise<string> {
  if (!opts.quiet) console.log(`\n$ chipmunk ${args.join(' ')}`);
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args, ...(opts.json ? ['--json'] : [])], {
      stdio: ['ignore', 'pipe', opts.quiet ? 'ignore' : 'inherit'],
    });
    let out = '';
    child.stdout.on('data', (d: Buffer) => {
      out += d;
      if (!opts.json && !opts.quiet) process.stdout.write(d);
    });
    child.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`chipmunk ${args.join(' ')} exited ${code}`))));
  });
}

async function call(node: string, method: 'GET' | 'POST', path: string): Promise<any> {
  const res = await request(`http://${address(node)}:${PORT}${path}`, { method, headersTimeout: 5_000, bodyTimeout: 30_000 });
  const text = await res.body.text();
  return res.headers['content-type']?.toString().includes('json') ? JSON.parse(text) : text;
}

async function waitForAnswer(node: string): Promise<void> {
  const until = Date.now() + 30_000;
  for (;;) {
    try {
      await call(node, 'GET', '/health');
      return;
    } catch (err) {
      if (Date.now() > until) throw err;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

async function main(): Promise<void> {
  console.log('chipmunk demo: live migration of a stateful container across three test hosts on this machine');
  for (const img of await ensureTestImages()) console.log(`image ${img.name}: ${img.status}`);
  await chipmunk(['cluster', 'down'], { quiet: true }).catch(() => undefined);
  await chipmunk(['cluster', 'up', '--nodes', '3', '--node-lease', `${NODE_LEASE_MS}ms`]);
  await chipmunk(['node', 'ls']);
  await chipmunk(['run', '--name', 'web', '--node', 'node1', '-p', `${PORT}:8080`, '-e', `MEMORY_MB=${MEMORY_MB}`, 'chipmunk/statefulapp']);
  await waitForAnswer('node1');
  await chipmunk(['ps']);

  let acknowledged = 0;
  const moves: Array<MigrationJson & { clientDowntimeMs?: number }> = [];
  let current = 'node1';
  for (const next of ['node2', 'node3']) {
    for (let i = 0; i < 5; i++) {
      const { counter } = await call(current, 'POST', '/increment');
      acknowledged++;
      if (counter !== acknowledged) throw new Error(`counter is ${counter}, expected ${acknowledged}`);
    }
    console.log(`\nsent 5 increments to web on ${current} (${address(current)}:${PORT}); counter = ${acknowledged}`);
    const probe = new DowntimeProbe(`http://${address(current)}:${PORT}/health`, `http://${address(next)}:${PORT}/health`);
    probe.start();
    const summary = JSON.parse(await chipmunk(['migrate', 'web', '--to', next, '--mode', 'lazy'], { json: true })) as MigrationJson;
    const seen = await probe.stop();
    console.log(`moved in ${summary.totalMs} ms; frozen ${summary.downtimeMs} ms; a client polling every ms saw no answer for ${seen.downtimeMs ?? '?'} ms`);
    moves.push({ ...summary, clientDowntimeMs: seen.downtimeMs });
    current = next;
  }

  const state = await call(current, 'GET', '/');
  const file = await call(current, 'GET', '/file');
  const memory = await call(current, 'GET', '/verify-memory');
  await chipmunk(['ps']);
  await chipmunk(['logs', 'web']);

  console.log('\nmigrations');
  console.log('FROM   TO     MODE  CLIENT-SEEN DOWNTIME  FROZEN (AGENTS)  TOTAL     MOVED');
  for (const m of moves) {
    console.log(
      `${m.from.padEnd(6)} ${m.to.padEnd(6)} ${m.mode.padEnd(5)} ${`${m.clientDowntimeMs ?? '?'} ms`.padEnd(21)} ${`${m.downtimeMs} ms`.padEnd(16)} ${`${m.totalMs} ms`.padEnd(9)} ${(m.bytesTransferred / 2 ** 20).toFixed(1)} MiB`,
    );
  }
  const ok = state.counter === acknowledged && file.lines === acknowledged && memory.ok === true;
  console.log(
    `\nstate on ${current}: counter ${state.counter} (acknowledged ${acknowledged}), file lines ${file.lines}, ${MEMORY_MB} MB of memory ${memory.ok ? 'verified' : 'CORRUPTED'}`,
  );
  if (!ok) throw new Error('state did not survive the migrations');
  console.log('state survived both migrations');

  await failover(current, acknowledged);
  await controlPlaneFailover();
}

/** Part two: protection. The app behind the gateway, checkpointed; its host dies; it comes back elsewhere. */
async function failover(node: string, acknowledgedSoFar: number): Promise<void> {
  console.log(`
fault tolerance: protect web, serve it through the gateway (127.0.0.1:${GATEWAY_PORT}), then kill ${node}`);
  await chipmunk(['protect', 'web', '--every', '30s']);
  await chipmunk(['expose', 'web', '--port', '8080', '--listen', String(GATEWAY_PORT)]);
  const viaGateway = async (method: 'GET' | 'POST', path: string) => {
    const res = await request(`http://127.0.0.1:${GATEWAY_PORT}${path}`, { method, headersTimeout: 60_000 });
    return (await res.body.json()) as any;
  };
  await waitUntil(async () => JSON.parse(await chipmunk(['checkpoints', 'web'], { json: true, quiet: true })).some((c: { logPosition: { logId: string | null; seq: number } | null }) => c.logPosition !== null));
  await chipmunk(['checkpoints', 'web']);
  let acknowledged = acknowledgedSoFar;
  for (let i = 0; i < 20; i++) {
    const { counter } = await viaGateway('POST', '/increment');
    acknowledged++;
    if (counter !== acknowledged) throw new Error(`counter is ${counter}, expected ${acknowledged}`);
  }
  console.log(`
sent 20 increments through the gateway after the checkpoint; counter = ${acknowledged}`);
  await chipmunk(['cluster', 'kill', node]);
  const startedAt = Date.now();
  // This request waits at the gateway while the node is dead, and is answered on the new host.
  const { counter } = await viaGateway('POST', '/increment');
  acknowledged++;
  console.log(`a request sent right after the kill was answered ${Date.now() - startedAt} ms later: counter = ${counter} (acknowledged ${acknowledged})`);
  await chipmunk(['failovers']);
  await chipmunk(['ps']);
  const file = await viaGateway('GET', '/file');
  const memory = await viaGateway('GET', '/verify-memory');
  if (counter !== acknowledged || file.lines !== acknowledged || memory.ok !== true) {
    throw new Error(`after the failover: counter ${counter}, file lines ${file.lines}, memory ${memory.ok ? 'ok' : 'CORRUPTED'}; expected ${acknowledged}`);
  }
  console.log(`state survived the death of ${node}: counter and file lines ${acknowledged}, ${MEMORY_MB} MB of memory verified (the 20 requests after the checkpoint were replayed from the gateway's log)`);
}

/**
 * Part three: no single point of failure. A cluster whose nodes each run an etcd member and a
 * controller; the host of the leading controller dies, and with it a protected container: another
 * controller takes over and brings the container back, with every acknowledged request.
 */
async function controlPlaneFailover(): Promise<void> {
  console.log(`
no single point of failure: every node runs an etcd member and a controller; they elect a leader`);
  await chipmunk(['cluster', 'down'], { quiet: true });
  await chipmunk(['cluster', 'up', '--nodes', '3', '--ha', '--node-lease', `${NODE_LEASE_MS}ms`]);
  const leaderNode = async () => {
    const nodes = JSON.parse(await chipmunk(['node', 'ls'], { json: true, quiet: true })) as Array<{ name: string; controller?: { role: string; term?: number } }>;
    const leader = nodes.find((n) => n.controller?.role === 'leader');
    return leader && { node: leader.name, term: leader.controller!.term! };
  };
  await waitUntil(async () => (await leaderNode()) !== undefined);
  await chipmunk(['node', 'ls']);
  const before = (await leaderNode())!;
  await chipmunk(['run', '--name', 'db', '--node', before.node, '--checkpoint-every', '2s', '-e', 'MEMORY_MB=64', 'chipmunk/statefulapp']);
  await chipmunk(['expose', 'db', '--port', '8080', '--listen', String(GATEWAY_PORT)]);
  const increment = async () => {
    const res = await request(`http://127.0.0.1:${GATEWAY_PORT}/increment`, { method: 'POST', headersTimeout: 60_000 });
    return ((await res.body.json()) as { counter: number }).counter;
  };
  await waitUntil(async () => (await increment()) > 0);
  await waitUntil(async () => JSON.parse(await chipmunk(['checkpoints', 'db'], { json: true, quiet: true })).length > 0);
  let acknowledged = await increment();
  for (let i = 0; i < 20; i++) acknowledged = await increment();
  await chipmunk(['checkpoints', 'db']);
  console.log(`
db runs on ${before.node}, whose controller leads (term ${before.term}); counter = ${acknowledged}. Killing ${before.node}: its agent, etcd member and controller`);
  await chipmunk(['cluster', 'kill', before.node]);
  const killedAt = Date.now();
  let after: { node: string; term: number } | undefined;
  await waitUntil(async () => {
    after = await leaderNode();
    return after !== undefined && after.node !== before.node;
  });
  console.log(`controller on ${after!.node} leads (term ${after!.term}) ${Date.now() - killedAt} ms after the kill`);
  const counter = await increment();
  acknowledged++;
  console.log(`a request sent after the kill was answered ${Date.now() - killedAt} ms after it: counter = ${counter} (acknowledged ${acknowledged})`);
  await chipmunk(['node', 'ls']);
  await chipmunk(['ps']);
  if (counter !== acknowledged) throw new Error(`after the leader's host died: counter ${counter}, expected ${acknowledged}`);
  console.log(`db survived the death of the leader's host: every acknowledged request is there`);
}

async function waitUntil(cond: () => Promise<boolean>, timeoutMs = 60_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!(await cond().catch(() => false))) {
    if (Date.now() > until) throw new Error(`timed out after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

let failed = false;
try {
  await main();
} catch (err) {
  failed = true;
  console.error(`\ndemo failed: ${(err as Error).message}`);
} finally {
  await chipmunk(['cluster', 'down']).catch((err) => console.error(`cluster down failed: ${(err as Error).message}`));
}
process.exit(failed ? 1 : 0);
