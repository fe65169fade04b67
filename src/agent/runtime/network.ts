/**
 * Container networking: one network namespace per container incarnation, wired with the CNI
 * plugins from Debian's containernetworking-plugins (bridge + host-local IPAM, then portmap for
 * published ports). The namespace is created under /var/run/netns so runc can be pointed at
 * it by path, and so a restore can put the container into a fresh namespace on the target.
 *
 * A container in a user namespace of its own cannot use that namespace: CRIU dumps it only if
 * every namespace of the container belongs to the container's user namespace, and restores it
 * into a user namespace it creates itself, which no namespace made beforehand can belong to.
 * So runc (or CRIU, on restore) makes the container's network namespace, and the one attached
 * here is a staging namespace: an OCI prestart hook (`interfaceMoveHook`), which runc runs once
 * the container's namespaces exist and before its processes run (on restore: before CRIU
 * restores their sockets), moves the attached interface into the container's namespace with
 * its address and default route. The staging namespace keeps the name, the CNI attachment
 * (address reservation, port mappings) and is what detach releases.
 *
 * A container with a cluster-wide address (ContainerSpec.address, kept across moves) has it as a
 * second, /32 address on its interface, beside the node's CNI address, and its node routes the
 * /32 to the CNI address (`routeClusterAddress`). Only once it runs (restored): packets for it
 * reach the node only after that, so none meets a namespace without the restored sockets, whose
 * kernel would reset the connection. Other nodes route it towards this node (README).
 *
 * Its published ports lead to that address too (portmap DNATs to it), and a connection through
 * one is SNATed to this node's address (`nodeAddress`): the container's end of it is then bound to
 * an address that moves with it and talks to a peer every node reaches, so CRIU keeps it across a
 * move, and the replies come back through this node, whose conntrack entry still translates
 * them for the client (the price: the container sees this node, not the client, as its peer).
 * Without a node address to SNAT to, published ports lead to the CNI address as before, and such
 * connections are reset before a move (connections.ts).
 */
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { leverOff } from '../../shared/downtime-levers.js';
import { RuntimeFailedError } from '../../shared/errors.js';
import { run, runUnchecked } from '../../shared/exec.js';
import type { ContainerSpec } from '../../shared/protocol.js';

export interface NetworkConfig {
  /** Unique per node: names the CNI network and its iptables chains. */
  networkName: string;
  /** Bridge inside this node's network namespace. */
  bridge: string;
  /** Container subnet of this node (CIDR), e.g. 198.19.1.0/24. */
  subnet: string;
  /** host-local IPAM state. */
  ipamDir: string;
  cniPath?: string;
  /** Run the plugins in this network namespace (path) instead of the current one. */
  hostNetns?: string;
  /** This node's address, which connections through published ports are SNATed to (top of this file). */
  nodeAddress?: string;
}

/** What of a container's spec its network attachment depends on. */
export type Published = Pick<ContainerSpec, 'ports' | 'address'>;

export interface Attachment {
  netns: string;
  ip: string;
}

const NETNS_DIR = '/var/run/netns';
/** The interface CNI creates in the container's namespace. */
const IFNAME = 'eth0';

/**
 * The prestart hook of a container in its own user namespace (top of this file): runc gives it
 * the container's state (with its pid) on stdin. Address and route are read from the staging
 * namespace before the move, which drops them. It runs inside a restore's frozen window (CRIU
 * waits for it), so it starts as few programs as it can: one `ip` reads address and route and
 * moves the interface, one more (through nsenter) sets it up in the container's namespace.
 */
export function interfaceMoveHook(stagingNetns: string, clusterAddress?: string): { path: string; args: string[]; env: string[]; timeout: number } {
  const script = leverOff('lean-hook') ? programPerStepHook() : [
    'set -eu',
    // runc writes its state as one line of JSON with no newline at the end.
    'IFS= read -r state || [ -n "$state" ]',
    'pid=${state#*\\"pid\\":}',
    'pid=${pid#"${pid%%[0-9]*}"}',
    'pid=${pid%%[!0-9]*}',
    '[ -n "$pid" ]',
    'out=$(ip -n "$1" -o -4 -batch - <<EOF',
    `addr show dev ${IFNAME}`,
    'route show default',
    `link set ${IFNAME} netns $pid`,
    'EOF',
    ')',
    'addr= gw= prev=',
    'for word in $out; do',
    '  case $prev in inet) addr=$word ;; via) gw=$word ;; esac',
    '  prev=$word',
    'done',
    '[ -n "$addr" ] && [ -n "$gw" ]',
    // The cluster address before CRIU restores the sockets: an established connection is bound to it.
    'nsenter --net=/proc/$pid/ns/net -- ip -batch - <<EOF',
    'link set lo up',
    `addr add $addr dev ${IFNAME}`,
    `link set ${IFNAME} up`,
    'route add default via $gw',
    `\${2:+addr add $2/32 dev ${IFNAME}}`,
    'EOF',
  ].join('\n');
  return {
    path: '/bin/sh',
    args: ['sh', '-c', script, 'chipmunk-interface-move', stagingNetns, clusterAddress ?? ''],
    env: ['PATH=/usr/sbin:/usr/bin:/sbin:/bin'],
    timeout: 20,
  };
}

