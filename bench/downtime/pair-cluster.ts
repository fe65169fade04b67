/**
 * A whole chipmunk on the runc pair (test/support/runc-pair.ts), without the local cluster: an
 * agent (its HTTP server over a RuncRuntime) for each of the pair's two test hosts, and a
 * controller with a memory store, all in this process on loopback. The controller gives
 * containers cluster addresses from the pair network's own range and moves their routes with
 * the local cluster's routes script, on the machine and in both test hosts; the agents register
 * and heartbeat as real ones do. Needs root and `npm run setup`; CHIPMUNK_RUNC_PAIR_NET picks
 * the pair's network (never the local cluster's).
 */
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { writeAddressRoutesScript } from '../../src/cluster/routes.js';
import { startController, type RunningController } from '../../src/controller/index.js';
import { ControllerClient } from '../../src/shared/controller-client.js';
import { runUnchecked } from '../../src/shared/exec.js';
import { pairHostNetns } from '../../test/support/pair-addresses.js';
import { RUNC_PAIR_NET, RUNC_PAIR_NODES, makeRuncPair, prepareRuncPairs } from '../../test/support/runc-pair.js';
import { startPairAgentServers } from '../../test/support/runc-agents.js';

const TOKEN = 'pair-cluster-token';
const HEARTBEAT_MS = 500;
const TMP_PREFIX = `chipmunk-pair-cluster${RUNC_PAIR_NET}-`;

export interface PairCluster {
  client: ControllerClient;
  /** The pair's nodes: containers start on `source` and move to `target` and back. */
  source: string;
  target: string;
  /** The controller's moves of `address`'s routes (the local cluster's routes script), when each began and ended. */
  routeMoves(address: string): Promise<Array<{ began: number; ended: number; via: string }>>;
  close(): Promise<void>;
}

export async function startPairCluster(): Promise<PairCluster> {
  await prepareRuncPairs();
  const pair = await makeRuncPair();
  const root = await mkdtemp(join(tmpdir(), TMP_PREFIX));
  const closers: Array<() => Promise<unknown>> = [];
  const close = async () => {
    for (const closeOne of closers.reverse()) await closeOne().catch(() => undefined);
    try {
      await pair.cleanup();
    } finally {
      await runUnchecked('rm', ['-rf', '--one-file-system', '--', root]);
    }
  };
  try {
    const routes = await writeAddressRoutesScript(join(root, 'address-routes.sh'), RUNC_PAIR_NODES.map((n) => ({ netns: pairHostNetns(n), address: n.address })));
    // The same script, timed: when each route move began and ended (ms since epoch), for the bench's breakdown.
    const routesLog = join(root, 'address-routes.log');
    const timed = join(root, 'address-routes-timed.sh');
    await writeFile(timed, `began=$(date +%s%3N)\n${routes} "$@"\nrc=$?\necho "$began $(date +%s%3N) $*" >> ${routesLog}\nexit $rc\n`, { mode: 0o755 });
    const controller: RunningController = await startController({
      listen: { host: '127.0.0.1', port: 0 },
      token: TOKEN,
      storeSpec: 'memory:',
      logger: pino({ level: 'warn' }),
      // 8 addresses per pair network, none of them a node's subnet (pair-addresses.ts).
      containerRange: `198.19.200.${RUNC_PAIR_NET * 8}/29`,
      addressRoutesCommand: `/bin/sh ${timed}`,
    });
    closers.push(() => controller.close());
    const client = new ControllerClient({ urls: [controller.url], token: TOKEN, timeoutMs: 60_000 });
    for (const agent of await startPairAgentServers(pair, root, TOKEN)) {
      closers.push(() => agent.app.close());
      const registration = { name: agent.node, address: agent.address, url: agent.url, capabilities: agent.capabilities };
      await client.heartbeat(registration);
      const timer = setInterval(() => void client.heartbeat(registration).catch(() => undefined), HEARTBEAT_MS);
      closers.push(async () => clearInterval(timer));
    }
    // Containers' addresses are routed by the controller; what it routed goes with the test hosts, the machine's routes here.
    closers.push(async () => {
      for (const c of await client.containers().catch(() => [])) if (c.address) await runUnchecked('/bin/sh', [join(root, 'address-routes.sh'), c.address]);
    });
    const routeMoves = async (address: string) =>
      (await readFile(routesLog, 'utf8').catch(() => ''))
        .split('\n')
        .map((line) => line.split(' '))
        .filter((words) => words[2] === address && words[3] !== undefined)
        .map(([began, ended, , via]) => ({ began: Number(began), ended: Number(ended), via: via! }));
    return { client, source: RUNC_PAIR_NODES[0].node, target: RUNC_PAIR_NODES[1].node, routeMoves, close };
  } catch (err) {
    await close().catch(() => undefined);
    throw err;
  }
}
