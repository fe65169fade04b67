/**
 * The real runtime: containers on runc, checkpoint/restore through runc's CRIU integration
 * (CRIU >= 4.2 installed by setup), file systems as overlays over Podman's image store,
 * networks from CNI plugins.
 *
 * On-disk layout under the agent's data dir (what a newcomer debugging a node looks at):
 *   containers/NAME/state.json        what this node knows of the container (ContainerRecord)
 *   containers/NAME/files/upper/      overlay upper layer: every file the container changed
 *   containers/NAME/files/logs/       stdout.log, stderr.log
 *   containers/NAME/files/volumes/V/  named volume V (bind-mounted at its path)
 *   containers/NAME/work/, rootfs/    overlay work dir and mount point
 *   containers/NAME/config.json       OCI config of the current incarnation (runc bundle)
 *   migrations/ID/images/             CRIU images of one migration
 *   migrations/ID/criu-work/          CRIU logs (dump.log, restore.log, lazy-pages.log)
 *   checkpoints/ID/{images,files}/    a checkpoint (the container ran on), until uploaded or discarded
 * runc's own state lives under RUN_DIR/runc.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, constants, existsSync, openSync } from 'node:fs';
import { Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { mkdir, readdir, readFile, rename, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import {
  ChipmunkError,
  ConflictError,
  InvalidInputError,
  NotFoundError,
  RuntimeFailedError,
} from '../../shared/errors.js';
import { lastLines, runUnchecked } from '../../shared/exec.js';
import type { AgentContainer, ContainerSpec, ContainerStats, HostCapabilities, MigrationMode } from '../../shared/protocol.js';
import { removeTree } from '../../shared/remove-tree.js';
import { within } from '../../shared/time.js';
import { MIN_MEMORY_BYTES } from '../../shared/units.js';
import { buildOciConfig } from './bundle.js';
import { ImageStore, type ImageConfig } from './images.js';
import { spawnWithLogPipes } from './logs.js';
import { CniNetwork, inHostNetns, netnsPath, removeCriuNetworkLock } from './network.js';
import { mountRootfs, unmountBelow } from './rootfs.js';
import type {
  ContainerRuntime,
  DumpOptions,
  DumpOutcome,
  LocalCheckpoint,
  LogStream,
  MigrationPaths,
  PrepareOptions,
  RestoreOptions,
} from './types.js';

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
}

/** What this node persists about one container. */
interface ContainerRecord {
  spec: ContainerSpec;
  /** The image as resolved when the container was created here (or prepared for a restore). */
  image: ImageConfig;
  generation: number;
  netns: string;
  ip: string;
  createdAt: string;
  /** Set when the operator stopped it or it exited; cleared when it runs again. */
  stopped?: boolean;
  /** Set while a migration has frozen or is restoring this container. */
  migration?: { id: string; role: 'source' | 'target'; mode: MigrationMode };
  /**
   * Target side: the migration whose restore brought it here. The mark above is gone once the
   * restore returns, but the migration can still fail after it (verify) and abortRestore must
   * then find and remove it. Cleared when the container starts its next migration.
   */
  restoredBy?: string;
}

/** Source-side state of a migration in flight. */
interface SourceMigration {
  name: string;
  mode: MigrationMode;
  pageServer?: { address: string; port: number };
  /** The `runc checkpoint` process of the dump; in lazy mode it lives until every page was served. */
  dumper?: ChildProcess;
  dumpDone: Promise<{ code: number; stderr: string }>;
}

const LAZY_SOCKET_WAIT_MS = 15_000;
/** How long a lazy `runc restore` may outlive a failed lazy-pages daemon before it is killed. */
const LAZY_RESTORE_GRACE_MS = 5_000;
const PAGE_DRAIN_TIMEOUT_MS = 10 * 60_000;
const RUNC_START_TIMEOUT_MS = 120_000;
const PAGE_SIZE = 4096;

export class RuncRuntime implements ContainerRuntime {
  readonly capabilities: HostCapabilities;
  private readonly runc: string;
  private readonly network: CniNetwork;
  private readonly images: ImageStore;
  private readonly sources = new Map<string, SourceMigration>();
  /** Lazy-pages daemons of restores on this node, by migration. */
  private readonly lazyDaemons = new Map<string, ChildProcess>();
  /** Serialises operations per container name. */
  private readonly locks = new Map<string, Promise<unknown>>();

  constructor(private readonly opts: RuncRuntimeOptions) {
    this.capabilities = opts.capabilities;
    this.runc = opts.runcPath ?? 'runc';
    this.images = opts.images ?? new ImageStore();
    this.network = new CniNetwork({
      networkName: `chipmunk-${opts.node}`,
      bridge: 'chmk0',
      subnet: opts.subnet,
      ipamDir: join(opts.dataDir, 'cni'),
      hostNetns: opts.hostNetns,
    });
  }

  // ------------------------------------------------------------------ paths and records

  private containerDir(name: string): string {
    return join(this.opts.dataDir, 'containers', name);
  }

  private runcRoot(): string {
    return join(this.opts.runDir, 'runc');
  }

  private runcId(name: string, generation: number): string {
    return `chmk-${this.opts.node}-${name}-${generation}`;
  }

  /**
   * The network namespace of an incarnation. Its name is also the CNI container ID of the
   * attachment (portmap's DNAT rules and the IPAM reservation are keyed by it): a rollback
   * restores a new incarnation (generation + 1) into the same namespace, so the runc ID of the
   * current generation would not name the attachment any more.
   */
  private netnsName(name: string, generation: number): string {
    return `chmk-${this.opts.node}-${name}-${generation}`;
  }

