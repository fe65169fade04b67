/**
 * The local cluster with no single point of failure (`cluster up --ha`): every test host runs an
 * etcd member and a controller beside its agent, so killing a node (`cluster kill NODE`) takes
 * down its share of the control plane with it, as a power loss would. The controllers elect their
 * leader on the 3 (or N) member etcd; each serves a checkpoint store replica and publishes its
 * URL (its --advertise-url) there, which is how the others know it: no peer list is given. The
 * gateway stays on this machine.
 */
import { type ChildProcess } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { CapabilityMissingError, UnavailableError } from '../shared/errors.js';
import { runUnchecked } from '../shared/exec.js';
import { failOnExit, spawnDaemon } from './processes.js';
import { CHIPMUNK_BIN, GATEWAY_API_PORT, LOCAL_GATEWAY_HOST, LOCAL_NETWORK, controlPlaneDataDir, daemonEnv, logFile, writeClusterState, type LocalClusterNode, type LocalClusterState } from './state.js';
import { netnsPath } from './testhost.js';

export const ETCD_CLIENT_PORT = 2379;
const ETCD_PEER_PORT = 2380;
export const HA_CONTROLLER_PORT = 7400;
/** Node leases of 1 s need etcd leases of 1 s, which etcd grants only with an election timeout of 500 ms or less. */
const ETCD_ELECTION_TIMEOUT_MS = 500;
const ETCD_HEARTBEAT_MS = 100;
const ETCD_READY_TIMEOUT_MS = 30_000;
/** The controllers' keys in etcd. */
const ETCD_NAMESPACE = '/chipmunk';

export interface HaMember {
  name: string;
  address: string;
  netns: string;
}

export function haControllerUrl(address: string): string {
  return `http://${address}:${HA_CONTROLLER_PORT}`;
}

/** The store spec every controller of the cluster is given. */
export function etcdStoreSpec(members: HaMember[]): string {
  return `etcd://${members.map((m) => `${m.address}:${ETCD_CLIENT_PORT}`).join(',')}${ETCD_NAMESPACE}`;
}

/**
 * Starts MEMBER's etcd inside its test host. The initial cluster names every member; etcd reads it
 * only when its data directory is new, so the same command line brings a killed member back.
 */
function spawnEtcdMember(member: HaMember, members: HaMember[], dataDir: string, log: string): Promise<ChildProcess> {
  const peer = (m: HaMember) => `http://${m.address}:${ETCD_PEER_PORT}`;
  const client = `http://${member.address}:${ETCD_CLIENT_PORT}`;
  return spawnDaemon('nsenter', [
    `--net=${netnsPath(member.netns)}`,
    'etcd',
    '--name', member.name,
    '--data-dir', dataDir,
    '--listen-client-urls', client,
    '--advertise-client-urls', client,
    '--listen-peer-urls', peer(member),
    '--initial-advertise-peer-urls', peer(member),
    '--initial-cluster', members.map((m) => `${m.name}=${peer(m)}`).join(','),
    '--initial-cluster-token', 'chipmunk-local-cluster',
    '--initial-cluster-state', 'new',
    '--election-timeout', String(ETCD_ELECTION_TIMEOUT_MS),
    '--heartbeat-interval', String(ETCD_HEARTBEAT_MS),
  ], log);
}

/** `--ha` needs Debian's etcd-server (scripts/setup.sh installs it): say so before anything starts. */
export async function assertEtcdInstalled(): Promise<void> {
  const found = await runUnchecked('etcd', ['--version']).catch(() => ({ code: 127 }));
  if (found.code !== 0) {
    throw new CapabilityMissingError("'cluster up --ha' runs an etcd member on every node, and etcd is not installed: run 'npm run setup' (it installs Debian's etcd-server)");
  }
}

/** Until a majority of the members answer /health: before that no controller can elect a leader. */
async function waitForEtcd(members: HaMember[], log: (member: HaMember) => string): Promise<void> {
  const deadline = Date.now() + ETCD_READY_TIMEOUT_MS;
  const majority = Math.floor(members.length / 2) + 1;
  for (;;) {
    const healthy = (await Promise.all(members.map(answersHealth))).filter(Boolean).length;
    if (healthy >= majority) return;
    if (Date.now() > deadline) {
      throw new UnavailableError(`etcd is not healthy after ${ETCD_READY_TIMEOUT_MS / 1000} s (${healthy} of ${members.length} members answer): read ${log(members[0]!)}`, {
        logPath: log(members[0]!),
      });
    }
    await sleep(250);
  }
}

async function answersHealth(member: HaMember): Promise<boolean> {
  try {
    const res = await fetch(`http://${member.address}:${ETCD_CLIENT_PORT}/health`, { signal: AbortSignal.timeout(1_000) });
    return res.ok && ((await res.json()) as { health?: string }).health === 'true';
  } catch {
    return false;
  }
}