/** The hook as it was, a program per step (about twice as slow): kept to measure the lean one against (downtime-levers.ts). */
function programPerStepHook(): string {
  return [
    'set -eu',
    `pid=$(sed -n 's/.*"pid": *\\([0-9][0-9]*\\).*/\\1/p')`,
    '[ -n "$pid" ]',
    `addr=$(ip -n "$1" -o -4 addr show dev ${IFNAME} | awk '{print $4}')`,
    `gw=$(ip -n "$1" -4 route show default | awk '{print $3}')`,
    `ip -n "$1" link set ${IFNAME} netns "$pid"`,
    `nsenter --net=/proc/$pid/ns/net -- sh -c 'ip link set lo up && ip addr add "$0" dev ${IFNAME} && ip link set ${IFNAME} up && ip route add default via "$1"' "$addr" "$gw"`,
    `[ -z "$2" ] || nsenter --net=/proc/$pid/ns/net -- ip addr add "$2/32" dev ${IFNAME}`,
  ].join('\n');
}

export function netnsPath(name: string): string {
  return `${NETNS_DIR}/${name}`;
}

export class CniNetwork {
  private readonly cniPath: string;

  constructor(private readonly cfg: NetworkConfig) {
    this.cniPath = cfg.cniPath ?? '/usr/lib/cni';
  }

  /** Creates the namespace and attaches it; on failure nothing is left behind. */
  async attach(netns: string, containerId: string, published: Published): Promise<Attachment> {
    await mkdir(this.cfg.ipamDir, { recursive: true });
    if (!existsSync(netnsPath(netns))) await run('ip', ['netns', 'add', netns], { op: 'create network namespace' });
    try {
      // A new namespace's loopback is down: localhost (in /etc/hosts, and what many programs
      // talk to themselves over) would be unreachable. Podman brings it up too.
      await run('ip', ['-n', netns, 'link', 'set', 'lo', 'up'], { op: 'bring up loopback in container namespace' });
      const bridgeResult = await this.plugin('bridge', 'ADD', netns, containerId, this.bridgeConf());
      const ip = ((bridgeResult.ips as Array<{ address: string }> | undefined) ?? [])[0]?.address?.split('/')[0];
      if (!ip) throw new RuntimeFailedError('CNI bridge returned no address', { op: 'CNI bridge ADD', result: bridgeResult });
      if (published.ports.length > 0) {
        const target = this.publishedTarget(published);
        await this.plugin('portmap', 'ADD', netns, containerId, this.portmapConf(published, target ? { ...bridgeResult, ips: [{ address: `${target.address}/32` }] } : bridgeResult));
        if (target) await this.snatPublished(target.address, target.nodeAddress, containerId, 'add');
      }
      return { netns, ip };
    } catch (err) {
      await this.detach(netns, containerId, published);
      throw err;
    }
  }

  /** Where published ports lead: the cluster address, SNATed to this node (top of this file); undefined: the CNI address. */
  private publishedTarget(published: Published): { address: string; nodeAddress: string } | undefined {
    const nodeAddress = this.cfg.nodeAddress;
    // Only an IPv4 address other nodes reach: not the wildcard, nor loopback (a node of its own).
    if (!published.address || !nodeAddress || !/^\d+\.\d+\.\d+\.\d+$/.test(nodeAddress) || nodeAddress === '0.0.0.0' || nodeAddress.startsWith('127.')) return undefined;
    return { address: published.address, nodeAddress };
  }

  /**
   * Adds or deletes the SNAT rule of one container's published ports (conntrack keeps the
   * translation of connections made meanwhile: deleting the rule ends none of them). Idempotent.
   */
  private async snatPublished(address: string, nodeAddress: string, containerId: string, action: 'add' | 'delete'): Promise<void> {
    const rule = ['POSTROUTING', '-d', `${address}/32`, '-m', 'conntrack', '--ctstate', 'DNAT', '-m', 'comment', '--comment', `chipmunk published ${containerId}`, '-j', 'SNAT', '--to-source', nodeAddress];
    const present = async () => (await runUnchecked(...inHostNetns(this.cfg.hostNetns, 'iptables', ['-w', '-t', 'nat', '-C', ...rule]))).code === 0;
    if (action === 'add') {
      if (!(await present())) await run(...inHostNetns(this.cfg.hostNetns, 'iptables', ['-w', '-t', 'nat', '-A', ...rule]), { op: `SNAT published ports of ${address} to ${nodeAddress}` });
      return;
    }
    while (await present()) await run(...inHostNetns(this.cfg.hostNetns, 'iptables', ['-w', '-t', 'nat', '-D', ...rule]), { op: `remove the SNAT of ${address}'s published ports` });
  }

