/**
 * What the local cluster records about itself (STATEDIR/cluster.json) and where its parts live:
 * names, addresses, directories and logs of its nodes, read by `up`, `down`, `kill`/`revive` and
 * the CLI's controller lookup.
 */
import { readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

import { REPO_ROOT } from './processes.js';
import type { TestNetwork } from './testhost.js';

/** An agent's `--writable-layer`. */
export type WritableLayerKind = 'directory' | 'image';

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
/**
 * With --ha, a handle (`ip netns attach`) of this machine's own network namespace: the controllers
 * run in test hosts, and the address routes script routes cluster addresses on the machine too.
 */
export const MACHINE_NETNS = `${LOCAL_NETWORK.netnsPrefix}machine`;
export const CONTROLLER_PORT = 7400;
export const GATEWAY_API_PORT = 7402;
/** Clients on this machine reach exposed services at 127.0.0.1:PORT. */
export const LOCAL_GATEWAY_HOST = '127.0.0.1';
export const AGENT_PORT = 7401;
/** Each node is a full agent process on this one machine; the address plan alone would allow 244. */
export const MAX_NODES = 50;

export const READY_TIMEOUT_MS = 60_000;
export const READY_POLL_MS = 250;

export const CHIPMUNK_BIN = join(REPO_ROOT, 'bin', 'chipmunk.mjs');

export interface LocalClusterNode {
  name: string;
  address: string;
  netns: string;
  agentPid: number;
  /** HA cluster: this node's etcd member and controller, and the controller's command line. */
  etcdPid?: number;
  controllerPid?: number;
  controllerArgs?: string[];
}

export interface LocalClusterState {
  /** The controller (HA: the first node's); `controllerUrls` lists them all. */
  controllerUrl: string;
  controllerUrls?: string[];
  tokenFile: string;
  /** The controller on this machine; none in an HA cluster, whose controllers run on the nodes. */
  controllerPid?: number;
  /** `cluster up --ha`: an etcd member and a controller on every node (ha.ts). */
  ha?: boolean;
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
  /** The agents' `--writable-layer` (revived agents get it too); unset: the agent's default (directory). */
  writableLayer?: WritableLayerKind;
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
  /** HA: how long a leader that cannot renew its lease keeps leading; a dead leader is replaced within about this long. */
  leaderLeaseMs?: number;
  /** An etcd member and a controller on every node instead of one controller on this machine (ha.ts). */
  ha?: boolean;
  /** New containers' writable layer on every node (`agent --writable-layer`). */
  writableLayer?: WritableLayerKind;
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

export function nodeName(i: number): string {
  return `node${i}`;
}

/** Node i is .(10+i) in the bridge's /24. */
export function nodeAddress(i: number): string {
  return `${LOCAL_NETWORK.gateway.split('.').slice(0, 3).join('.')}.${10 + i}`;
}

/** Node i's containers take addresses in 198.19.i.0/24, routed to its test host. */
export function nodeContainerSubnet(i: number): string {
  return `198.19.${i}.0/24`;
}

/**
 * HA: where a node's etcd member and controller keep their data. Beside the agent's data dir,
 * never inside it: the agent owns what is in its own (it clears its checkpoint staging at start,
 * which took a controller's checkpoint store with it when the two shared `nodes/nodeI/checkpoints`).
 */
export function controlPlaneDataDir(stateDir: string, node: string): string {
  return join(stateDir, 'control-plane', node);
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

/** What every daemon of the cluster gets in its environment. */
export function daemonEnv(faultsEnabled: boolean): Record<string, string> {
  return faultsEnabled ? { CHIPMUNK_ENABLE_FAULTS: '1' } : {};
}
