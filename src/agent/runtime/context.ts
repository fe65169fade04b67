/**
 * What the parts of the real runtime share (lifecycle, source-migration, target-restore,
 * checkpoints): the node's layout, records, runc, CRIU, network and images, the per-container
 * lock, and the helpers more than one of them needs.
 */
import { existsSync } from 'node:fs';
import { lstat, mkdir, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ConflictError, InvalidInputError, NotFoundError } from '../../shared/errors.js';
import { runUnchecked } from '../../shared/exec.js';
import type { AgentContainer, ContainerSpec, HostCapabilities, MigrationMode } from '../../shared/protocol.js';
import { leverOff } from '../../shared/downtime-levers.js';
import { removeTree } from '../../shared/remove-tree.js';
import { buildOciConfig } from './bundle.js';
import { CheckpointFreezes } from './checkpoint-freezes.js';
import { Criu, criuOptionsPath, writeCriuOptions, type DumpProcess, type PageServer } from './criu.js';
import { writeEtcFiles } from './etc-files.js';
import { FailedLogs } from './failed-logs.js';
import { ImageStore, type ImageConfig } from './images.js';
import { NodeLayout } from './layout.js';
import { CniNetwork, netnsPath } from './network.js';
import { RecordStore, type ContainerRecord, type RecordWarning } from './records.js';
import { mountRootfs, syncLayer, unmountBelow, type WritableLayerKind } from './rootfs.js';
import { Runc, type StartTarget } from './runc.js';
import type { CheckpointFreezeMethod } from './types.js';

export interface RuncRuntimeOptions {
  node: string;
  dataDir: string;
  runDir: string;
  /** Container subnet of this node (CIDR). */
  subnet: string;
  criuPath: string;
  capabilities: HostCapabilities;
  runcPath?: string;
  /**
   * Host ports containers may not publish: the agent's own API and the page-server range.
   * A port mapping there would capture the agent's traffic.
   */
  reservedHostPorts?: Array<{ from: number; to: number; usedBy: string }>;
  /** Where images come from; the machine's default Podman store if not given. */
  images?: ImageStore;
  /**
   * Network namespace of the node, when this process runs outside it (tests drive a runtime
   * for a test host from the machine's namespace). The CNI plugins, the page server and the
   * lazy-pages daemon run there; runc itself does not care where it runs.
   */
  hostNetns?: string;
  /**
   * This node's address (other nodes reach it there): connections through published ports to a
   * container with a cluster address are SNATed to it, so they survive its moves (network.ts).
   */
  nodeAddress?: string;
  /**
   * The resolv.conf containers' own is made from (etc-files.ts), /etc/resolv.conf if not given.
   * Tests name a file of their own: their containers must never query a resolver off the machine.
   */
  resolvConfPath?: string;
  /**
   * New containers' writable layer: a directory (default) or an ext4 image that keeps inode
   * numbers across moves and is a disk quota (rootfs.ts).
   */
  writableLayer?: WritableLayerKind;
  /**
   * How a checkpoint copies the files (local-checkpoints.ts): `pre-copy` (default) copies a
   * directory layer before the freeze and only its changes inside it; `copy-in-freeze` copies
   * all of it inside the freeze (what chipmunk did before). bench/checkpoint-freeze compares them.
   */
  checkpointFreeze?: CheckpointFreezeMethod;
  /**
   * Run new containers in a user namespace of their own (bundle.ts; default true). Without one,
   * a node lacking CAP_SYS_RESOURCE cannot dump their non-root processes (criu.ts).
   */
  userNamespace?: boolean;
  /** Where warnings go (a damaged record read from its previous copy); console.warn if not given. */
  onWarning?: RecordWarning;
}

/** Source-side state of a migration in flight. */
export interface SourceMigration {
  name: string;
  mode: MigrationMode;
  pageServer?: PageServer;
  /** The dump's `runc checkpoint`; in lazy mode it lives until every page was served. */
  dump?: DumpProcess;
}

export class RuntimeContext {
  readonly node: string;
  readonly layout: NodeLayout;
  readonly records: RecordStore;
  readonly runc: Runc;
  readonly criu: Criu;
  readonly network: CniNetwork;
  readonly images: ImageStore;
  readonly failedLogs: FailedLogs;
  /** Migrations this node is the source of, by id. */
  readonly sources = new Map<string, SourceMigration>();
  /** Containers frozen by a checkpoint that leaves them running: `running` to the outside. */
  readonly freezes = new CheckpointFreezes();
  /** Serialises operations per container name. */
  private readonly locks = new Map<string, Promise<unknown>>();

