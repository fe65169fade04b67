/** `chipmunk cluster up|down|kill|revive`: the local cluster, test hosts on this machine. */
import type { Command } from 'commander';

import { CLUSTER_DAEMONS, clusterDown, clusterKill, clusterRevive, clusterUp, type LocalClusterState } from '../../cluster/index.js';
import { localClusterStateDir } from '../context.js';
import { addJsonOption, parseLeaderLease, parseNodeLease, parseNodeName, parsePositiveInt } from '../options.js';
import { printJson, renderTable } from '../output.js';

const DEFAULT_NODES = 2;

function describeCluster(state: LocalClusterState): string {
  const gateway = state.gatewayUrl ? `\ngateway: ${state.gatewayUrl} (pid ${state.gatewayPid})` : '';
  if (state.ha) {
    const rows = state.nodes.map((node) => [node.name, node.address, node.netns, String(node.agentPid), String(node.etcdPid ?? '-'), String(node.controllerPid ?? '-')]);
    const table = renderTable(['NODE', 'ADDRESS', 'NETNS', 'AGENT PID', 'ETCD PID', 'CONTROLLER PID'], rows);
    return `${table}\n\ncontrollers: ${(state.controllerUrls ?? []).join(', ')} (one leads: 'chipmunk node ls')${gateway}`;
  }
  const rows = state.nodes.map((node) => [node.name, node.address, node.netns, String(node.agentPid)]);
  return `${renderTable(['NODE', 'ADDRESS', 'NETNS', 'AGENT PID'], rows)}\n\ncontroller: ${state.controllerUrl} (pid ${state.controllerPid})${gateway}`;
}

export function registerClusterCommands(program: Command): void {
  const cluster = program.command('cluster').description('a local cluster: controller and agents in test hosts on this machine');

  addJsonOption(
    cluster
      .command('up')
      .description('start a controller and N agents, each agent in its own test host (network namespace)')
      .option('--nodes <n>', 'number of nodes', parsePositiveInt, DEFAULT_NODES)
      .option('--node-lease <duration>', 'how long a node may miss heartbeats before it is dead and its protected containers fail over (default 5s)', parseNodeLease)
      .option('--ha', 'no single point of failure: an etcd member and a controller on every node (use 3 nodes or more); they elect a leader')
      .option('--leader-lease <duration>', 'with --ha: how long a leader that cannot renew its lease keeps leading (default 2s)', parseLeaderLease),
  ).action(async (opts: { nodes: number; nodeLease?: number; ha?: boolean; leaderLease?: number; json?: boolean }) => {
    const { state, alreadyUp } = await clusterUp({
      nodes: opts.nodes,
      ...(opts.ha ? { ha: true } : {}),
      ...(opts.leaderLease !== undefined ? { leaderLeaseMs: opts.leaderLease } : {}),
      ...(opts.nodeLease !== undefined ? { nodeLeaseMs: opts.nodeLease } : {}),
      stateDir: localClusterStateDir(),
      onProgress: opts.json ? undefined : (message) => process.stderr.write(`${message}\n`),
    });
    if (opts.json) {
      printJson({ alreadyUp, ...state });
      return;
    }
    process.stdout.write(`${alreadyUp ? `local cluster already up with ${state.nodes.length} nodes` : 'local cluster up'}\n\n${describeCluster(state)}\n`);
  });

  addJsonOption(
    cluster.command('down').description('stop the local cluster and remove its containers, mounts, namespaces and state'),
  ).action(async (opts: { json?: boolean }) => {
    const result = await clusterDown({ stateDir: localClusterStateDir() });
    for (const warning of result.warnings) process.stderr.write(`warning: ${warning}\n`);
    if (opts.json) printJson(result);
    else process.stdout.write(result.wasUp ? 'local cluster is down\n' : 'no local cluster is up: nothing to do\n');
  });

  addJsonOption(
    cluster
      .command('kill')
      .description(
        'SIGKILL, for real: a node is a power loss on its test host (every process of it and of its containers at once); ' +
          "'controller' or 'gateway' kills that daemon",
      )
      .argument('<target>', `node name, or ${CLUSTER_DAEMONS.map((d) => `'${d}'`).join(' or ')}`, parseNodeName),
  ).action(async (target: string, opts: { json?: boolean }) => {
    const result = await clusterKill(target, { stateDir: localClusterStateDir() });
    if (opts.json) printJson(result);
    else process.stdout.write(`${target} killed (${result.killedPids.length} processes)\n`);
  });

  addJsonOption(
    cluster
      .command('revive')
      .description("bring a killed test host's agent, the controller or the gateway back (same arguments, state and store)")
      .argument('<target>', `node name, or ${CLUSTER_DAEMONS.map((d) => `'${d}'`).join(' or ')}`, parseNodeName),
  ).action(async (target: string, opts: { json?: boolean }) => {
    const result = await clusterRevive(target, { stateDir: localClusterStateDir() });
    if (opts.json) printJson(result);
    else process.stdout.write(`${target} is back (pid ${result.pid})\n`);
  });
}