  /**
   * The CNI container ID the network was attached with: the runc ID of the incarnation that
   * created the namespace, which the namespace is named after. A rollback keeps namespace and
   * attachment while the generation moves on, so the current runc ID is not it: detaching with
   * that would leave the port mappings (and the address) of a removed container behind.
   */
  private cniId(rec: ContainerRecord): string {
    return rec.netns;
  }

  private cgroupsPath(name: string, generation: number): string {
    return `/chipmunk/${this.opts.node}/${name}-${generation}`;
  }

  /**
   * Source side (a dump of this node's): the container's own files. Target side: a
   * staging directory that `restore` moves into place, so an aborted transfer leaves nothing
   * under containers/.
   */
  migrationPaths(migrationId: string): MigrationPaths {
    const name = this.sources.get(migrationId)?.name;
    const migrationDir = join(this.opts.dataDir, 'migrations', migrationId);
    return {
      images: join(migrationDir, 'images'),
      files: name ? join(this.containerDir(name), 'files') : join(migrationDir, 'files'),
    };
  }

  private criuWorkDir(migrationId: string): string {
    return join(this.opts.dataDir, 'migrations', migrationId, 'criu-work');
  }

  private async readRecord(name: string): Promise<ContainerRecord> {
    try {
      return JSON.parse(await readFile(join(this.containerDir(name), 'state.json'), 'utf8')) as ContainerRecord;
    } catch {
      throw new NotFoundError(`no container named '${name}' on node ${this.opts.node}`, { name, node: this.opts.node });
    }
  }

  private async writeRecord(rec: ContainerRecord): Promise<void> {
    const path = join(this.containerDir(rec.spec.name), 'state.json');
    await writeFile(`${path}.tmp`, JSON.stringify(rec, null, 2));
    await rename(`${path}.tmp`, path);
  }

  private async withLock<T>(name: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(name) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    this.locks.set(name, next.catch(() => undefined));
    return next;
  }

  // ------------------------------------------------------------------ lifecycle

  async run(spec: ContainerSpec): Promise<AgentContainer> {
    if (spec.memoryBytes > 0 && spec.memoryBytes < MIN_MEMORY_BYTES) {
      throw new InvalidInputError(`memory limit ${spec.memoryBytes} bytes is too small: give at least 6m`, { memoryBytes: spec.memoryBytes });
    }
    return this.withLock(spec.name, async () => {
      if (existsSync(this.containerDir(spec.name))) {
        throw new ConflictError(`a container named '${spec.name}' already exists on node ${this.opts.node}: pick another name or remove it first`, {
          name: spec.name,
        });
      }
      await this.assertPortsFree(spec);
      const image = await this.images.inspect(spec.image);
      const undo: Array<() => Promise<void>> = [];
      try {
        const dir = this.containerDir(spec.name);
        await mkdir(join(dir, 'files', 'logs'), { recursive: true });
        undo.push(() => this.removeContainerDir(spec.name));
        const rec: ContainerRecord = {
          spec,
          image,
          generation: 0,
          netns: this.netnsName(spec.name, 0),
          ip: '',
          createdAt: new Date().toISOString(),
        };
        await this.mountContainerRootfs(spec.name, image);
        const att = await this.network.attach(rec.netns, this.cniId(rec), spec.ports);
        undo.push(() => this.network.detach(rec.netns, rec.netns, spec.ports));
        rec.ip = att.ip;
        await this.writeBundle(rec, image);
        await this.writeRecord(rec);
        await this.startRunc(rec, ['run', '-d', '--bundle', dir, this.runcId(spec.name, 0)], 'runc run');
        return await this.view(rec);
      } catch (err) {
        for (const u of undo.reverse()) await u().catch(() => undefined);
        throw err;
      }
    });
  }

  async get(name: string): Promise<AgentContainer> {
    return this.view(await this.readRecord(name));
  }

  async list(): Promise<AgentContainer[]> {
    const dir = join(this.opts.dataDir, 'containers');
    const names = existsSync(dir) ? await readdir(dir) : [];
    const out: AgentContainer[] = [];
    for (const n of names.sort()) {
      try {
        out.push(await this.get(n));
      } catch (err) {
        if (!(err instanceof NotFoundError)) throw err;
      }
    }
    return out;
  }

  async stop(name: string, opts: { timeoutMs?: number } = {}): Promise<AgentContainer> {
    return this.withLock(name, async () => {
      const rec = await this.readRecord(name);
      this.assertNotMigrating(rec);
      const id = this.runcId(name, rec.generation);
      const state = await this.runcState(id);
      if (state?.status === 'running' || state?.status === 'paused') {
        await runUnchecked(this.runc, ['--root', this.runcRoot(), 'kill', id, 'TERM']);
        const deadline = Date.now() + (opts.timeoutMs ?? 10_000);
        while (Date.now() < deadline && (await this.runcState(id))?.status === 'running') await sleep(100);
        if ((await this.runcState(id))?.status === 'running') await runUnchecked(this.runc, ['--root', this.runcRoot(), 'kill', id, 'KILL']);
      }
      rec.stopped = true;
      await this.writeRecord(rec);
      return this.view(rec);
    });
  }

  async remove(name: string, opts: { force?: boolean } = {}): Promise<void> {
    await this.withLock(name, async () => {
      const rec = await this.readRecord(name);
      this.assertNotMigrating(rec);
      const id = this.runcId(name, rec.generation);
      const state = await this.runcState(id);
      if (state?.status === 'running' && !opts.force) {
        throw new ConflictError(`container '${name}' is running: stop it first or remove it with force`, { name });
      }
      await this.destroyIncarnation(name, rec.generation);
      await this.network.detach(rec.netns, this.cniId(rec), rec.spec.ports);
      await this.removeContainerDir(name);
    });
  }

