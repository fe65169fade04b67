/**
 * Faults on purpose in the local cluster: `kill` and `revive` of a test host (power loss and
 * return), of the controller or of the gateway (a crash and a restart with the same arguments,
 * state dir and store). An operator trying chipmunk can do by hand what the fault harness does.
 */
import { setTimeout as sleep } from 'node:timers/promises';

import { ConflictError, NotFoundError, UnavailableError } from '../shared/errors.js';
import { spawnNodeController, spawnNodeEtcd } from './ha.js';
import { answersHealthz, spawnAgent } from './local-cluster.js';
import {
  AGENT_PORT,
  DEFAULT_RUN_DIR,
  DEFAULT_STATE_DIR,
  READY_POLL_MS,
  READY_TIMEOUT_MS,
  logFile,
  nodeCgroup,
  readClusterState,
  writeClusterState,
  type LocalClusterDirs,
  type LocalClusterNode,
  type LocalClusterState,
} from './state.js';
import { isOurDaemon, isRunning, spawnDaemon } from './processes.js';
import { killAllInCgroup, killAllInHost, listNetns } from './testhost.js';

/** What `kill` and `revive` take besides node names. */
export const CLUSTER_DAEMONS = ['controller', 'gateway'] as const;
export type ClusterDaemon = (typeof CLUSTER_DAEMONS)[number];

export interface KillResult {
  /** The node, `controller` or `gateway`. */
  target: string;
  /** Kept for scripts written when only nodes could be killed. */
  node: string;
  killedPids: number[];
  /** When it died (ms since the epoch): benchmarks measure recovery from here. */
  killedAt: number;
}

export interface ReviveResult {
  target: string;
  node: string;
  pid: number;
  /** The revived node's agent (same as pid); absent for the controller and the gateway. */
  agentPid?: number;
}

function isDaemon(target: string): target is ClusterDaemon {
  return (CLUSTER_DAEMONS as readonly string[]).includes(target);
}

async function requireState(stateDir: string): Promise<LocalClusterState> {
  const state = await readClusterState(stateDir);
  if (!state) throw new ConflictError("no local cluster is up: run 'chipmunk cluster up' first");
  return state;
}

function requireNode(state: LocalClusterState, node: string): LocalClusterNode {
  const entry = state.nodes.find((n) => n.name === node);
  if (!entry) {
    throw new NotFoundError(`no node '${node}' in the local cluster (${[...state.nodes.map((n) => n.name), ...CLUSTER_DAEMONS].join(', ')})`, { node });
  }
  return entry;
}

/** The daemon's PID, command line (after the node binary) and health URL as recorded by `cluster up`. */
function daemonOf(state: LocalClusterState, daemon: ClusterDaemon): { pid: number | undefined; args: string[]; url: string } {
  if (state.ha && daemon === 'controller') {
    throw new ConflictError("an HA cluster runs a controller on every node: 'chipmunk cluster kill NODE' takes one down with its node (see 'chipmunk node ls' for the leader's)", { daemon });
  }
  const args = daemon === 'controller' ? state.controllerArgs : state.gatewayArgs;
  const pid = daemon === 'controller' ? state.controllerPid : state.gatewayPid;
  const url = daemon === 'controller' ? state.controllerUrl : state.gatewayUrl;
  if (!args || !url) {
    throw new ConflictError(`this local cluster was started by an older chipmunk that did not record how it started the ${daemon}: run 'chipmunk cluster down', then 'chipmunk cluster up'`);
  }
  return { pid, args, url };
}

/**
 * Kills TARGET with SIGKILL. A node: a power loss on its test host, every process of it (agent,
 * log writers, CRIU daemons) and of its containers' namespaces at once; nothing is cleaned up,
 * the host, its files and runc's state stay, as a machine's disk would. `controller` or
 * `gateway`: that one process.
 */
