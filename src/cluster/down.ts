/**
 * `cluster down`: takes the local cluster down, including what a crashed or half-started one
 * left behind (processes, runc containers, mounts, namespaces, the bridge, the state), mounts
 * before directories.
 */
import { stat } from 'node:fs/promises';
import { join } from 'node:path';

import { ChipmunkError } from '../shared/errors.js';
import { run, runUnchecked } from '../shared/exec.js';
import { removeTree } from '../shared/remove-tree.js';
import { DEFAULT_RUN_DIR, DEFAULT_STATE_DIR, LOCAL_NETWORK, MACHINE_NETNS, nodeCgroup, nodeDataDir, nodeRunDir, readClusterState, type LocalClusterDirs } from './state.js';
import { stopDaemon } from './processes.js';
import { bridgeExists, deleteBridge, deleteNetns, deleteTestHost, killAllInCgroup, killAllInHost, listNetns, testHostNetns } from './testhost.js';

export interface ClusterDownResult {
  /** Something of a local cluster was found (and removed). */
  wasUp: boolean;
  /** Cleanup steps that failed without stopping the rest, e.g. "podman image unmount --all: ...". */
  warnings: string[];
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * Takes the local cluster down, including what a crashed or half-started one left: processes,
 * containers, mounts, namespaces, the bridge and the state. Safe to run again at any point.
 */
export async function clusterDown(dirs: LocalClusterDirs = {}): Promise<ClusterDownResult> {
  const stateDir = dirs.stateDir ?? DEFAULT_STATE_DIR;
  const runDir = dirs.runDir ?? DEFAULT_RUN_DIR;
  const state = await readClusterState(stateDir);
  const allNetns = await listNetns();
  // Test hosts found by name too: a crash may have left some that the state file does not list.
  const nodeNames = new Set(state?.nodes.map((n) => n.name) ?? []);
  for (const netns of allNetns) {
    const node = netns.slice(LOCAL_NETWORK.netnsPrefix.length);
    if (netns.startsWith(LOCAL_NETWORK.netnsPrefix) && /^node\d+$/.test(node)) nodeNames.add(node);
  }
  const wasUp =
    state !== undefined || nodeNames.size > 0 || allNetns.includes(MACHINE_NETNS) || (await bridgeExists(LOCAL_NETWORK)) || (await exists(stateDir)) || (await exists(runDir));
  if (!wasUp) return { wasUp: false, warnings: [] };

  const warnings: string[] = [];
  // The controller goes first: stopped agents look like dead nodes, and it would fail their containers over.
  if (state?.controllerPid !== undefined) await stopDaemon(state.controllerPid, ['controller']);
  for (const node of state?.nodes ?? []) if (node.controllerPid !== undefined) await stopDaemon(node.controllerPid, ['controller']);
  for (const name of nodeNames) {
    const agentPid = state?.nodes.find((n) => n.name === name)?.agentPid;
    if (agentPid !== undefined) await stopDaemon(agentPid, ['agent', name]);
    await killAllInHost(testHostNetns(LOCAL_NETWORK, name));
    const containerNetns = allNetns.filter((netns) => netns.startsWith(`${testHostNetns(LOCAL_NETWORK, name)}-`));
    for (const netns of containerNetns) await killAllInHost(netns);
    await killAllInCgroup(nodeCgroup(name));
    await deleteRuncContainers(join(nodeRunDir(runDir, name), 'runc'), warnings);
    await unmountUnder([nodeDataDir(stateDir, name), nodeRunDir(runDir, name)]);
    for (const netns of containerNetns) await deleteNetns(netns);
    await deleteTestHost(LOCAL_NETWORK, name);
  }
  if (state?.gatewayPid !== undefined) await stopDaemon(state.gatewayPid, ['gateway']);

  const podman = await runUnchecked('podman', ['image', 'unmount', '--all']).catch((err: Error) => ({ code: 1, stderr: err.message }));
  if (podman.code !== 0) warnings.push(`podman image unmount --all: ${podman.stderr.trim()}`);
  // Mounts before directories: removeTree does not cross into file systems, so it would leave them.
  await unmountUnder([join(stateDir, 'nodes'), runDir]);
  await deleteBridge(LOCAL_NETWORK);
  await deleteNetns(MACHINE_NETNS);
  await removeTree(runDir);
  await removeTree(stateDir);
  return { wasUp: true, warnings };
}

async function deleteRuncContainers(runcRoot: string, warnings: string[]): Promise<void> {
  if (!(await exists(runcRoot))) return;
  const list = await runUnchecked('runc', ['--root', runcRoot, 'list', '-q']);
  if (list.code !== 0) {
    warnings.push(`runc --root ${runcRoot} list: ${list.stderr.trim()}`);
    return;
  }
  for (const id of list.stdout.split('\n').filter(Boolean)) {
    const res = await runUnchecked('runc', ['--root', runcRoot, 'delete', '-f', id]);
    if (res.code !== 0) warnings.push(`runc --root ${runcRoot} delete -f ${id}: ${res.stderr.trim()}`);
  }
}

/** findmnt -r writes special characters (space, backslash) as \xHH. */
function decodeMountPath(raw: string): string {
  return raw.replace(/\\x([0-9a-fA-F]{2})/g, (_, hex: string) => String.fromCharCode(parseInt(hex, 16)));
}

async function mountsUnder(dirs: string[]): Promise<string[]> {
  const { stdout } = await run('findmnt', ['-rn', '-o', 'TARGET'], { op: 'list mounts' });
  return stdout
    .split('\n')
    .filter(Boolean)
    .map(decodeMountPath)
    .filter((target) => dirs.some((dir) => target === dir || target.startsWith(`${dir}/`)));
}

const UNMOUNT_ROUNDS = 10;

/** Unmounts everything mounted at or below DIRS, deepest first; rounds because mounts can be stacked. */
async function unmountUnder(dirs: string[]): Promise<void> {
  for (let round = 0; round < UNMOUNT_ROUNDS; round++) {
    const targets = await mountsUnder(dirs);
    if (targets.length === 0) return;
    targets.sort((a, b) => b.split('/').length - a.split('/').length);
    for (const target of targets) {
      // A busy mount (a process still holding it) is detached lazily rather than left behind.
      if ((await runUnchecked('umount', [target])).code !== 0) await runUnchecked('umount', ['-l', target]);
    }
  }
  const left = await mountsUnder(dirs);
  if (left.length > 0) {
    throw new ChipmunkError('CHIPMUNK_RUNTIME_FAILED', `cannot unmount ${left.join(', ')}: check 'findmnt' and unmount by hand`, {
      details: { mounts: left },
    });
  }
}

