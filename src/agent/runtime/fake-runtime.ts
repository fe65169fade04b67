/**
 * An in-memory ContainerRuntime for unit tests of the agent and the controller. It keeps the
 * same rules and errors as RuncRuntime (the contract suite test/contract/runtime.contract.ts
 * runs on both), but nothing runs: a "container" is a record, its "process" is `state`, a plain
 * object a test may read and change (`fakeState(name)`), which travels with a migration.
 *
 * Migrations are real on disk (fake-images.ts), so the transfer layer can copy them between two
 * fakes: `dump` and `checkpoint` write them under `migrationPaths(id)`; `restore` on another
 * FakeRuntime reads them from its own `migrationPaths(id)` and fails like runc would when they
 * are absent. A lazy dump "listens" on its page server address in a registry shared by all fakes
 * of the process, so a lazy restore from an address nobody serves fails as it would for real.
 * Not modelled: lazy pages being consumed (a lazy rollback always works here).
 */
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ChipmunkError, ConflictError, InvalidInputError, NotFoundError, RuntimeFailedError } from '../../shared/errors.js';
import type { AgentContainer, ContainerSpec, ContainerStats, DumpState, HostCapabilities, MigrationMode } from '../../shared/protocol.js';
import { removeTree } from '../../shared/remove-tree.js';
import { MIN_MEMORY_BYTES } from '../../shared/units.js';
import { fakePageServers, readFakeImages, writeFakeImages, type FakeCriuImages, type FakeLogs } from './fake-images.js';
import type { ContainerRuntime, RemoveOptions, DumpOptions, DumpOutcome, LocalCheckpoint, LogStream, MigrationPaths, RestoreOptions } from './types.js';

export interface FakeRuntimeOptions {
  node?: string;
  /** Where migration trees go; a fresh temporary directory (removed by close()) by default. */
  dataDir?: string;
  /** Images this node "has"; anything else is an unknown image. */
  knownImages?: Iterable<string>;
  capabilities?: Partial<HostCapabilities>;
  /** First three octets of container addresses. */
  ipPrefix?: string;
}

interface FakeContainer {
  spec: ContainerSpec;
  generation: number;
  status: 'running' | 'stopped';
  ip: string;
  pid: number;
  createdAt: string;
  logs: FakeLogs;
  state: Record<string, unknown>;
  migration?: { id: string; role: 'source' | 'target'; mode: MigrationMode; pageServer?: string };
  /** Target side: the migration that restored it here, so abortRestore can still undo it. */
  restoredBy?: string;
}

export const FAKE_DEFAULT_IMAGES = ['chipmunk/statefulapp', 'chipmunk/busybox'];

let nextPid = 1000;

export class FakeRuntime implements ContainerRuntime {
  readonly capabilities: HostCapabilities;
  readonly node: string;
  readonly dataDir: string;
  readonly knownImages: Set<string>;
  private readonly ownsDataDir: boolean;
  private readonly ipPrefix: string;
  private readonly containers = new Map<string, FakeContainer>();
  private nextHost = 2;

  constructor(opts: FakeRuntimeOptions = {}) {
    this.node = opts.node ?? 'fake';
    this.ownsDataDir = !opts.dataDir;
    this.dataDir = opts.dataDir ?? join(tmpdir(), `chipmunk-fake-${this.node}-${randomBytes(4).toString('hex')}`);
    this.knownImages = new Set(opts.knownImages ?? FAKE_DEFAULT_IMAGES);
    this.capabilities = { lazyMigration: true, softDirty: false, criuVersion: 'fake', cgroupMode: 'v2', ...opts.capabilities };
    this.ipPrefix = opts.ipPrefix ?? '198.19.0';
  }

  /** The fake process's memory: survives dump/restore, checkpoint/restore and rollback. */
  fakeState(name: string): Record<string, unknown> {
    return this.find(name).state;
  }

  /** Appends to the container's log, as its process would. */
  fakeLog(name: string, text: string, stream: 'stdout' | 'stderr' = 'stdout'): void {
    this.find(name).logs[stream] += text.endsWith('\n') ? text : `${text}\n`;
  }

  // ------------------------------------------------------------------ lifecycle