  async logs(name: string, opts: { stream?: LogStream; tailLines?: number } = {}): Promise<string> {
    await this.readRecord(name);
    const logDir = join(this.containerDir(name), 'files', 'logs');
    const read = async (f: string) => (existsSync(join(logDir, f)) ? readFile(join(logDir, f), 'utf8') : '');
    const stream = opts.stream ?? 'all';
    let text = stream === 'stdout' ? await read('stdout.log') : stream === 'stderr' ? await read('stderr.log') : (await read('stdout.log')) + (await read('stderr.log'));
    if (opts.tailLines !== undefined) text = text.split('\n').slice(-opts.tailLines - 1).join('\n');
    return text;
  }

  async stats(name: string): Promise<ContainerStats> {
    const rec = await this.readRecord(name);
    const id = this.runcId(name, rec.generation);
    const res = await runUnchecked(this.runc, ['--root', this.runcRoot(), 'events', '--stats', id], { timeoutMs: 10_000 });
    if (res.code !== 0) throw new ConflictError(`container '${name}' is not running, so it has no stats`, { name });
    const data = (JSON.parse(res.stdout) as { data?: Record<string, any> }).data ?? {};
    const limit = data.memory?.usage?.limit;
    return {
      name,
      cpuUsageNs: Number(data.cpu?.usage?.total ?? 0),
      memoryBytes: Number(data.memory?.usage?.usage ?? 0),
      ...(limit && limit < 2 ** 62 ? { memoryLimitBytes: Number(limit) } : {}),
      pids: Number(data.pids?.current ?? 0),
    };
  }

  // ------------------------------------------------------------------ migration: source side

  async dump(name: string, opts: DumpOptions): Promise<DumpOutcome> {
    if (opts.mode === 'lazy' && !this.capabilities.lazyMigration) {
      throw new ChipmunkError('CHIPMUNK_CAPABILITY_MISSING', `lazy migration needs userfaultfd, which node ${this.opts.node} lacks: use --mode copy`, {
        status: 422,
      });
    }
    if (opts.mode === 'lazy' && !opts.pageServer) throw new InvalidInputError('a lazy dump needs a page server address and port');
    return this.withLock(name, async () => {
      const rec = await this.readRecord(name);
      this.assertNotMigrating(rec);
      const id = this.runcId(name, rec.generation);
      if ((await this.runcState(id))?.status !== 'running') {
        throw new ConflictError(`container '${name}' is not running on node ${this.opts.node}; only running containers migrate`, { name });
      }
      const images = join(this.opts.dataDir, 'migrations', opts.migrationId, 'images');
      const work = this.criuWorkDir(opts.migrationId);
      await mkdir(images, { recursive: true });
      await mkdir(work, { recursive: true });
      rec.migration = { id: opts.migrationId, role: 'source', mode: opts.mode };
      delete rec.restoredBy;
      await this.writeRecord(rec);

      const args = ['--root', this.runcRoot(), '--criu', this.opts.criuPath, 'checkpoint', '--image-path', images, '--work-path', work, '--tcp-established'];
      if (opts.mode === 'lazy') {
        args.push('--lazy-pages', '--page-server', `${opts.pageServer!.address}:${opts.pageServer!.port}`, '--status-fd', '3');
      }
      args.push(id);
      const status = opts.mode === 'lazy' ? await openStatusFifo(join(work, 'status.fifo')) : undefined;
      const frozenAt = Date.now();
      const child = spawn(...inHostNetns(this.opts.hostNetns, this.runc, args), { stdio: ['ignore', 'ignore', 'pipe', status?.writeFd ?? 'ignore'], detached: true });
      status?.closeWriteEnd();
      const stderr: Buffer[] = [];
      child.stderr!.on('data', (d: Buffer) => stderr.push(d));
      const dumpDone = new Promise<{ code: number; stderr: string }>((resolve) => {
        child.on('close', (code) => resolve({ code: code ?? 1, stderr: Buffer.concat(stderr).toString() }));
        child.on('error', (e) => resolve({ code: 1, stderr: e.message }));
      });
      const mig: SourceMigration = { name, mode: opts.mode, pageServer: opts.pageServer, dumper: child, dumpDone };
      this.sources.set(opts.migrationId, mig);

      const failed = (res: { code: number; stderr: string }) =>
        new RuntimeFailedError(`dump of '${name}' failed: ${lastLines(res.stderr, 3) || `runc exited ${res.code}`}`, {
          op: 'runc checkpoint',
          logPath: join(work, 'dump.log'),
          stderr: lastLines(res.stderr, 20),
        });
      if (opts.mode === 'lazy') {
        // The page server is ready when CRIU writes one byte to the status fd; if runc exits
        // first (EOF without a byte), the dump failed and CRIU has unfrozen the container.
        const ready = await new Promise<boolean>((resolve) => {
          status!.readable.once('data', () => resolve(true));
          void dumpDone.then(() => resolve(false));
        });
        status!.readable.destroy();
        if (!ready) {
          await removeCriuNetworkLock(rec.netns);
          await this.clearMigrationMark(name);
          this.sources.delete(opts.migrationId);
          throw failed(await dumpDone);
        }
      } else {
        const res = await dumpDone;
        if (res.code !== 0) {
          await removeCriuNetworkLock(rec.netns);
          await this.clearMigrationMark(name);
          this.sources.delete(opts.migrationId);
          throw failed(res);
        }
      }
      return {
        imageBytes: await treeBytes(images),
        upperBytes: await treeBytes(join(this.containerDir(name), 'files')),
        frozenAt,
      };
    });
  }

