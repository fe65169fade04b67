/**
 * Container networking: one network namespace per container incarnation, wired with the CNI
 * plugins from Debian's containernetworking-plugins (bridge + host-local IPAM, then portmap for
 * published ports). The namespace is created under /var/run/netns so runc can be pointed at
 * it by path, and so a restore can put the container into a fresh namespace on the target.
 */
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { RuntimeFailedError } from '../../shared/errors.js';
import { run, runUnchecked } from '../../shared/exec.js';
import type { PortMapping } from '../../shared/protocol.js';

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
}

export interface Attachment {
  netns: string;
  ip: string;
}

const NETNS_DIR = '/var/run/netns';

export function netnsPath(name: string): string {
  return `${NETNS_DIR}/${name}`;
}

export class CniNetwork {
  private readonly cniPath: string;

  constructor(private readonly cfg: NetworkConfig) {
    this.cniPath = cfg.cniPath ?? '/usr/lib/cni';
  }

  /** Creates the namespace and attaches it; on failure nothing is left behind. */
  async attach(netns: string, containerId: string, ports: PortMapping[]): Promise<Attachment> {
    await mkdir(this.cfg.ipamDir, { recursive: true });
    if (!existsSync(netnsPath(netns))) await run('ip', ['netns', 'add', netns], { op: 'create network namespace' });
    try {
      // A new namespace's loopback is down: localhost (in /etc/hosts, and what many programs
      // talk to themselves over) would be unreachable. Podman brings it up too.
      await run('ip', ['-n', netns, 'link', 'set', 'lo', 'up'], { op: 'bring up loopback in container namespace' });
      const bridgeResult = await this.plugin('bridge', 'ADD', netns, containerId, this.bridgeConf());
      const ip = ((bridgeResult.ips as Array<{ address: string }> | undefined) ?? [])[0]?.address?.split('/')[0];
      if (!ip) throw new RuntimeFailedError('CNI bridge returned no address', { op: 'CNI bridge ADD', result: bridgeResult });
      if (ports.length > 0) await this.plugin('portmap', 'ADD', netns, containerId, this.portmapConf(ports, bridgeResult));
      return { netns, ip };
    } catch (err) {
      await this.detach(netns, containerId, ports);
      throw err;
    }
  }

  /** Releases only the published ports, keeping address and namespace. Idempotent. */
  async unmapPorts(netns: string, containerId: string, ports: PortMapping[]): Promise<void> {
    if (ports.length > 0) await this.pluginBestEffort('portmap', netns, containerId, this.portmapConf(ports, null));
  }

  /** Releases ports, address and namespace. Idempotent: every step tolerates "already gone". */
  async detach(netns: string, containerId: string, ports: PortMapping[]): Promise<void> {
    if (ports.length > 0) await this.pluginBestEffort('portmap', netns, containerId, this.portmapConf(ports, null));
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

  private portmapConf(ports: PortMapping[], prevResult: unknown): Record<string, unknown> {
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
      CNI_IFNAME: 'eth0',
      CNI_PATH: this.cniPath,
    };
  }
}

/** [cmd, args] to run `cmd` inside network namespace `netns` (a path), or as is without one. */
export function inHostNetns(netns: string | undefined, cmd: string, args: string[]): [string, string[]] {
  return netns ? ['nsenter', [`--net=${netns}`, '--', cmd, ...args]] : [cmd, args];
}