  async run(spec: ContainerSpec): Promise<AgentContainer> {
    if (spec.memoryBytes > 0 && spec.memoryBytes < MIN_MEMORY_BYTES) {
      throw new InvalidInputError(`memory limit ${spec.memoryBytes} bytes is too small: give at least 6m`, { memoryBytes: spec.memoryBytes });
    }
    this.assertNameFree(spec.name);
    this.assertPortsFree(spec);
    this.assertImageKnown(spec.image);
    const c = this.newContainer(spec, 0);
    c.logs.stdout = `fake: ${spec.name} started on ${this.node}\n`;
    this.containers.set(spec.name, c);
    return this.view(c);
  }

  async get(name: string): Promise<AgentContainer> {
    return this.view(this.find(name));
  }

  async list(): Promise<AgentContainer[]> {
    return [...this.containers.keys()].sort().map((n) => this.view(this.containers.get(n)!));
  }

  async stop(name: string): Promise<AgentContainer> {
    const c = this.find(name);
    this.assertNotMigrating(c);
    c.status = 'stopped';
    return this.view(c);
  }

  async remove(name: string, opts: RemoveOptions = {}): Promise<void> {
    const c = this.find(name);
    if (!opts.fenced) this.assertNotMigrating(c);
    if (c.status === 'running' && !opts.force) {
      throw new ConflictError(`container '${name}' is running: stop it first or remove it with force`, { name });
    }
    this.containers.delete(name);
    if (c.migration) {
      if (c.migration.pageServer) fakePageServers.delete(c.migration.pageServer);
      await this.removeMigrationDir(c.migration.id);
    }
  }

  async logs(name: string, opts: { stream?: LogStream; tailLines?: number } = {}): Promise<string> {
    const { stdout, stderr } = this.find(name).logs;
    const stream = opts.stream ?? 'all';
    let text = stream === 'stdout' ? stdout : stream === 'stderr' ? stderr : stdout + stderr;
    if (opts.tailLines !== undefined) text = text.split('\n').slice(-opts.tailLines - 1).join('\n');
    return text;
  }

  async stats(name: string): Promise<ContainerStats> {
    const c = this.find(name);
    if (c.status !== 'running' || c.migration) throw new ConflictError(`container '${name}' is not running, so it has no stats`, { name });
    return { name, cpuUsageNs: 0, memoryBytes: 0, ...(c.spec.memoryBytes ? { memoryLimitBytes: c.spec.memoryBytes } : {}), pids: 1 };
  }

  // ------------------------------------------------------------------ migration

  migrationPaths(migrationId: string): MigrationPaths {
    const dir = this.migrationDir(migrationId);
    return { images: join(dir, 'images'), files: join(dir, 'files') };
  }

  async dump(name: string, opts: DumpOptions): Promise<DumpOutcome> {
    if (opts.mode === 'lazy' && !this.capabilities.lazyMigration) {
      throw new ChipmunkError('CHIPMUNK_CAPABILITY_MISSING', `lazy migration needs userfaultfd, which node ${this.node} lacks: use --mode copy`, {
        status: 422,
      });
    }
    if (opts.mode === 'lazy' && !opts.pageServer) throw new InvalidInputError('a lazy dump needs a page server address and port');
    const c = this.find(name);
    this.assertNotMigrating(c);
    if (c.status !== 'running') {
      throw new ConflictError(`container '${name}' is not running on node ${this.node}; only running containers migrate`, { name });
    }
    if (opts.pageServer && fakePageServers.has(fakePageServers.key(opts.pageServer))) {
      throw new RuntimeFailedError(`dump of '${name}' failed: page server address ${fakePageServers.key(opts.pageServer)} is in use`, { op: 'runc checkpoint' });
    }
    c.migration = { id: opts.migrationId, role: 'source', mode: opts.mode };
    if (opts.mode === 'lazy') {
      c.migration.pageServer = fakePageServers.key(opts.pageServer!);
      fakePageServers.add(c.migration.pageServer);
    }
    delete c.restoredBy;
    const frozenAt = Date.now();
    const paths = this.migrationPaths(opts.migrationId);
    const image: FakeCriuImages = { migrationId: opts.migrationId, mode: opts.mode, spec: c.spec, generation: c.generation, state: c.state };
    let written: { imageBytes: number; filesBytes: number };
    try {
      written = await writeFakeImages(paths, image, c.logs);
    } catch (err) {
      if (c.migration.pageServer) fakePageServers.delete(c.migration.pageServer);
      delete c.migration;
      throw new RuntimeFailedError(`dump of '${name}' failed: ${(err as Error).message}`, { op: 'runc checkpoint' }, err);
    }
    return { imageBytes: written.imageBytes, upperBytes: written.filesBytes, frozenAt };
  }