  async rollback(migrationId: string): Promise<AgentContainer> {
    const mig = this.sources.get(migrationId);
    const name = mig?.name ?? (await this.findByMigration(migrationId, 'source'));
    return this.withLock(name, async () => {
      const rec = await this.readRecord(name);
      const id = this.runcId(name, rec.generation);
      // A failed dump unfreezes the container: then it simply still runs here.
      if ((await this.runcState(id))?.status === 'running' && !(await this.isDumperAlive(mig))) {
        await removeCriuNetworkLock(rec.netns);
        delete rec.migration;
        await this.writeRecord(rec);
        this.sources.delete(migrationId);
        await this.discardMigrationData(migrationId);
        return this.view(rec);
      }
      const mode = mig?.mode ?? rec.migration?.mode ?? 'copy';
      if (mode === 'lazy' && !(await this.isDumperAlive(mig))) {
        throw new RuntimeFailedError(
          `cannot roll '${name}' back on node ${this.opts.node}: its lazy page server has already ended, so its memory is gone`,
          { op: 'rollback', logPath: join(this.criuWorkDir(migrationId), 'dump.log') },
        );
      }
      const image = rec.image;
      const frozen = { generation: rec.generation, netns: rec.netns, cniId: this.cniId(rec) };
      rec.generation += 1;
      let restored: ContainerRecord;
      if (mode === 'copy') {
        await this.destroyIncarnation(name, frozen.generation);
        // Same network namespace as before: the container keeps its address.
        restored = await this.restoreIncarnation(rec, image, migrationId, mode, undefined);
      } else {
        // The page server sends the frozen tasks' own pages (spliced, not copied) and CRIU kills
        // those tasks after the last one. Killing them earlier corrupts memory it still serves
        // (exiting threads' kernel writes: clear_child_tid, robust futexes; the restored process
        // then crashes at random), and while they live they hold their sockets: so a new
        // namespace (new address), the published ports moved over, and the frozen incarnation
        // and its namespace deleted once the dumper is done.
        await this.network.unmapPorts(frozen.netns, frozen.cniId, rec.spec.ports);
        rec.netns = this.netnsName(name, rec.generation);
        try {
          rec.ip = (await this.network.attach(rec.netns, this.cniId(rec), rec.spec.ports)).ip;
          restored = await this.restoreIncarnation(rec, image, migrationId, mode, mig!.pageServer);
        } catch (err) {
          await this.network.detach(rec.netns, this.cniId(rec), rec.spec.ports).catch(() => undefined);
          throw err;
        }
        void mig!.dumpDone
          .then(async () => {
            await this.destroyIncarnation(name, frozen.generation);
            await this.network.detach(frozen.netns, frozen.cniId, []);
          })
          .catch(() => undefined);
      }
      delete restored.migration;
      await this.writeRecord(restored);
      this.sources.delete(migrationId);
      // In lazy mode the restored container is still pulling its memory from the page server:
      // the images go once both CRIU processes are done. Nobody waits for it.
      void this.discardWhenServed(migrationId, mig).catch(() => undefined);
      return this.view(restored);
    });
  }

  /** After a rollback: waits for the lazy-pages daemon and the page server to end, then drops the images. */
  private async discardWhenServed(migrationId: string, mig: SourceMigration | undefined): Promise<void> {
    const daemon = this.lazyDaemons.get(migrationId);
    const waits: Array<Promise<unknown>> = [];
    if (daemon && daemon.exitCode === null && daemon.signalCode === null) waits.push(new Promise((resolve) => daemon.once('exit', resolve)));
    if (mig) waits.push(mig.dumpDone);
    await within(Promise.all(waits), PAGE_DRAIN_TIMEOUT_MS);
    await this.discardMigrationData(migrationId);
  }

  async finishMigration(migrationId: string): Promise<void> {
    const mig = this.sources.get(migrationId);
    const name = mig?.name ?? (await this.findByMigration(migrationId, 'source').catch(() => undefined));
    if (mig) {
      const drained = await within(mig.dumpDone, PAGE_DRAIN_TIMEOUT_MS);
      if (!drained) mig.dumper?.kill('SIGKILL');
      this.sources.delete(migrationId);
    }
    if (name) {
      await this.withLock(name, async () => {
        const rec = await this.readRecord(name).catch(() => undefined);
        if (!rec) return;
        await this.destroyIncarnation(name, rec.generation);
        await this.network.detach(rec.netns, this.cniId(rec), rec.spec.ports);
        await this.removeContainerDir(name);
      });
    }
    await this.removeMigrationDir(migrationId);
  }

  // ------------------------------------------------------------------ checkpoints (the container runs on)

  private checkpointDir(checkpointId: string): string {
    return join(this.opts.dataDir, 'checkpoints', checkpointId);
  }