export async function clusterKill(target: string, dirs: LocalClusterDirs = {}): Promise<KillResult> {
  const state = await requireState(dirs.stateDir ?? DEFAULT_STATE_DIR);
  if (isDaemon(target)) {
    const { pid } = daemonOf(state, target);
    if (pid === undefined || !(await isOurDaemon(pid, [target]))) {
      throw new ConflictError(`the ${target} is not running (pid ${pid ?? 'unknown'}): 'chipmunk cluster revive ${target}' starts it`, { target });
    }
    const killedAt = Date.now();
    process.kill(pid, 'SIGKILL');
    // Gone once we return: callers measure from here and expect no answer from it.
    while (await isRunning(pid)) await sleep(20);
    return { target, node: target, killedPids: [pid], killedAt };
  }
  const entry = requireNode(state, target);
  const containerNetns = (await listNetns()).filter((netns) => netns.startsWith(`${entry.netns}-`));
  const killedAt = Date.now();
  const killed = await Promise.all([...[entry.netns, ...containerNetns].map((netns) => killAllInHost(netns)), killAllInCgroup(nodeCgroup(entry.name))]);
  return { target, node: target, killedPids: [...new Set(killed.flat())].sort((a, b) => a - b), killedAt };
}

/** Brings a killed node's agent, the controller or the gateway back; waits until it answers. */
export async function clusterRevive(target: string, dirs: LocalClusterDirs = {}): Promise<ReviveResult> {
  const stateDir = dirs.stateDir ?? DEFAULT_STATE_DIR;
  const state = await requireState(stateDir);
  const env: Record<string, string> = state.faultsEnabled ? { CHIPMUNK_ENABLE_FAULTS: '1' } : {};
  let pid: number;
  let url: string;
  let exited: () => boolean;
  if (isDaemon(target)) {
    const daemon = daemonOf(state, target);
    if (daemon.pid !== undefined && (await isOurDaemon(daemon.pid, [target]))) {
      throw new ConflictError(`the ${target} is up (pid ${daemon.pid}): only a killed ${target} can be revived`, { target });
    }
    const child = await spawnDaemon(process.execPath, daemon.args, logFile(stateDir, target), env);
    pid = child.pid!;
    if (target === 'controller') state.controllerPid = pid;
    else state.gatewayPid = pid;
    url = daemon.url;
    exited = () => child.exitCode !== null || child.signalCode !== null;
  } else {
    const entry = requireNode(state, target);
    if (await isOurDaemon(entry.agentPid, ['agent', target])) {
      throw new ConflictError(`node ${target} is up (agent pid ${entry.agentPid}): only a killed node can be revived`, { node: target });
    }
    const index = Number(target.slice('node'.length));
    // HA: the node's share of the control plane comes back first, as a rebooted machine's would.
    if (state.ha) {
      await spawnNodeEtcd(state, entry, stateDir);
      await spawnNodeController(state, entry, stateDir);
    }
    const agent = await spawnAgent(state, { index, stateDir, runDir: dirs.runDir ?? DEFAULT_RUN_DIR, netns: entry.netns, progress: () => {} });
    pid = agent.pid!;
    entry.agentPid = pid;
    url = `http://${entry.address}:${AGENT_PORT}`;
    exited = () => agent.exitCode !== null || agent.signalCode !== null;
  }
  await writeClusterState(stateDir, state);
  const deadline = Date.now() + READY_TIMEOUT_MS;
  while (!(await answersHealthz(url))) {
    if (exited() || Date.now() > deadline) {
      const log = logFile(stateDir, isDaemon(target) ? target : `agent-${target}`);
      throw new UnavailableError(`the ${isDaemon(target) ? target : `agent of ${target}`} did not come back: read ${log}`, { target, logPath: log });
    }
    await sleep(READY_POLL_MS);
  }
  return { target, node: target, pid, ...(isDaemon(target) ? {} : { agentPid: pid }) };
}
