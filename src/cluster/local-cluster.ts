/**
 * The local cluster: a controller on the machine (with `--ha`: an etcd member and a controller in
 * every test host, ha.ts) and N agents, each in its own test host, all on one machine. `clusterUp` starts them as detached background processes (they outlive the
 * CLI) and records what it started in STATEDIR/cluster.json, which `clusterDown` and the CLI's
 * controller lookup read.
 */
import { type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmod, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { ChipmunkError, ConflictError, InvalidInputError, UnavailableError, toChipmunkError } from '../shared/errors.js';
import { ControllerClient } from '../shared/controller-client.js';
import { ApiClient } from '../shared/http.js';
import type { NodeView } from '../shared/protocol.js';
import { assertEtcdInstalled, haControllerUrl, startControlPlane } from './ha.js';
import { failOnExit, isRunning, spawnDaemon } from './processes.js';
import { routeContainerSubnet, TEST_RANGE, writeAddressRoutesScript, type RoutedHost } from './routes.js';
import {
  AGENT_PORT,
  CHIPMUNK_BIN,
  CONTROLLER_PORT,
  DEFAULT_RUN_DIR,
  DEFAULT_STATE_DIR,
  GATEWAY_API_PORT,
  LOCAL_GATEWAY_HOST,
  LOCAL_NETWORK,
  MACHINE_NETNS,
  MAX_NODES,
  READY_TIMEOUT_MS,
  READY_POLL_MS,
  daemonEnv,
  logFile,
  nodeAddress,
  nodeContainerSubnet,
  nodeDataDir,
  nodeName,
  nodeRunDir,
  readClusterState,
  writeClusterState,
  type ClusterUpOptions,
  type ClusterUpResult,
  type LocalClusterState,
  type WritableLayerKind,
} from './state.js';
import { attachOwnNetns, createTestHost, ensureBridge, netnsPath, testHostNetns } from './testhost.js';

/** The test hosts `cluster up` makes, known before they exist (the controllers start first). */
function testHosts(nodes: number): RoutedHost[] {
  return Array.from({ length: nodes }, (_, j) => ({ netns: netnsPath(testHostNetns(LOCAL_NETWORK, nodeName(j + 1))), address: nodeAddress(j + 1) }));
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
  if (existing) return { state: await checkExistingCluster(existing, opts, stateDir), alreadyUp: true };
  if (opts.ha) await assertEtcdInstalled();

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

  // Containers' cluster addresses follow them: routed on this machine and in every test host at each move.
  if (opts.ha) await attachOwnNetns(MACHINE_NETNS);
  const addressRoutes = await writeAddressRoutesScript(join(stateDir, 'address-routes.sh'), testHosts(opts.nodes), opts.ha ? netnsPath(MACHINE_NETNS) : undefined);

  const gatewayApi = `${LOCAL_NETWORK.gateway}:${GATEWAY_API_PORT}`;
  const gatewayLog = logFile(stateDir, 'gateway');
  progress(`starting gateway (routes on ${LOCAL_GATEWAY_HOST}, API at http://${gatewayApi}; log: ${gatewayLog})`);
  const faultsEnabled = process.env.CHIPMUNK_ENABLE_FAULTS === '1';
  const gatewayArgs = ['--max-semi-space-size=64', CHIPMUNK_BIN, 'gateway', '--api', gatewayApi, '--route-host', LOCAL_GATEWAY_HOST, '--state', join(stateDir, 'gateway', 'routes.json'), '--token-file', tokenFile];
  const gateway = await spawnDaemon(process.execPath, gatewayArgs, gatewayLog, daemonEnv(faultsEnabled));
  if (opts.ha) {
    const controllerUrls = Array.from({ length: opts.nodes }, (_, i) => haControllerUrl(nodeAddress(i + 1)));
    const state: LocalClusterState = {
      controllerUrl: controllerUrls[0]!,
      controllerUrls,
      tokenFile,
      ha: true,
      gatewayPid: gateway.pid!,
      gatewayUrl: `http://${gatewayApi}`,
      nodes: [],
      gatewayArgs,
      faultsEnabled,
      ...(opts.writableLayer ? { writableLayer: opts.writableLayer } : {}),
      status: 'starting',
    };
    return finishUp(state, { ...opts, stateDir, runDir, progress, addressRoutes }, [], token);
  }
  const controllerListen = `${LOCAL_NETWORK.gateway}:${CONTROLLER_PORT}`;
  const controllerUrl = `http://${controllerListen}`;
  const controllerLog = logFile(stateDir, 'controller');
  progress(`starting controller at ${controllerUrl} (log: ${controllerLog})`);
  const controllerArgs = [
    CHIPMUNK_BIN, 'controller', '--listen', controllerListen, '--store', `sqlite:${join(stateDir, 'controller.db')}`, '--token-file', tokenFile,
    '--gateway', `http://${gatewayApi}`, '--gateway-host', LOCAL_GATEWAY_HOST,
    '--checkpoint-dir', join(stateDir, 'checkpoints'),
    ...(opts.nodeLeaseMs !== undefined ? ['--node-lease', `${opts.nodeLeaseMs}ms`] : []),
    '--address-routes', addressRoutes,
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
    ...(opts.writableLayer ? { writableLayer: opts.writableLayer } : {}),
    status: 'starting',
  };
  return finishUp(state, { ...opts, stateDir, runDir, progress, addressRoutes }, [failOnExit(controller, 'controller', controllerLog)], token);
}

/** Starts the nodes (and, HA, their etcd members and controllers); ready once every agent is. */
async function finishUp(state: LocalClusterState, opts: NodesUpOptions, exits: Promise<never>[], token: string): Promise<ClusterUpResult> {
  await writeClusterState(opts.stateDir, state);
  try {
    await startNodes(state, opts, exits, token);
  } catch (err) {
    throw withCleanupHint(err);
  }
  state.status = 'ready';
  await writeClusterState(opts.stateDir, state);
  return { state, alreadyUp: false };
}


/** Half a cluster is running now: the error must say how to get rid of it. */
function withCleanupHint(err: unknown): ChipmunkError {
  const e = toChipmunkError(err);
  if (e.message.includes('cluster down')) return e;
  return new ChipmunkError(e.code, `${e.message}; run 'chipmunk cluster down' to clean up`, { status: e.status, details: e.details });
}

interface NodesUpOptions {
  nodes: number;
  nodeLeaseMs?: number;
  leaderLeaseMs?: number;
  stateDir: string;
  runDir: string;
  progress: (message: string) => void;
  /** The controllers' --address-routes command. */
  addressRoutes: string;
}

/**
 * Creates the test hosts; HA: starts an etcd member in each, then a controller in each; then an
 * agent in each. Waits until the whole cluster is ready.
 */
async function startNodes(state: LocalClusterState, opts: NodesUpOptions, exits: Promise<never>[], token: string): Promise<void> {
  const { stateDir, runDir, progress } = opts;
  for (let i = 1; i <= opts.nodes; i++) {
    const name = nodeName(i);
    const address = nodeAddress(i);
    progress(`creating test host ${name} (${address})`);
    const host = await createTestHost(LOCAL_NETWORK, name, address);
    // The gateway (on this machine) reaches containers at their own address: no published port needed.
    await routeContainerSubnet(nodeContainerSubnet(i), address, LOCAL_NETWORK.bridge);
    state.nodes.push({ name, address, netns: host.netns, agentPid: 0 });
    await writeClusterState(stateDir, state);
  }
  if (state.ha) exits.push(...(await startControlPlane(state, opts)));
  for (const [i, node] of state.nodes.entries()) {
    const agent = await spawnAgent(state, { index: i + 1, stateDir, runDir, netns: node.netns, progress });
    node.agentPid = agent.pid!;
    await writeClusterState(stateDir, state);
    exits.push(failOnExit(agent, `agent ${node.name}`, logFile(stateDir, `agent-${node.name}`)));
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
      '--controller', (state.controllerUrls ?? [state.controllerUrl]).join(','),
      '--token-file', state.tokenFile,
      '--subnet', nodeContainerSubnet(opts.index),
      '--data-dir', dataDir,
      '--run-dir', agentRunDir,
      ...(state.writableLayer ? ['--writable-layer', state.writableLayer] : []),
    ],
    agentLog,
    daemonEnv(state.faultsEnabled === true),
  );
}