  /**
   * runc pause first: the cgroup freezer holds every task while the upper layer and logs are
   * copied, and CRIU dumps a paused container and leaves it paused; so files and memory are of
   * the same instant. TCP connections are not dumped (criu.conf: tcp-close): a restore from a
   * checkpoint happens after a failure, when those connections are gone anyway.
   */
  async checkpoint(name: string, checkpointId: string): Promise<LocalCheckpoint> {
    return this.withLock(name, async () => {
      const rec = await this.readRecord(name);
      this.assertNotMigrating(rec);
      const id = this.runcId(name, rec.generation);
      if ((await this.runcState(id))?.status !== 'running') {
        throw new ConflictError(`container '${name}' is not running on node ${this.opts.node}; only running containers can be checkpointed`, { name });
      }
      const dir = this.checkpointDir(checkpointId);
      const paths: MigrationPaths = { images: join(dir, 'images'), files: join(dir, 'files') };
      const work = join(dir, 'criu-work');
      await removeTree(dir);
      await mkdir(paths.images, { recursive: true });
      await mkdir(work, { recursive: true });
      const runc = (args: string[]) => runUnchecked(...inHostNetns(this.opts.hostNetns, this.runc, ['--root', this.runcRoot(), ...args]), { timeoutMs: RUNC_START_TIMEOUT_MS });
      const failed = (op: string, stderr: string, logPath?: string) =>
        new RuntimeFailedError(`checkpoint of '${name}' failed (${op}): ${lastLines(stderr, 3)}`, { op, ...(logPath ? { logPath } : {}), stderr: lastLines(stderr, 20) });

      const frozenAt = Date.now();
      const paused = await runc(['pause', id]);
      if (paused.code !== 0) throw failed('runc pause', paused.stderr);
      let failure: unknown;
      try {
        const copied = await runUnchecked('cp', ['-a', '--reflink=auto', join(this.containerDir(name), 'files'), paths.files]);
        if (copied.code !== 0) throw failed('copying the container files', copied.stderr);
        const dumped = await runc(['--criu', this.opts.criuPath, 'checkpoint', '--leave-running', '--image-path', paths.images, '--work-path', work, id]);
        if (dumped.code !== 0) throw failed('runc checkpoint', dumped.stderr, join(work, 'dump.log'));
      } catch (err) {
        failure = err;
      }
      const resumed = await runc(['resume', id]);
      const frozenMs = Date.now() - frozenAt;
      await removeCriuNetworkLock(rec.netns);
      // A container left frozen is worse than a lost checkpoint: that error wins.
      if (resumed.code !== 0) throw failed('runc resume: the container may still be frozen', resumed.stderr);
      if (failure) throw failure;
      return { paths, frozenMs, imageBytes: await treeBytes(paths.images), filesBytes: await treeBytes(paths.files) };
    }).catch(async (err: unknown) => {
      await removeTree(this.checkpointDir(checkpointId)).catch(() => undefined);
      throw err;
    });
  }

  async discardCheckpoint(checkpointId: string): Promise<void> {
    await removeTree(this.checkpointDir(checkpointId));
  }

  async recoverInterruptedCheckpoints(): Promise<string[]> {
    await removeTree(join(this.opts.dataDir, 'checkpoints'));
    // Agents up to chipmunk 0.1.0 kept them in snapshots/: an upgraded node drops those too.
    await removeTree(join(this.opts.dataDir, 'snapshots'));
    const resumed: string[] = [];
    const dir = join(this.opts.dataDir, 'containers');
    for (const name of existsSync(dir) ? await readdir(dir) : []) {
      const rec = await this.readRecord(name).catch(() => undefined);
      if (!rec) continue;
      const id = this.runcId(name, rec.generation);
      // chipmunk pauses containers only inside a checkpoint, so a paused one is a leftover.
      if ((await this.runcState(id))?.status !== 'paused') continue;
      const res = await runUnchecked(this.runc, ['--root', this.runcRoot(), 'resume', id], { timeoutMs: 30_000 });
      if (res.code !== 0) throw new RuntimeFailedError(`container '${name}' was left paused by an interrupted checkpoint and cannot be resumed: ${lastLines(res.stderr, 3)}`, { op: 'runc resume' });
      await removeCriuNetworkLock(rec.netns);
      resumed.push(name);
    }
    return resumed;
  }

  // ------------------------------------------------------------------ migration: target side

  async prepareRestore(spec: ContainerSpec, opts: PrepareOptions): Promise<void> {
    await this.withLock(spec.name, async () => {
      const existing = await this.readRecord(spec.name).catch(() => undefined);
      if (existing?.migration?.id === opts.migrationId && existing.migration.role === 'target') return;
      if (existing) throw new ConflictError(`node ${this.opts.node} already has a container named '${spec.name}'`, { name: spec.name });
      await this.assertPortsFree(spec);
      const image = await this.images.inspect(spec.image);
      const rec = this.targetRecord(spec, image, opts);
      await mkdir(this.containerDir(spec.name), { recursive: true });
      await this.writeRecord(rec);
      try {
        rec.ip = (await this.network.attach(rec.netns, this.cniId(rec), spec.ports)).ip;
        await this.writeRecord(rec);
      } catch (err) {
        await this.removeContainerDir(spec.name).catch(() => undefined);
        throw err;
      }
    });
  }

  async restore(spec: ContainerSpec, opts: RestoreOptions): Promise<AgentContainer> {
    if (opts.mode === 'lazy' && !opts.pageServer) throw new InvalidInputError('lazy restore needs the source page server address and port');
    return this.withLock(spec.name, async () => {
      const dir = this.containerDir(spec.name);
      const prepared = await this.readRecord(spec.name).catch(() => undefined);
      const isPrepared = prepared?.migration?.id === opts.migrationId && prepared.migration.role === 'target';
      if (prepared && !isPrepared) {
        throw new ConflictError(`node ${this.opts.node} already has a container named '${spec.name}'`, { name: spec.name });
      }
      if (!isPrepared) await this.assertPortsFree(spec);
      // Prepared: image and network were resolved before the freeze; nothing to ask Podman now.
      const rec = isPrepared ? prepared! : this.targetRecord(spec, await this.images.inspect(spec.image), opts);
      const image = rec.image;
      await mkdir(dir, { recursive: true });
      const incoming = join(this.opts.dataDir, 'migrations', opts.migrationId, 'files');
      if (existsSync(incoming)) await rename(incoming, join(dir, 'files'));
      await mkdir(join(dir, 'files', 'upper'), { recursive: true });
      await mkdir(join(dir, 'files', 'logs'), { recursive: true });
      await this.writeRecord(rec);
      try {
        if (!rec.ip) {
          rec.ip = (await this.network.attach(rec.netns, this.cniId(rec), spec.ports)).ip;
          await this.writeRecord(rec);
        }
        const restored = await this.restoreIncarnation(rec, image, opts.migrationId, opts.mode, opts.pageServer);
        delete restored.migration;
        restored.restoredBy = opts.migrationId;
        await this.writeRecord(restored);
        return await this.view(restored);
      } catch (err) {
        // Leave nothing of a failed restore: the source still has the container.
        await this.network.detach(rec.netns, this.cniId(rec), spec.ports).catch(() => undefined);
        await this.removeContainerDir(spec.name).catch(() => undefined);
        throw err;
      }
    });
  }