  async checkpoint(name: string, checkpointId: string): Promise<LocalCheckpoint> {
    const c = this.find(name);
    this.assertNotMigrating(c);
    if (c.status !== 'running') {
      throw new ConflictError(`container '${name}' is not running on node ${this.node}; only running containers can be checkpointed`, { name });
    }
    const dir = join(this.dataDir, 'checkpoints', checkpointId);
    const paths: MigrationPaths = { images: join(dir, 'images'), files: join(dir, 'files') };
    const image: FakeCriuImages = { migrationId: checkpointId, mode: 'copy', spec: c.spec, generation: c.generation, state: structuredClone(c.state) };
    const written = await writeFakeImages(paths, image, c.logs);
    return { paths, frozenMs: 0, frozenPhases: { preCopyMs: 0, pauseMs: 0, filesMs: 0, dumpMs: 0, resumeMs: 0 }, ...written };
  }

  async discardCheckpoint(checkpointId: string): Promise<void> {
    await removeTree(join(this.dataDir, 'checkpoints', checkpointId));
  }

  async recoverAtStart(): Promise<{ resumed: string[]; abandoned: string[] }> {
    await removeTree(join(this.dataDir, 'checkpoints'));
    return { resumed: [], abandoned: [] };
  }

  async rollback(migrationId: string): Promise<AgentContainer> {
    const c = this.findByMigration(migrationId, 'source');
    c.generation += 1;
    c.status = 'running';
    c.pid = nextPid++;
    if (c.migration?.pageServer) fakePageServers.delete(c.migration.pageServer);
    delete c.migration;
    return this.view(c);
  }

  async dumpState(migrationId: string): Promise<DumpState> {
    const c = [...this.containers.values()].find((x) => x.migration?.id === migrationId && x.migration.role === 'source');
    return c ? { migrationId, canRollBack: true } : { migrationId, canRollBack: false, reason: `node ${this.node} has no dump of migration ${migrationId}` };
  }

  async finishMigration(migrationId: string): Promise<void> {
    const c = [...this.containers.values()].find((x) => x.migration?.id === migrationId && x.migration.role === 'source');
    if (c?.migration?.pageServer) fakePageServers.delete(c.migration.pageServer);
    if (c) this.containers.delete(c.spec.name);
    await this.removeMigrationDir(migrationId);
  }

  async restore(spec: ContainerSpec, opts: RestoreOptions): Promise<AgentContainer> {
    if (opts.mode === 'lazy' && !opts.pageServer) throw new InvalidInputError('lazy restore needs the source page server address and port');
    if (this.containers.has(spec.name)) {
      throw new ConflictError(`node ${this.node} already has a container named '${spec.name}'`, { name: spec.name });
    }
    this.assertPortsFree(spec);
    this.assertImageKnown(spec.image);
    // Reserved while the images are read, as RuncRuntime's record with its migration mark.
    const c = this.newContainer(spec, opts.generation);
    c.migration = { id: opts.migrationId, role: 'target', mode: opts.mode };
    this.containers.set(spec.name, c);
    try {
      const paths = this.migrationPaths(opts.migrationId);
      const { image, logs } = await readFakeImages(paths);
      if (!image) {
        throw new RuntimeFailedError(`runc restore of '${spec.name}' failed: no CRIU images for migration ${opts.migrationId} in ${paths.images}`, {
          op: 'runc restore',
        });
      }
      if (opts.mode === 'lazy' && !fakePageServers.has(fakePageServers.key(opts.pageServer!))) {
        throw new RuntimeFailedError(
          `runc restore of '${spec.name}' failed: the CRIU lazy-pages daemon failed fetching memory from the page server ${fakePageServers.key(opts.pageServer!)}`,
          { op: 'runc restore' },
        );
      }
      c.state = image.state;
      if (logs) c.logs = logs;
      delete c.migration;
      c.restoredBy = opts.migrationId;
      return this.view(c);
    } catch (err) {
      this.containers.delete(spec.name);
      throw err;
    }
  }