  constructor(readonly opts: RuncRuntimeOptions) {
    this.node = opts.node;
    this.layout = new NodeLayout(opts.node, opts.dataDir, opts.runDir);
    this.records = new RecordStore(this.layout, opts.node, opts.onWarning ?? ((message, details) => console.warn(message, details)));
    this.runc = new Runc({ runcPath: opts.runcPath ?? 'runc', root: this.layout.runcRoot(), criuPath: opts.criuPath, hostNetns: opts.hostNetns });
    this.criu = new Criu(this.runc, opts.criuPath, opts.hostNetns);
    this.images = opts.images ?? new ImageStore();
    this.failedLogs = new FailedLogs(this.layout.failedLogsDir());
    this.network = new CniNetwork({
      networkName: `chipmunk-${opts.node}`,
      bridge: 'chmk0',
      subnet: opts.subnet,
      ipamDir: join(opts.dataDir, 'cni'),
      hostNetns: opts.hostNetns,
      ...(opts.nodeAddress ? { nodeAddress: opts.nodeAddress } : {}),
    });
  }

  withLock<T>(name: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(name) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    this.locks.set(name, next.catch(() => undefined));
    return next;
  }

  runcId(rec: ContainerRecord): string {
    return this.layout.runcId(rec.spec.name, rec.generation);
  }

  /**
   * The CNI container ID the network was attached with: the runc ID of the incarnation that
   * created the namespace, which the namespace is named after. A rollback keeps namespace and
   * attachment while the generation moves on, so the current runc ID is not it: detaching with
   * that would leave the port mappings (and the address) of a removed container behind.
   */
  cniId(rec: ContainerRecord): string {
    return rec.netns;
  }

  /** What runc.start needs to know of the container it starts or restores. */
  startTarget(name: string): StartTarget {
    return { name, containerDir: this.layout.containerDir(name), logDir: this.layout.logDir(name) };
  }

  async view(rec: ContainerRecord): Promise<AgentContainer> {
    const freezeMark = this.freezes.mark(rec.spec.name);
    const state = await this.runc.state(this.runcId(rec));
    let status: AgentContainer['status'];
    if (rec.migration) status = 'migrating';
    else if (state?.status === 'running') status = 'running';
    // Frozen for a checkpoint that leaves it running. Paused otherwise (a resume that failed): stopped, as it serves no one.
    else if (state?.status === 'paused' && this.freezes.overlapped(rec.spec.name, freezeMark)) status = 'running';
    else if (state?.status === 'created') status = 'created';
    else status = 'stopped';
    return {
      name: rec.spec.name,
      spec: rec.spec,
      status,
      generation: rec.generation,
      ...(rec.ip ? { ip: rec.ip } : {}),
      ...(state && state.pid > 0 && status === 'running' ? { pid: state.pid } : {}),
      createdAt: rec.createdAt,
    };
  }

  assertNotMigrating(rec: ContainerRecord): void {
    if (rec.migration) {
      throw new ConflictError(`container '${rec.spec.name}' is being migrated (${rec.migration.id}); try again when it is done`, {
        name: rec.spec.name,
        migrationId: rec.migration.id,
      });
    }
  }

  async assertPortsFree(spec: ContainerSpec): Promise<void> {
    const seen = new Set<string>();
    for (const p of spec.ports) {
      const reserved = this.opts.reservedHostPorts?.find((r) => p.hostPort >= r.from && p.hostPort <= r.to);
      if (reserved) {
        throw new ConflictError(`host port ${p.hostPort} is reserved on node ${this.node} for ${reserved.usedBy}: publish another port`, {
          port: p.hostPort,
        });
      }
      const key = `${p.hostPort}/${p.protocol}`;
      if (seen.has(key)) throw new InvalidInputError(`host port ${key} is published twice`, { port: p.hostPort });
      seen.add(key);
    }
    for (const rec of await this.records.readable()) {
      const n = rec.spec.name;
      if (n === spec.name) continue;
      for (const p of rec.spec.ports) {
        if (seen.has(`${p.hostPort}/${p.protocol}`)) {
          throw new ConflictError(`host port ${p.hostPort}/${p.protocol} is already published by container '${n}' on node ${this.node}`, {
            port: p.hostPort,
            container: n,
          });
        }
      }
    }
  }

  /** The runc bundle of the record's incarnation: config.json, with criu.conf set for dumps. */
  async writeBundle(rec: ContainerRecord, image: ImageConfig): Promise<void> {
    const name = rec.spec.name;
    const dir = this.layout.containerDir(name);
    await writeCriuOptions(dir, 'dump');
    // Named at its cluster address when it has one: the address it keeps, which every node reaches.
    const etcMounts = await writeEtcFiles(join(dir, 'etc'), { hostname: name, ip: rec.spec.address ?? rec.ip, resolvConfPath: this.opts.resolvConfPath });
    const config = buildOciConfig({
      spec: rec.spec,
      image,
      rootfs: join(dir, 'rootfs'),
      netns: rec.netns,
      netnsPath: netnsPath(rec.netns),
      userNamespace: rec.userNamespace === true,
      cgroupsPath: this.layout.cgroupsPath(name, rec.generation),
      hostname: name,
      criuConfigPath: criuOptionsPath(dir),
      etcMounts,
      volumeDir: (volume) => this.layout.volumeDir(name, volume),
    });
    for (const v of rec.spec.volumes ?? []) await mkdir(this.layout.volumeDir(name, v.name), { recursive: true });
    await writeFile(join(dir, 'config.json'), JSON.stringify(config, null, 2));
  }

