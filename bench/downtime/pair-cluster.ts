/**
 * A whole chipmunk on the runc pair (test/support/runc-pair.ts), without the local cluster: an
 * agent (its HTTP server over a RuncRuntime) for each of the pair's two test hosts, and a
 * controller with a memory store, all in this process on loopback. The controller gives
 * containers cluster addresses from the pair network's own range and moves their routes with
 * the local cluster's routes script, on the machine and in both test hosts; the agents register
 * and heartbeat as real ones do. Needs root and `npm run setup`; CHIPMUNK_RUNC_PAIR_NET picks
 * the pair's network (never the local cluster's).
 *
 * With `gateway`, a gateway runs in this process too (its routes on loopback), and the controller
 * pushes its routes there; `killNode` is a power loss of one node, for failovers.
 */
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { writeAddressRoutesScript } from '../../src/cluster/routes.js';
import { nodeCgroup } from '../../src/cluster/state.js';
import { killAllInCgroup } from '../../src/cluster/testhost.js';
import { startGateway } from '../../src/gateway/index.js';
import { startController, type RunningController } from '../../src/controller/index.js';
import { ControllerClient } from '../../src/shared/controller-client.js';
import { runUnchecked } from '../../src/shared/exec.js';
import { pairHostNetns } from '../../test/support/pair-addresses.js';
import { RUNC_PAIR_NET, RUNC_PAIR_NODES, makeRuncPair, prepareRuncPairs } from '../../test/support/runc-pair.js';
import { startPairAgentServers } from '../../test/support/runc-agents.js';

const TOKEN = 'pair-cluster-token';
const HEARTBEAT_MS = 500;
const TMP_PREFIX = `chipmunk-pair-cluster${RUNC_PAIR_NET}-`;
/** The controller's and the gateway's log level (stdout): CHIPMUNK_PAIR_LOG=info to see route moves and holds. */
const LOG_LEVEL = process.env.CHIPMUNK_PAIR_LOG ?? 'warn';

export interface PairClusterOptions {
  /** A gateway in this process, its route listeners on 127.0.0.1, known to the controller. */
  gateway?: boolean;
  /** A node that stops heartbeating is dead after this long, and its protected containers fail over (5 s by default). */
  nodeLeaseMs?: number;
}

export interface PairCluster {
  client: ControllerClient;
  /** The pair's nodes: containers start on `source` and move to `target` and back. */
  source: string;
  target: string;
  /** The controller's moves of `address`'s routes (the local cluster's routes script), when each began and ended. */
  routeMoves(address: string): Promise<Array<{ began: number; ended: number; via: string }>>;
  /** Where clients reach the gateway's routes (with `gateway`). */
  gatewayHost?: string;
  /**
   * A power loss of `node`: nothing of its test host reaches anyone any more (no reset, no end of
   * stream), its agent stops answering and heartbeating, and its containers' processes are killed.
   */
  killNode(node: string): Promise<void>;
  close(): Promise<void>;
}

export async function startPairCluster(opts: PairClusterOptions = {}): Promise<PairCluster> {
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
    let gateway: { url: string; publicHost: string } | undefined;
    if (opts.gateway) {
      const running = await startGateway({ apiListen: { host: '127.0.0.1', port: 0 }, routeHost: '127.0.0.1', token: TOKEN, stateFile: join(root, 'gateway', 'routes.json'), logger: pino({ level: LOG_LEVEL }) });
      closers.push(() => running.close());
      gateway = { url: running.url, publicHost: '127.0.0.1' };
    }
    const controller: RunningController = await startController({
      listen: { host: '127.0.0.1', port: 0 },
      token: TOKEN,
      storeSpec: 'memory:',
      logger: pino({ level: LOG_LEVEL }),
      // 8 addresses per pair network, none of them a node's subnet (pair-addresses.ts).
      containerRange: `198.19.200.${RUNC_PAIR_NET * 8}/29`,
      addressRoutesCommand: `/bin/sh ${timed}`,
      ...(gateway ? { gateway } : {}),
      ...(opts.nodeLeaseMs ? { nodeReadyWithinMs: opts.nodeLeaseMs } : {}),
    });
    closers.push(() => controller.close());
    const client = new ControllerClient({ urls: [controller.url], token: TOKEN, timeoutMs: 60_000 });
    const agents = await startPairAgentServers(pair, root, TOKEN);
    const heartbeats = new Map<string, NodeJS.Timeout>();
    for (const agent of agents) {
      closers.push(() => agent.app.close());
      const registration = { name: agent.node, address: agent.address, url: agent.url, capabilities: agent.capabilities };
      await client.heartbeat(registration);
      heartbeats.set(agent.node, setInterval(() => void client.heartbeat(registration).catch(() => undefined), HEARTBEAT_MS));
    }
    closers.push(async () => heartbeats.forEach((timer) => clearInterval(timer)));
    const killNode = async (node: string) => {
      const host = RUNC_PAIR_NODES.find((n) => n.node === node);
      const agent = agents.find((a) => a.node === node);
      if (!host || !agent) throw new Error(`no node ${node} in this pair cluster`);
      // Silence first: the killed processes' sockets must not send a reset or an end of stream.
      const drop = await runUnchecked('nsenter', [`--net=${pairHostNetns(host)}`, '--', 'iptables', '-I', 'FORWARD', '-j', 'DROP']);
      if (drop.code !== 0) throw new Error(`cutting ${node} off: ${drop.stderr}`);
      clearInterval(heartbeats.get(node));
      agent.app.server.closeAllConnections();
      await agent.app.close();
      await killAllInCgroup(nodeCgroup(node));
    };
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
    return { client, source: RUNC_PAIR_NODES[0].node, target: RUNC_PAIR_NODES[1].node, routeMoves, ...(gateway ? { gatewayHost: gateway.publicHost } : {}), killNode, close };
  } catch (err) {
    await close().catch(() => undefined);
    throw err;
  }
}
