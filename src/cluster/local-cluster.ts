/**
 * The local cluster: a controller on the machine and N agents, each in its own test host, all
 * on one machine. `clusterUp` starts them as detached background processes (they outlive the
 * CLI) and records what it started in STATEDIR/cluster.json, which `clusterDown` and the CLI's
 * controller lookup read.
 */
import { type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmod, mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { ChipmunkError, ConflictError, InvalidInputError, UnavailableError, toChipmunkError } from '../shared/errors.js';
import { ControllerClient } from '../shared/controller-client.js';
import { ApiClient } from '../shared/http.js';
import type { NodeView } from '../shared/protocol.js';
import { routeContainerSubnet, TEST_RANGE, writeAddressRoutesScript, type RoutedHost } from './routes.js';
import { createTestHost, ensureBridge, netnsPath, testHostNetns, type TestNetwork } from './testhost.js';
import { REPO_ROOT, failOnExit, isRunning, spawnDaemon } from './processes.js';

export const DEFAULT_STATE_DIR = '/var/lib/chipmunk/local-cluster';
export const DEFAULT_RUN_DIR = '/run/chipmunk/local-cluster';

/** Node i is 198.18.0.(10+i); the bridge holds .1, where the controller listens. */
export const LOCAL_NETWORK: TestNetwork = {
  bridge: 'chmk-br0',
  gateway: '198.18.0.1',
  prefixLength: 24,
  netnsPrefix: 'chmk-',
  vethPrefix: 'chmkv-',
};
const CONTROLLER_PORT = 7400;
const GATEWAY_API_PORT = 7402;
/** Clients on this machine reach exposed services at 127.0.0.1:PORT. */
export const LOCAL_GATEWAY_HOST = '127.0.0.1';
export const AGENT_PORT = 7401;
/** Each node is a full agent process on this one machine; the address plan alone would allow 244. */
export const MAX_NODES = 50;

export const READY_TIMEOUT_MS = 60_000;
export const READY_POLL_MS = 250;

const CHIPMUNK_BIN = join(REPO_ROOT, 'bin', 'chipmunk.mjs');

export interface LocalClusterNode {
  name: string;
  address: string;
  netns: string;
  agentPid: number;
}

export interface LocalClusterState {
  controllerUrl: string;
  tokenFile: string;
  controllerPid: number;
  /** The gateway: its API on the bridge, its route listeners on the machine's loopback. */
  gatewayPid?: number;
  gatewayUrl?: string;
  nodes: LocalClusterNode[];
  /**
   * The command lines (after the node binary) the controller and the gateway were started with:
   * `cluster revive controller|gateway` starts them again exactly so (same state dir and store).
   */
  controllerArgs?: string[];
  gatewayArgs?: string[];
  /** Started with CHIPMUNK_ENABLE_FAULTS=1: revived daemons get it too, or their fault routes would vanish. */
  faultsEnabled?: boolean;
  /** 'starting' until every agent is ready: what a failed `cluster up` leaves for `cluster down`. */
  status: 'starting' | 'ready';
}

export interface LocalClusterDirs {
  stateDir?: string;
  runDir?: string;
}

export interface ClusterUpOptions extends LocalClusterDirs {
  nodes: number;
  /** The controller's node lease: how soon a killed node is declared dead and its protected containers fail over. */
  nodeLeaseMs?: number;
  /** Start-up steps, for the operator ("starting agent node2"). */
  onProgress?: (message: string) => void;
}

export interface ClusterUpResult {
  state: LocalClusterState;
  /** The cluster was already up with this many nodes: nothing was done. */
  alreadyUp: boolean;
}

function stateFile(stateDir: string): string {
  return join(stateDir, 'cluster.json');
}

function nodeName(i: number): string {
  return `node${i}`;
}

/** Node i is .(10+i) in the bridge's /24. */
function nodeAddress(i: number): string {
  return `${LOCAL_NETWORK.gateway.split('.').slice(0, 3).join('.')}.${10 + i}`;
}

/** Node i's containers take addresses in 198.19.i.0/24, routed to its test host. */
/** The test hosts `cluster up` makes, known before they exist (the controller starts first). */
function testHosts(nodes: number): RoutedHost[] {
  return Array.from({ length: nodes }, (_, j) => ({ netns: netnsPath(testHostNetns(LOCAL_NETWORK, nodeName(j + 1))), address: nodeAddress(j + 1) }));
}

function nodeContainerSubnet(i: number): string {
  return `198.19.${i}.0/24`;
}

export function nodeDataDir(stateDir: string, node: string): string {
  return join(stateDir, 'nodes', node);
}

export function nodeRunDir(runDir: string, node: string): string {
  return join(runDir, node);
}

/**
 * The cgroup (relative to each hierarchy's root) every container of agent `node` runs under,
 * what `cluster kill` and `cluster down` kill: the agent names its containers' cgroups so
 * (its runtime's layout). A container in a user namespace of its own is in no namespace the
 * cluster can name.
 */
export function nodeCgroup(node: string): string {
  return `chipmunk/${node}`;
}

export function logFile(stateDir: string, daemon: string): string {
  return join(stateDir, 'logs', `${daemon}.log`);
}

/** The local cluster's record, or undefined when none was started (or it was taken down). */
export async function readClusterState(stateDir = DEFAULT_STATE_DIR): Promise<LocalClusterState | undefined> {
  let text: string;
  try {
    text = await readFile(stateFile(stateDir), 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  return JSON.parse(text) as LocalClusterState;
}

export async function writeClusterState(stateDir: string, state: LocalClusterState): Promise<void> {
  // Written whole then renamed, so a reader never sees half a file.
  const file = stateFile(stateDir);
  await writeFile(`${file}.tmp`, `${JSON.stringify(state, null, 2)}\n`);
  await rename(`${file}.tmp`, file);
}

// ---------------------------------------------------------------- up

export async function clusterUp(opts: ClusterUpOptions): Promise<ClusterUpResult> {
  const stateDir = opts.stateDir ?? DEFAULT_STATE_DIR;
  const runDir = opts.runDir ?? DEFAULT_RUN_DIR;
  const progress = opts.onProgress ?? (() => {});
  if (!Number.isInteger(opts.nodes) || opts.nodes < 1 || opts.nodes > MAX_NODES) {
    throw new InvalidInputError(`bad node count ${opts.nodes}: a local cluster has 1 to ${MAX_NODES} nodes`, { nodes: opts.nodes });
  }

  const existing = await readClusterState(stateDir);
  if (existing) return { state: await checkExistingCluster(existing, opts.nodes, stateDir), alreadyUp: true };

  // The bridge first: it fails when the subnet is taken, and then nothing else should be left behind.
  progress(`creating bridge ${LOCAL_NETWORK.bridge} (${LOCAL_NETWORK.gateway}/${LOCAL_NETWORK.prefixLength}; ${TEST_RANGE} unreachable but for test hosts)`);
  await ensureBridge(LOCAL_NETWORK);

  await mkdir(join(stateDir, 'logs'), { recursive: true, mode: 0o700 });
  await mkdir(runDir, { recursive: true });
  const tokenFile = join(stateDir, 'token');
  const token = randomBytes(32).toString('hex');
  await writeFile(tokenFile, token, { mode: 0o600 });
  // writeFile's mode only applies when it creates the file.
  await chmod(tokenFile, 0o600);

  const gatewayApi = `${LOCAL_NETWORK.gateway}:${GATEWAY_API_PORT}`;
  const gatewayLog = logFile(stateDir, 'gateway');
  progress(`starting gateway (routes on ${LOCAL_GATEWAY_HOST}, API at http://${gatewayApi}; log: ${gatewayLog})`);
  const faultsEnabled = process.env.CHIPMUNK_ENABLE_FAULTS === '1';
  const gatewayArgs = ['--max-semi-space-size=64', CHIPMUNK_BIN, 'gateway', '--api', gatewayApi, '--route-host', LOCAL_GATEWAY_HOST, '--state', join(stateDir, 'gateway', 'routes.json'), '--token-file', tokenFile];
  const gateway = await spawnDaemon(process.execPath, gatewayArgs, gatewayLog, daemonEnv(faultsEnabled));
  const controllerListen = `${LOCAL_NETWORK.gateway}:${CONTROLLER_PORT}`;
  const controllerUrl = `http://${controllerListen}`;
  const controllerLog = logFile(stateDir, 'controller');
  progress(`starting controller at ${controllerUrl} (log: ${controllerLog})`);
  const controllerArgs = [
    CHIPMUNK_BIN, 'controller', '--listen', controllerListen, '--store', `sqlite:${join(stateDir, 'controller.db')}`, '--token-file', tokenFile,
    '--gateway', `http://${gatewayApi}`, '--gateway-host', LOCAL_GATEWAY_HOST,
    '--checkpoint-dir', join(stateDir, 'checkpoints'),
    ...(opts.nodeLeaseMs !== undefined ? ['--node-lease', `${opts.nodeLeaseMs}ms`] : []),
    // Containers' cluster addresses follow them: routed on this machine and in every test host at each move.
    '--address-routes', await writeAddressRoutesScript(join(stateDir, 'address-routes.sh'), testHosts(opts.nodes)),
  ];
  const controller = await spawnDaemon(process.execPath, controllerArgs, controllerLog, daemonEnv(faultsEnabled));
  const state: LocalClusterState = {
    controllerUrl,
    tokenFile,
    controllerPid: controller.pid!,
    gatewayPid: gateway.pid!,
    gatewayUrl: `http://${gatewayApi}`,
    nodes: [],
    controllerArgs,
    gatewayArgs,
    faultsEnabled,
    status: 'starting',
  };
  await writeClusterState(stateDir, state);
  try {
    await startAgents(state, { ...opts, stateDir, runDir, progress }, failOnExit(controller, 'controller', controllerLog), token);
  } catch (err) {
    throw withCleanupHint(err);
  }
  state.status = 'ready';
  await writeClusterState(stateDir, state);
  return { state, alreadyUp: false };
}

/** What every daemon of the cluster gets in its environment. */
function daemonEnv(faultsEnabled: boolean): Record<string, string> {
  return faultsEnabled ? { CHIPMUNK_ENABLE_FAULTS: '1' } : {};
}

/** Half a cluster is running now: the error must say how to get rid of it. */
function withCleanupHint(err: unknown): ChipmunkError {
  const e = toChipmunkError(err);
  if (e.message.includes('cluster down')) return e;
  return new ChipmunkError(e.code, `${e.message}; run 'chipmunk cluster down' to clean up`, { status: e.status, details: e.details });
}

/** Creates the test hosts, starts an agent in each, and waits until the whole cluster is ready. */
async function startAgents(
  state: LocalClusterState,
  opts: { nodes: number; stateDir: string; runDir: string; progress: (message: string) => void },
  controllerExit: Promise<never>,
  token: string,
): Promise<void> {
  const { stateDir, runDir, progress } = opts;
  const exits = [controllerExit];
  for (let i = 1; i <= opts.nodes; i++) {
    const name = nodeName(i);
    const address = nodeAddress(i);
    progress(`creating test host ${name} (${address})`);
    const host = await createTestHost(LOCAL_NETWORK, name, address);
    // The gateway (on this machine) reaches containers at their own address: no published port needed.
    await routeContainerSubnet(nodeContainerSubnet(i), address, LOCAL_NETWORK.bridge);
    const agent = await spawnAgent(state, { index: i, stateDir, runDir, netns: host.netns, progress });
    state.nodes.push({ name, address, netns: host.netns, agentPid: agent.pid! });
    await writeClusterState(stateDir, state);
    const agentLog = logFile(stateDir, `agent-${name}`);
    exits.push(failOnExit(agent, `agent ${name}`, agentLog));
  }

  progress('waiting for the controller and every agent to be ready');
  const stopWaiting = new AbortController();
  try {
    await Promise.race([waitUntilReady(state, token, stateDir, READY_TIMEOUT_MS, stopWaiting.signal), ...exits]);
  } finally {
    stopWaiting.abort();
  }
}

/** Starts node I's agent inside its test host (nsenter execs it: the PID is the agent's). */
export async function spawnAgent(
  state: LocalClusterState,
  opts: { index: number; stateDir: string; runDir: string; netns: string; progress: (message: string) => void },
): Promise<ChildProcess> {
  const name = nodeName(opts.index);
  const dataDir = nodeDataDir(opts.stateDir, name);
  const agentRunDir = nodeRunDir(opts.runDir, name);
  await mkdir(dataDir, { recursive: true });
  await mkdir(agentRunDir, { recursive: true });
  const agentLog = logFile(opts.stateDir, `agent-${name}`);
  opts.progress(`starting agent ${name} (log: ${agentLog})`);
  return spawnDaemon(
    'nsenter',
    [
      `--net=${netnsPath(opts.netns)}`,
      process.execPath,
      CHIPMUNK_BIN,
      'agent',
      '--node', name,
      '--listen', `${nodeAddress(opts.index)}:${AGENT_PORT}`,
      '--controller', state.controllerUrl,
      '--token-file', state.tokenFile,
      '--subnet', nodeContainerSubnet(opts.index),
      '--data-dir', dataDir,
      '--run-dir', agentRunDir,
    ],
    agentLog,
    daemonEnv(state.faultsEnabled === true),
  );
}

async function checkExistingCluster(existing: LocalClusterState, nodes: number, stateDir: string): Promise<LocalClusterState> {
  if (existing.status !== 'ready') {
    throw new ConflictError(
      `a previous 'chipmunk cluster up' did not finish (logs in ${join(stateDir, 'logs')}): run 'chipmunk cluster down' first`,
      { stateDir },
    );
  }
  if (!(await isRunning(existing.controllerPid))) {
    throw new ConflictError(
      `the local cluster's controller (pid ${existing.controllerPid}) is not running: run 'chipmunk cluster down', then 'chipmunk cluster up'`,
      { stateDir },
    );
  }
  if (existing.nodes.length !== nodes) {
    throw new ConflictError(
      `the local cluster is up with ${existing.nodes.length} nodes, not ${nodes}: run 'chipmunk cluster down' first`,
      { nodes: existing.nodes.length },
    );
  }
  return existing;
}

export async function answersHealthz(url: string): Promise<boolean> {
  try {
    await new ApiClient({ baseUrl: url, token: '', timeoutMs: 2_000 }).get('/healthz');
    return true;
  } catch {
    return false;
  }
}

/** Until the controller and every agent answer /healthz and every node shows as ready in the controller. */
async function waitUntilReady(state: LocalClusterState, token: string, stateDir: string, timeoutMs: number, signal: AbortSignal): Promise<void> {
  const controller = new ControllerClient({ urls: [state.controllerUrl], token, timeoutMs: 2_000 });
  const deadline = Date.now() + timeoutMs;
  let waitingFor = 'controller';
  let log = logFile(stateDir, 'controller');
  while (Date.now() < deadline && !signal.aborted) {
    if (await answersHealthz(state.controllerUrl)) {
      const notReady = await firstNodeNotReady(state, controller);
      if (notReady === undefined) return;
      waitingFor = `agent ${notReady}`;
      log = logFile(stateDir, `agent-${notReady}`);
    }
    await sleep(READY_POLL_MS);
  }
  throw new UnavailableError(`${waitingFor} not ready after ${timeoutMs / 1000} s: read ${log}, then run 'chipmunk cluster down'`, {
    logPath: log,
  });
}

async function firstNodeNotReady(state: LocalClusterState, controller: ControllerClient): Promise<string | undefined> {
  let views: NodeView[] = [];
  try {
    views = await controller.nodes();
  } catch (err) {
    // A wrong token will not fix itself: say so now rather than after the timeout.
    if (err instanceof ChipmunkError && err.code === 'CHIPMUNK_UNAUTHORIZED') throw err;
  }
  for (const node of state.nodes) {
    if (!(await answersHealthz(`http://${node.address}:${AGENT_PORT}`))) return node.name;
    if (views.find((view) => view.name === node.name)?.status !== 'ready') return node.name;
  }
  return undefined;
}