  /**
   * The network namespace the container's processes are in, for commands that act on it (CRIU's
   * network lock); undefined when they are gone. With a user namespace it is not the attached
   * one (network.ts) and lives only as long as they do.
   */
  async containerNetnsPath(rec: ContainerRecord): Promise<string | undefined> {
    if (!rec.userNamespace) return netnsPath(rec.netns);
    const pid = (await this.runc.state(this.runcId(rec)))?.pid;
    return pid && pid > 0 ? `/proc/${pid}/ns/net` : undefined;
  }

  /**
   * Before a restore into a user namespace: the staging namespace must hold its interface for
   * the hook to move in. A rollback's earlier incarnation took it along when it was dumped, so
   * it is attached again (possibly at another address; the bundle is written after this).
   */
  async ensureStagedInterface(rec: ContainerRecord): Promise<void> {
    if (!rec.userNamespace || (await this.network.hasInterface(rec.netns))) return;
    await this.network.detach(rec.netns, this.cniId(rec), rec.spec);
    rec.ip = (await this.network.attach(rec.netns, this.cniId(rec), rec.spec)).ip;
    await this.records.write(rec);
  }

  /**
   * The container's cluster address (ContainerSpec.address) on its interface: here for a
   * namespace attached directly, by the prestart hook for one in a user namespace (network.ts).
   */
  async addClusterAddress(rec: ContainerRecord): Promise<void> {
    if (rec.spec.address && !rec.userNamespace) await this.network.addClusterAddress(rec.netns, rec.spec.address);
  }

  /** Once the container runs here: this node sends its cluster address to it (network.ts). */
  async routeClusterAddress(rec: ContainerRecord): Promise<void> {
    if (rec.spec.address) await this.network.routeClusterAddress(rec.spec.address, rec.ip);
  }

  async mountContainerRootfs(name: string, image: ImageConfig): Promise<void> {
    const dir = this.layout.containerDir(name);
    const lower = await this.images.lowerDirs(image);
    await mountRootfs({
      lower,
      newLayer: this.opts.writableLayer ?? 'directory',
      files: join(dir, 'files'),
      layerMount: join(dir, 'layer'),
      directoryWork: join(dir, 'work'),
      mountpoint: join(dir, 'rootfs'),
    });
  }

  /** Before the container's files are copied (it is paused or dumped): see rootfs.ts. */
  async syncLayer(name: string): Promise<void> {
    await syncLayer(join(this.layout.containerDir(name), 'layer'));
  }

  async removeContainerDir(name: string): Promise<void> {
    const dir = this.layout.containerDir(name);
    await unmountBelow(dir);
    await removeTree(dir);
  }

  /** The container's incarnation, network and directory: all of it gone from this node. */
  async removeContainer(rec: ContainerRecord): Promise<void> {
    await this.runc.destroy(this.runcId(rec));
    if (rec.spec.address && rec.ip) await this.network.unrouteClusterAddress(rec.spec.address, rec.ip);
    await this.network.detach(rec.netns, this.cniId(rec), rec.spec);
    await this.removeContainerDir(rec.spec.name);
    this.freezes.forget(rec.spec.name);
  }

  /** A migration's images, staged files and CRIU work dir (a failure's logs were kept before: failed-logs.ts). */
  async removeMigrationDir(migrationId: string): Promise<void> {
    const dir = this.layout.migrationDir(migrationId);
    if (!existsSync(dir)) return;
    await unmountBelow(dir);
    await removeTree(dir);
  }

  async findByMigration(migrationId: string, role: 'source' | 'target'): Promise<string> {
    for (const rec of await this.records.readable()) {
      if (rec.migration?.id === migrationId && rec.migration.role === role) return rec.spec.name;
      if (role === 'target' && rec.restoredBy === migrationId) return rec.spec.name;
    }
    throw new NotFoundError(`no ${role} container for migration ${migrationId} on node ${this.node}`, { migrationId });
  }
}

/**
 * Bytes a directory tree takes on disk (0 if absent), as `du -s` counts them (blocks, each
 * hard-linked file once): a sparse layer image counts what is written. Walked in this process,
 * no `du` started: a move's dump asks inside its frozen window.
 */
export async function treeBytes(dir: string): Promise<number> {
  if (!existsSync(dir)) return 0;
  if (leverOff('in-process-checks')) {
    const res = await runUnchecked('du', ['-s', '--block-size=1', dir]);
    if (res.code === 0) return Number(res.stdout.split(/\s/)[0]);
    return (await stat(dir)).size;
  }
  const seen = new Set<string>();
  const walk = async (path: string): Promise<number> => {
    const st = await lstat(path).catch(() => undefined);
    if (!st || seen.has(`${st.dev}:${st.ino}`)) return 0;
    seen.add(`${st.dev}:${st.ino}`);
    let bytes = st.blocks * 512;
    if (st.isDirectory()) for (const entry of await readdir(path).catch(() => [] as string[])) bytes += await walk(join(path, entry));
    return bytes;
  };
  return walk(dir);
}