export interface HaControllerArgs {
  member: HaMember;
  members: HaMember[];
  dataDir: string;
  tokenFile: string;
  gatewayApi: string;
  gatewayHost: string;
  nodeLeaseMs?: number;
  leaderLeaseMs?: number;
  /** The controller's --address-routes command (routes.ts), if any. */
  addressRoutes?: string;
  chipmunkBin: string;
}

/** The command line (after the node binary) of MEMBER's controller; `cluster revive` uses it again. */
export function haControllerArgs(opts: HaControllerArgs): string[] {
  const url = haControllerUrl(opts.member.address);
  return [
    opts.chipmunkBin, 'controller',
    '--node', opts.member.name,
    '--listen', `${opts.member.address}:${HA_CONTROLLER_PORT}`,
    '--advertise-url', url,
    '--store', etcdStoreSpec(opts.members),
    '--checkpoint-dir', join(opts.dataDir, 'checkpoints'),
    '--token-file', opts.tokenFile,
    '--gateway', `http://${opts.gatewayApi}`, '--gateway-host', opts.gatewayHost,
    ...(opts.nodeLeaseMs !== undefined ? ['--node-lease', `${opts.nodeLeaseMs}ms`] : []),
    ...(opts.leaderLeaseMs !== undefined ? ['--leader-lease', `${opts.leaderLeaseMs}ms`] : []),
    ...(opts.addressRoutes !== undefined ? ['--address-routes', opts.addressRoutes] : []),
  ];
}

/** Starts a controller inside MEMBER's test host with ARGS (from haControllerArgs). */
async function spawnHaController(member: HaMember, args: string[], dataDir: string, log: string, env: Record<string, string>): Promise<ChildProcess> {
  await mkdir(join(dataDir, 'checkpoints'), { recursive: true });
  return spawnDaemon('nsenter', [`--net=${netnsPath(member.netns)}`, process.execPath, ...args], log, env);
}

/** HA: an etcd member in every test host, then (once etcd has a majority) a controller in each. */
export async function startControlPlane(
  state: LocalClusterState,
  opts: { stateDir: string; nodeLeaseMs?: number; leaderLeaseMs?: number; addressRoutes?: string; progress: (message: string) => void },
): Promise<Promise<never>[]> {
  const exits: Promise<never>[] = [];
  for (const node of state.nodes) {
    opts.progress(`starting etcd member ${node.name} (log: ${logFile(opts.stateDir, `etcd-${node.name}`)})`);
    const etcd = await spawnNodeEtcd(state, node, opts.stateDir);
    exits.push(failOnExit(etcd, `etcd member ${node.name}`, logFile(opts.stateDir, `etcd-${node.name}`)));
  }
  await waitForEtcd(state.nodes, (member) => logFile(opts.stateDir, `etcd-${member.name}`));
  for (const node of state.nodes) {
    node.controllerArgs = haControllerArgs({
      member: node,
      members: state.nodes,
      dataDir: controlPlaneDataDir(opts.stateDir, node.name),
      tokenFile: state.tokenFile,
      gatewayApi: `${LOCAL_NETWORK.gateway}:${GATEWAY_API_PORT}`,
      gatewayHost: LOCAL_GATEWAY_HOST,
      ...(opts.nodeLeaseMs !== undefined ? { nodeLeaseMs: opts.nodeLeaseMs } : {}),
      ...(opts.leaderLeaseMs !== undefined ? { leaderLeaseMs: opts.leaderLeaseMs } : {}),
      ...(opts.addressRoutes !== undefined ? { addressRoutes: opts.addressRoutes } : {}),
      chipmunkBin: CHIPMUNK_BIN,
    });
    opts.progress(`starting controller ${node.name} at ${haControllerUrl(node.address)} (log: ${logFile(opts.stateDir, `controller-${node.name}`)})`);
    const controller = await spawnNodeController(state, node, opts.stateDir);
    exits.push(failOnExit(controller, `controller ${node.name}`, logFile(opts.stateDir, `controller-${node.name}`)));
  }
  await writeClusterState(opts.stateDir, state);
  return exits;
}

/** HA: NODE's etcd member, in its test host; its data stays in the node's data dir across kills. */
export async function spawnNodeEtcd(state: LocalClusterState, node: LocalClusterNode, stateDir: string): Promise<ChildProcess> {
  const dataDir = join(controlPlaneDataDir(stateDir, node.name), 'etcd');
  await mkdir(dataDir, { recursive: true, mode: 0o700 });
  const etcd = await spawnEtcdMember(node, state.nodes, dataDir, logFile(stateDir, `etcd-${node.name}`));
  node.etcdPid = etcd.pid!;
  return etcd;
}

/** HA: NODE's controller, in its test host, with the command line it was first started with. */
export async function spawnNodeController(state: LocalClusterState, node: LocalClusterNode, stateDir: string): Promise<ChildProcess> {
  const controller = await spawnHaController(node, node.controllerArgs!, controlPlaneDataDir(stateDir, node.name), logFile(stateDir, `controller-${node.name}`), daemonEnv(state.faultsEnabled === true));
  node.controllerPid = controller.pid!;
  return controller;
}