  private targetRecord(spec: ContainerSpec, image: ImageConfig, opts: { migrationId: string; generation: number; mode: MigrationMode }): ContainerRecord {
    return {
      spec,
      image,
      generation: opts.generation,
      netns: this.netnsName(spec.name, opts.generation),
      ip: '',
      createdAt: new Date().toISOString(),
      migration: { id: opts.migrationId, role: 'target', mode: opts.mode },
    };
  }

  async settleRestore(migrationId: string): Promise<{ lazyPagesBytes: number }> {
    const daemon = this.lazyDaemons.get(migrationId);
    if (daemon && daemon.exitCode === null) {
      const exited = new Promise<void>((resolve) => daemon.once('exit', () => resolve()));
      await within(exited, PAGE_DRAIN_TIMEOUT_MS);
    }
    const log = await readFile(join(this.criuWorkDir(migrationId), 'lazy-pages.log'), 'utf8').catch(() => '');
    // One line per restored process: "UFFD transferred pages: (copied/total)".
    let pages = 0;
    for (const m of log.matchAll(/UFFD transferred pages: \((\d+)\/\d+\)/g)) pages += Number(m[1]);
    await this.removeMigrationDir(migrationId);
    return { lazyPagesBytes: pages * PAGE_SIZE };
  }

  async abortRestore(migrationId: string): Promise<void> {
    const daemon = this.lazyDaemons.get(migrationId);
    daemon?.kill('SIGKILL');
    this.lazyDaemons.delete(migrationId);
    const name = await this.findByMigration(migrationId, 'target').catch(() => undefined);
    if (name) {
      await this.withLock(name, async () => {
        const rec = await this.readRecord(name);
        await this.destroyIncarnation(name, rec.generation);
        await this.network.detach(rec.netns, this.cniId(rec), rec.spec.ports);
        await this.removeContainerDir(name);
      });
    }
    // The failure that led here names CRIU's logs (criu-work/restore.log): they stay.
    await this.discardMigrationData(migrationId);
  }

  /**
   * Restores `rec` (generation already set) from the migration's images into its record's
   * network namespace. Lazy mode starts CRIU's lazy-pages daemon first: it connects to the
   * page server when the restored process first needs memory, and exits once all is copied.
   */
  private async restoreIncarnation(
    rec: ContainerRecord,
    image: ImageConfig,
    migrationId: string,
    mode: MigrationMode,
    pageServer: { address: string; port: number } | undefined,
  ): Promise<ContainerRecord> {
    const name = rec.spec.name;
    const id = this.runcId(name, rec.generation);
    const images = join(this.opts.dataDir, 'migrations', migrationId, 'images');
    const work = this.criuWorkDir(migrationId);
    await mkdir(work, { recursive: true });
    await this.mountContainerRootfs(name, image);
    await this.writeBundle(rec, image);
    await this.writeCriuOptions(name, 'restore');
    const args = ['restore', '-d', '--image-path', images, '--work-path', work, '--bundle', this.containerDir(name)];
    try {
      let daemonFailed: Promise<string> | undefined;
      if (mode === 'lazy') {
        const daemon = await this.startLazyPagesDaemon(migrationId, images, work, pageServer!);
        // CRIU's restore waits forever once the daemon is gone (page server unreachable or
        // failing): without this the restore, and the container's lock, would never return.
        daemonFailed = new Promise((resolve) => {
          daemon.once('exit', (code, signal) => {
            if (code !== 0) {
              resolve(`the CRIU lazy-pages daemon failed (${signal ?? `exit code ${code}`}) fetching memory from the page server ${pageServer!.address}:${pageServer!.port}; see ${join(work, 'lazy-pages.log')}`);
            }
          });
        });
        args.push('--lazy-pages');
      }
      args.push(id);
      await this.startRunc(rec, args, 'runc restore', join(work, 'restore.log'), daemonFailed);
    } catch (err) {
      this.lazyDaemons.get(migrationId)?.kill('SIGKILL');
      this.lazyDaemons.delete(migrationId);
      await this.destroyIncarnation(name, rec.generation);
      throw err;
    } finally {
      await this.writeCriuOptions(name, 'dump').catch(() => undefined);
    }
    delete rec.stopped;
    return rec;
  }

  private async startLazyPagesDaemon(migrationId: string, images: string, work: string, pageServer: { address: string; port: number }): Promise<ChildProcess> {
    const socket = join(work, 'lazy-pages.socket');
    const daemon = spawn(
      ...inHostNetns(this.opts.hostNetns, this.opts.criuPath, [
        'lazy-pages', '--page-server', '--address', pageServer.address, '--port', String(pageServer.port),
        '--images-dir', images, '--work-dir', work, '-o', 'lazy-pages.log', '-v4',
      ]),
      { stdio: 'ignore', detached: true },
    );
    daemon.unref();
    this.lazyDaemons.set(migrationId, daemon);
    daemon.on('exit', () => this.lazyDaemons.delete(migrationId));
    const deadline = Date.now() + LAZY_SOCKET_WAIT_MS;
    while (!existsSync(socket)) {
      if (daemon.exitCode !== null || Date.now() > deadline) {
        throw new RuntimeFailedError(`CRIU lazy-pages daemon did not start (page server ${pageServer.address}:${pageServer.port})`, {
          op: 'criu lazy-pages',
          logPath: join(work, 'lazy-pages.log'),
        });
      }
      await sleep(5);
    }
    return daemon;
  }