  async prepareRestore(spec: ContainerSpec): Promise<void> {
    if (!this.knownImages.has(spec.image)) throw new InvalidInputError(`unknown image '${spec.image}'`, { image: spec.image });
  }

  async settleRestore(migrationId: string): Promise<{ lazyPagesBytes: number }> {
    await this.removeMigrationDir(migrationId);
    return { lazyPagesBytes: 0 };
  }

  async abortRestore(migrationId: string): Promise<void> {
    const c = [...this.containers.values()].find(
      (x) => (x.migration?.id === migrationId && x.migration.role === 'target') || x.restoredBy === migrationId,
    );
    if (c) this.containers.delete(c.spec.name);
    await this.removeMigrationDir(migrationId);
  }

  async close(): Promise<void> {
    if (this.ownsDataDir && existsSync(this.dataDir)) await removeTree(this.dataDir);
  }

  // ------------------------------------------------------------------ helpers

  private newContainer(spec: ContainerSpec, generation: number): FakeContainer {
    return {
      spec,
      generation,
      status: 'running',
      ip: `${this.ipPrefix}.${this.nextHost++}`,
      pid: nextPid++,
      createdAt: new Date().toISOString(),
      logs: { stdout: '', stderr: '' },
      state: {},
    };
  }

  private migrationDir(migrationId: string): string {
    return join(this.dataDir, 'migrations', migrationId);
  }

  private async removeMigrationDir(migrationId: string): Promise<void> {
    const dir = this.migrationDir(migrationId);
    if (existsSync(dir)) await removeTree(dir);
  }

  private find(name: string): FakeContainer {
    const c = this.containers.get(name);
    if (!c) throw new NotFoundError(`no container named '${name}' on node ${this.node}`, { name, node: this.node });
    return c;
  }

  private findByMigration(migrationId: string, role: 'source' | 'target'): FakeContainer {
    const c = [...this.containers.values()].find((x) => x.migration?.id === migrationId && x.migration.role === role);
    if (!c) throw new NotFoundError(`no ${role} container for migration ${migrationId} on node ${this.node}`, { migrationId });
    return c;
  }

  private assertNameFree(name: string): void {
    if (this.containers.has(name)) {
      throw new ConflictError(`a container named '${name}' already exists on node ${this.node}: pick another name or remove it first`, { name });
    }
  }

  private assertImageKnown(image: string): void {
    if (!this.knownImages.has(image)) {
      throw new InvalidInputError(`unknown image '${image}': it is not in this node's Podman store ('podman images' lists what is there; build or load it first)`, {
        image,
      });
    }
  }

  private assertNotMigrating(c: FakeContainer): void {
    if (c.migration) {
      throw new ConflictError(`container '${c.spec.name}' is being migrated (${c.migration.id}); try again when it is done`, {
        name: c.spec.name,
        migrationId: c.migration.id,
      });
    }
  }

  private assertPortsFree(spec: ContainerSpec): void {
    const seen = new Set<string>();
    for (const p of spec.ports) {
      const key = `${p.hostPort}/${p.protocol}`;
      if (seen.has(key)) throw new InvalidInputError(`host port ${key} is published twice`, { port: p.hostPort });
      seen.add(key);
    }
    for (const [n, c] of this.containers) {
      if (n === spec.name) continue;
      for (const p of c.spec.ports) {
        if (seen.has(`${p.hostPort}/${p.protocol}`)) {
          throw new ConflictError(`host port ${p.hostPort}/${p.protocol} is already published by container '${n}' on node ${this.node}`, {
            port: p.hostPort,
            container: n,
          });
        }
      }
    }
  }

  private view(c: FakeContainer): AgentContainer {
    const status: AgentContainer['status'] = c.migration ? 'migrating' : c.status;
    return {
      name: c.spec.name,
      spec: c.spec,
      status,
      generation: c.generation,
      ip: c.ip,
      ...(status === 'running' ? { pid: c.pid } : {}),
      createdAt: c.createdAt,
    };
  }
}