async function checkExistingCluster(existing: LocalClusterState, opts: ClusterUpOptions, stateDir: string): Promise<LocalClusterState> {
  const { nodes } = opts;
  const ha = opts.ha ?? false;
  if (existing.status !== 'ready') {
    throw new ConflictError(
      `a previous 'chipmunk cluster up' did not finish (logs in ${join(stateDir, 'logs')}): run 'chipmunk cluster down' first`,
      { stateDir },
    );
  }
  if ((existing.ha ?? false) !== ha) {
    throw new ConflictError(`the local cluster is up ${existing.ha ? 'with' : 'without'} --ha: run 'chipmunk cluster down' first`, { ha: existing.ha ?? false });
  }
  const controllerPids = existing.ha ? existing.nodes.flatMap((n) => (n.controllerPid ? [n.controllerPid] : [])) : [existing.controllerPid ?? 0];
  const running = await Promise.all(controllerPids.map((pid) => isRunning(pid)));
  if (!running.some(Boolean)) {
    throw new ConflictError(
      `the local cluster's controller${controllerPids.length > 1 ? 's' : ''} (pid ${controllerPids.join(', ')}) ${controllerPids.length > 1 ? 'are' : 'is'} not running: run 'chipmunk cluster down', then 'chipmunk cluster up'`,
      { stateDir },
    );
  }
  if (existing.nodes.length !== nodes) {
    throw new ConflictError(
      `the local cluster is up with ${existing.nodes.length} nodes, not ${nodes}: run 'chipmunk cluster down' first`,
      { nodes: existing.nodes.length },
    );
  }
  const layer = (s: { writableLayer?: WritableLayerKind }) => s.writableLayer ?? 'directory';
  if (layer(existing) !== layer(opts)) {
    throw new ConflictError(`the local cluster's agents make ${layer(existing)} writable layers, not ${layer(opts)}: run 'chipmunk cluster down' first`, {
      writableLayer: layer(existing),
    });
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

/**
 * Until the controller (HA: a leader) and every agent answer /healthz and every node shows as
 * ready in the controller.
 */
async function waitUntilReady(state: LocalClusterState, token: string, stateDir: string, timeoutMs: number, signal: AbortSignal): Promise<void> {
  const urls = state.controllerUrls ?? [state.controllerUrl];
  const controller = new ControllerClient({ urls, token, timeoutMs: 2_000, leaderWaitMs: 0 });
  const deadline = Date.now() + timeoutMs;
  let waitingFor = state.ha ? 'a controller leader' : 'controller';
  let log = logFile(stateDir, state.ha ? `controller-${state.nodes[0]?.name}` : 'controller');
  while (Date.now() < deadline && !signal.aborted) {
    if ((await Promise.all(urls.map(answersHealthz))).some(Boolean) && (!state.ha || (await hasLeader(controller)))) {
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

async function hasLeader(controller: ControllerClient): Promise<boolean> {
  return (await controller.controllers().catch(() => [])).some((c) => c.leader && c.term !== undefined);
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