  // ------------------------------------------------------------------ helpers

  /**
   * Runs `runc run -d` or `runc restore -d` with the container's stdio wired to its log
   * writers. runc's own messages go to a separate log (--log) so they do not end up in the
   * container's stderr and can be quoted in our error. If `abandon` resolves while runc still
   * runs, runc gets a grace period and is then killed (its process group: runc, CRIU, the
   * new log writers) and the operation fails with that reason.
   */
  private async startRunc(rec: ContainerRecord, subcommand: string[], op: string, criuLog?: string, abandon?: Promise<string>): Promise<void> {
    const logDir = join(this.containerDir(rec.spec.name), 'files', 'logs');
    const runcLog = join(this.containerDir(rec.spec.name), 'runc.log');
    await writeFile(runcLog, '');
    const child = spawnWithLogPipes(this.runc, ['--root', this.runcRoot(), '--criu', this.opts.criuPath, '--log', runcLog, ...subcommand], {
      stdout: join(logDir, 'stdout.log'),
      stderr: join(logDir, 'stderr.log'),
    });
    let exited = false;
    let abandoned: string | undefined;
    // A runc that hangs (it has been seen waiting forever on a broken CRIU) is given up too.
    const hung = new Promise<string>((resolve) => {
      setTimeout(() => resolve(`no answer from runc within ${RUNC_START_TIMEOUT_MS / 1000} s`), RUNC_START_TIMEOUT_MS).unref();
    });
    void (abandon ? Promise.race([abandon, hung]) : hung).then(async (why) => {
      await sleep(LAZY_RESTORE_GRACE_MS);
      if (exited || child.pid === undefined) return;
      abandoned = why;
      try {
        process.kill(-child.pid, 'SIGKILL');
      } catch {
        // exited meanwhile
      }
    });
    const code = await new Promise<number>((resolve) => {
      child.on('close', (c) => resolve(c ?? 1));
      child.on('error', () => resolve(127));
    });
    exited = true;
    if (abandoned) throw new RuntimeFailedError(`${op} of '${rec.spec.name}' failed: ${abandoned}`, { op, logPath: criuLog ?? runcLog });
    if (code !== 0) {
      const messages = (await readFile(runcLog, 'utf8').catch(() => ''))
        .split('\n')
        .filter((l) => /level=(error|fatal)/.test(l))
        .map((l) => /msg="((?:[^"\\]|\\.)*)"/.exec(l)?.[1]?.replace(/\\n/g, ' ') ?? l);
      const why = messages.slice(-2).join('; ') || `runc exited ${code}`;
      throw new RuntimeFailedError(`${op} of '${rec.spec.name}' failed: ${why}`, {
        op,
        logPath: criuLog ?? runcLog,
        stderr: messages.join('\n'),
      });
    }
  }

  private async writeBundle(rec: ContainerRecord, image: ImageConfig): Promise<void> {
    const dir = this.containerDir(rec.spec.name);
    const criuConf = join(dir, 'criu.conf');
    await this.writeCriuOptions(rec.spec.name, 'dump');
    const config = buildOciConfig({
      spec: rec.spec,
      image,
      rootfs: join(dir, 'rootfs'),
      netnsPath: netnsPath(rec.netns),
      cgroupsPath: this.cgroupsPath(rec.spec.name, rec.generation),
      hostname: rec.spec.name,
      criuConfigPath: criuConf,
      volumeDir: (volume) => this.volumeDir(rec.spec.name, volume),
    });
    for (const v of rec.spec.volumes ?? []) await mkdir(this.volumeDir(rec.spec.name, v.name), { recursive: true });
    await writeFile(join(dir, 'config.json'), JSON.stringify(config, null, 2));
  }

  /**
   * The CRIU options runc passes on (org.criu.config). runc reads the file named in the
   * running container's config for a dump and in the bundle's for a restore: one path, whose
   * content is switched to the restore options around a restore.
   * - skip-in-flight (dump): a connection still in the listen backlog would fail the dump; its
   *   client retries.
   * - tcp-close (restore): connections dumped with --tcp-established come back closed, since the
   *   target has another address, instead of failing the restore; their clients reconnect.
   * - network-lock skip (restore): the namespace is new and holds no connection to protect;
   *   locked, it would silently drop the first clients' SYNs and cost them a one-second
   *   retransmission; unlocked, they are refused until the listener is back and retry at once.
   */
  private async writeCriuOptions(name: string, purpose: 'dump' | 'restore'): Promise<void> {
    const options = purpose === 'dump' ? ['skip-in-flight', 'tcp-close'] : ['skip-in-flight', 'tcp-close', 'network-lock skip'];
    await writeFile(join(this.containerDir(name), 'criu.conf'), `${options.join('\n')}\n`);
  }

  /** Under files/, so volumes travel with every migration and are in every checkpoint. */
  private volumeDir(name: string, volume: string): string {
    return join(this.containerDir(name), 'files', 'volumes', volume);
  }

  private async mountContainerRootfs(name: string, image: ImageConfig): Promise<void> {
    const dir = this.containerDir(name);
    const lower = await this.images.lowerDirs(image);
    await mountRootfs({ lower, upper: join(dir, 'files', 'upper'), work: join(dir, 'work'), mountpoint: join(dir, 'rootfs') });
  }

  /** Removes one runc incarnation and anything a failed restore left mounted for it. */
  private async destroyIncarnation(name: string, generation: number): Promise<void> {
    const id = this.runcId(name, generation);
    await runUnchecked(this.runc, ['--root', this.runcRoot(), 'delete', '-f', id], { timeoutMs: 30_000 });
    const stateDir = join(this.runcRoot(), id);
    if (existsSync(stateDir)) {
      await unmountBelow(stateDir);
      await removeTree(stateDir);
    }
  }

  private async removeContainerDir(name: string): Promise<void> {
    const dir = this.containerDir(name);
    await unmountBelow(dir);
    await removeTree(dir);
  }

  /**
   * What a failed migration leaves: everything in its directory (images, staged files) but
   * CRIU's logs in criu-work/, which the migration's error points the operator at.
   */
  private async discardMigrationData(migrationId: string): Promise<void> {
    const dir = join(this.opts.dataDir, 'migrations', migrationId);
    if (!existsSync(dir)) return;
    await unmountBelow(dir);
    for (const entry of await readdir(dir)) {
      if (entry !== 'criu-work') await removeTree(join(dir, entry));
    }
  }

  private async removeMigrationDir(migrationId: string): Promise<void> {
    const dir = join(this.opts.dataDir, 'migrations', migrationId);
    if (!existsSync(dir)) return;
    await unmountBelow(dir);
    await removeTree(dir);
  }

  private async clearMigrationMark(name: string): Promise<void> {
    const rec = await this.readRecord(name);
    delete rec.migration;
    await this.writeRecord(rec);
  }

  private async findByMigration(migrationId: string, role: 'source' | 'target'): Promise<string> {
    const dir = join(this.opts.dataDir, 'containers');
    for (const n of existsSync(dir) ? await readdir(dir) : []) {
      const rec = await this.readRecord(n).catch(() => undefined);
      if (rec?.migration?.id === migrationId && rec.migration.role === role) return n;
      if (role === 'target' && rec?.restoredBy === migrationId) return n;
    }
    throw new NotFoundError(`no ${role} container for migration ${migrationId} on node ${this.opts.node}`, { migrationId });
  }

  private async isDumperAlive(mig: SourceMigration | undefined): Promise<boolean> {
    if (!mig?.dumper) return false;
    return mig.dumper.exitCode === null && mig.dumper.signalCode === null;
  }

  private assertNotMigrating(rec: ContainerRecord): void {
    if (rec.migration) {
      throw new ConflictError(`container '${rec.spec.name}' is being migrated (${rec.migration.id}); try again when it is done`, {
        name: rec.spec.name,
        migrationId: rec.migration.id,
      });
    }
  }

  private async assertPortsFree(spec: ContainerSpec): Promise<void> {
    const seen = new Set<string>();
    for (const p of spec.ports) {
      const reserved = this.opts.reservedHostPorts?.find((r) => p.hostPort >= r.from && p.hostPort <= r.to);
      if (reserved) {
        throw new ConflictError(`host port ${p.hostPort} is reserved on node ${this.opts.node} for ${reserved.usedBy}: publish another port`, {
          port: p.hostPort,
        });
      }
      const key = `${p.hostPort}/${p.protocol}`;
      if (seen.has(key)) throw new InvalidInputError(`host port ${key} is published twice`, { port: p.hostPort });
      seen.add(key);
    }
    const dir = join(this.opts.dataDir, 'containers');
    for (const n of existsSync(dir) ? await readdir(dir) : []) {
      if (n === spec.name) continue;
      const rec = await this.readRecord(n).catch(() => undefined);
      for (const p of rec?.spec.ports ?? []) {
        if (seen.has(`${p.hostPort}/${p.protocol}`)) {
          throw new ConflictError(`host port ${p.hostPort}/${p.protocol} is already published by container '${n}' on node ${this.opts.node}`, {
            port: p.hostPort,
            container: n,
          });
        }
      }
    }
  }

  private async runcState(id: string): Promise<{ status: string; pid: number } | undefined> {
    const res = await runUnchecked(this.runc, ['--root', this.runcRoot(), 'state', id], { timeoutMs: 10_000 });
    if (res.code !== 0) return undefined;
    return JSON.parse(res.stdout) as { status: string; pid: number };
  }

  private async view(rec: ContainerRecord): Promise<AgentContainer> {
    const state = await this.runcState(this.runcId(rec.spec.name, rec.generation));
    let status: AgentContainer['status'];
    if (rec.migration) status = 'migrating';
    else if (state?.status === 'running') status = 'running';
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

  async close(): Promise<void> {
    // Containers, log writers, lazy-pages daemons and dumpers are detached on purpose:
    // they outlive the agent.
  }
}

async function treeBytes(dir: string): Promise<number> {
  if (!existsSync(dir)) return 0;
  const res = await runUnchecked('du', ['-sb', dir]);
  if (res.code === 0) return Number(res.stdout.split(/\s/)[0]);
  return (await stat(dir)).size;
}

/**
 * runc wants a writable file descriptor for --status-fd, and the stdio "pipes" node creates are
 * socket pairs runc rejects: so a FIFO, opened for reading first (non-blocking) so that opening
 * its write end does not block.
 */
async function openStatusFifo(path: string): Promise<{ writeFd: number; readable: NodeJS.ReadableStream & { destroy(): void }; closeWriteEnd(): void }> {
  await runUnchecked('rm', ['-f', path]);
  await runUnchecked('mkfifo', ['-m', '600', path]);
  const readFd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK);
  const writeFd = openSync(path, constants.O_WRONLY);
  // A libuv pipe handle, not an fs stream: fs streams fail with EAGAIN on a non-blocking FIFO.
  const readable = new Socket({ fd: readFd, readable: true, writable: false });
  return { writeFd, readable, closeWriteEnd: () => closeSync(writeFd) };
}