  /**
   * Whether the staging namespace still holds the interface: a prestart hook moved it into a
   * container's namespace, where it died with that container's last process.
   */
  async hasInterface(netns: string): Promise<boolean> {
    return (await runUnchecked('ip', ['-n', netns, 'link', 'show', IFNAME])).code === 0;
  }

  /** The cluster address on the interface of a container namespace attached directly (no user namespace). Idempotent. */
  async addClusterAddress(netns: string, address: string): Promise<void> {
    await run('ip', ['-n', netns, 'addr', 'replace', `${address}/32`, 'dev', IFNAME], { op: `add cluster address ${address}` });
  }

  /** This node routes `address` to the container's CNI address `containerIp` (top of this file). Idempotent. */
  async routeClusterAddress(address: string, containerIp: string): Promise<void> {
    await run(...inHostNetns(this.cfg.hostNetns, 'ip', ['route', 'replace', `${address}/32`, 'via', containerIp, 'dev', this.cfg.bridge]), {
      op: `route cluster address ${address} to ${containerIp}`,
    });
  }

  /** Removes the route `routeClusterAddress` made, only if it still leads to `containerIp` (the container may be back here since). */
  async unrouteClusterAddress(address: string, containerIp: string): Promise<void> {
    await runUnchecked(...inHostNetns(this.cfg.hostNetns, 'ip', ['route', 'del', `${address}/32`, 'via', containerIp]));
  }

  /** Releases only the published ports, keeping address and namespace. Idempotent. */
  async unmapPorts(netns: string, containerId: string, published: Published): Promise<void> {
    if (published.ports.length === 0) return;
    await this.pluginBestEffort('portmap', netns, containerId, this.portmapConf(published, null));
    const target = this.publishedTarget(published);
    if (target) await this.snatPublished(target.address, target.nodeAddress, containerId, 'delete').catch(() => undefined);
  }

  /** Releases ports, address and namespace. Idempotent: every step tolerates "already gone". */
  async detach(netns: string, containerId: string, published: Published): Promise<void> {
    await this.unmapPorts(netns, containerId, published);
    await this.pluginBestEffort('bridge', netns, containerId, this.bridgeConf());
    if (existsSync(netnsPath(netns))) await runUnchecked('ip', ['netns', 'del', netns]);
  }

  private bridgeConf(): Record<string, unknown> {
    return {
      cniVersion: '1.0.0',
      name: this.cfg.networkName,
      type: 'bridge',
      bridge: this.cfg.bridge,
      isGateway: true,
      // Without a default route the container cannot answer clients outside its subnet,
      // which is every client reaching it through a published port.
      isDefaultGateway: true,
      ipMasq: true,
      hairpinMode: true,
      ipam: { type: 'host-local', ranges: [[{ subnet: this.cfg.subnet }]], dataDir: this.cfg.ipamDir },
    };
  }

  private portmapConf({ ports }: Published, prevResult: unknown): Record<string, unknown> {
    return {
      cniVersion: '1.0.0',
      name: this.cfg.networkName,
      type: 'portmap',
      capabilities: { portMappings: true },
      runtimeConfig: { portMappings: ports.map((p) => ({ hostPort: p.hostPort, containerPort: p.containerPort, protocol: p.protocol })) },
      ...(prevResult ? { prevResult } : {}),
    };
  }

  private async plugin(type: string, command: 'ADD' | 'DEL', netns: string, containerId: string, conf: object): Promise<Record<string, unknown>> {
    const res = await run(...inHostNetns(this.cfg.hostNetns, `${this.cniPath}/${type}`, []), {
      input: JSON.stringify(conf),
      env: this.cniEnv(command, netns, containerId),
      op: `CNI ${type} ${command}`,
      timeoutMs: 30_000,
    });
    return res.stdout.trim() ? (JSON.parse(res.stdout) as Record<string, unknown>) : {};
  }

  private async pluginBestEffort(type: string, netns: string, containerId: string, conf: object): Promise<void> {
    await runUnchecked(...inHostNetns(this.cfg.hostNetns, `${this.cniPath}/${type}`, []), {
      input: JSON.stringify(conf),
      env: this.cniEnv('DEL', netns, containerId),
      timeoutMs: 30_000,
    });
  }

  private cniEnv(command: string, netns: string, containerId: string): NodeJS.ProcessEnv {
    return {
      ...process.env,
      CNI_COMMAND: command,
      CNI_CONTAINERID: containerId,
      CNI_NETNS: netnsPath(netns),
      CNI_IFNAME: IFNAME,
      CNI_PATH: this.cniPath,
    };
  }
}

/** [cmd, args] to run `cmd` inside network namespace `netns` (a path), or as is without one. */
export function inHostNetns(netns: string | undefined, cmd: string, args: string[]): [string, string[]] {
  return netns ? ['nsenter', [`--net=${netns}`, '--', cmd, ...args]] : [cmd, args];
}
