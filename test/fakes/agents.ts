/**
 * In-memory agents for controller tests. They keep just enough state to check the migration
 * invariant (each container runs exactly once), record every call in order across the cluster,
 * and fail or pause a chosen call on demand.
 */
import { ConflictError, NotFoundError, TransferFailedError } from '../../src/shared/errors.js';
import type {
  AgentContainer,
  AgentInfo,
  CheckpointRequest,
  CheckpointResult,
  ContainerSpec,
  ContainerStats,
  RegisterNodeRequest,
  PrepareRequest,
  RestoreRequest,
  RestoreResult,
  SettleResult,
  SnapshotRequest,
  SnapshotResult,
  TransferProgress,
  UploadSnapshotRequest,
} from '../../src/shared/protocol.js';
import type { CheckpointInfo, CheckpointSummary } from '../../src/checkpoint-store/index.js';
import type { CheckpointCatalog } from '../../src/controller/checkpoints.js';
import type { AgentApi, LogsOptions } from '../../src/controller/agent-client.js';
import type { AgentResolver } from '../../src/controller/containers.js';

/** What every fake restore reports as copied lazily, after the images. */
export const FAKE_LAZY_PAGES_BYTES = 8192;

export type AgentMethod = keyof AgentApi;

interface InjectedFailure {
  error: Error;
  /** Fail after the call had its effect (a restore that started the container, then timed out). */
  afterEffect: boolean;
}

interface Checkpoint {
  name: string;
  bytes: number;
}

/** The checkpoint store as the fake agents upload to it and restore from it. */
export class FakeCheckpointCatalog implements CheckpointCatalog {
  readonly checkpoints = new Map<string, CheckpointInfo[]>();
  private next = 1;

  add(container: string, logPosition: CheckpointSummary['logPosition']): CheckpointInfo {
    const info: CheckpointInfo = { id: (this.next++).toString(16).padStart(16, '0'), container, time: Date.now(), logicalBytes: 4096, newBytes: 4096, logPosition, parts: [] };
    this.checkpoints.set(container, [info, ...(this.checkpoints.get(container) ?? [])]);
    return info;
  }

  find(container: string, id: string): CheckpointInfo | undefined {
    return this.checkpoints.get(container)?.find((c) => c.id === id);
  }

  async list(container: string): Promise<CheckpointSummary[]> {
    return structuredClone(this.checkpoints.get(container) ?? []);
  }

  async forget(container: string): Promise<void> {
    this.checkpoints.delete(container);
  }
}

export class FakeCluster {
  /** Every agent call, in order: "node1.checkpoint". */
  readonly calls: string[] = [];
  readonly catalog = new FakeCheckpointCatalog();
  private readonly agents = new Map<string, FakeAgent>();

  add(name: string, opts: { lazyMigration?: boolean } = {}): FakeAgent {
    const agent = new FakeAgent(this, name, this.agents.size + 1, opts.lazyMigration ?? true);
    this.agents.set(name, agent);
    return agent;
  }

  agent(name: string): FakeAgent {
    const agent = this.agents.get(name);
    if (!agent) throw new Error(`no fake agent ${name}`);
    return agent;
  }

  readonly resolver: AgentResolver = (node) => this.agent(node.name);

  /** How many nodes run the container now: 1 is the only right answer after any migration. */
  runningCopies(name: string): number {
    return [...this.agents.values()].filter((agent) => agent.containers.get(name)?.status === 'running').length;
  }

  callIndex(call: string): number {
    return this.calls.indexOf(call);
  }
}

export class FakeAgent implements AgentApi {
  readonly containers = new Map<string, AgentContainer>();
  readonly checkpointRequests: CheckpointRequest[] = [];
  readonly checkpoints = new Map<string, Checkpoint>();
  /** Snapshots taken and not discarded: id -> container name. */
  readonly snapshots = new Map<string, string>();
  private readonly restoredBy = new Map<string, string>();
  private readonly failures = new Map<AgentMethod, InjectedFailure>();
  private readonly gates = new Map<AgentMethod, Promise<void>>();
  private nextIp = 2;

  constructor(
    private readonly cluster: FakeCluster,
    readonly node: string,
    private readonly index: number,
    readonly lazyMigration: boolean,
  ) {}

  get address(): string {
    return `10.0.0.${this.index}`;
  }

  registration(): RegisterNodeRequest {
    return {
      name: this.node,
      address: this.address,
      url: `http://${this.address}:7070`,
      capabilities: { lazyMigration: this.lazyMigration, softDirty: true, cgroupMode: 'v2' },
    };
  }

  /** The next call of `method` throws `error`. */
  failNext(method: AgentMethod, error: Error, opts: { afterEffect?: boolean } = {}): void {
    this.failures.set(method, { error, afterEffect: opts.afterEffect ?? false });
  }

  /** Calls of `method` wait until the returned function is called. */
  hold(method: AgentMethod): () => void {
    let release!: () => void;
    this.gates.set(method, new Promise<void>((resolve) => (release = resolve)));
    return () => {
      this.gates.delete(method);
      release();
    };
  }

  info(): Promise<AgentInfo> {
    return this.step('info', () => ({ node: this.node, address: this.address, apiPort: 7070, capabilities: this.registration().capabilities, version: 'fake' }));
  }

  listContainers(): Promise<AgentContainer[]> {
    return this.step('listContainers', () => [...this.containers.values()]);
  }

  run(spec: ContainerSpec): Promise<AgentContainer> {
    return this.step('run', () => {
      if (spec.image.startsWith('missing')) throw new NotFoundError(`image ${spec.image} not found on ${this.node}: build or pull it first`, { image: spec.image });
      if (this.containers.has(spec.name)) throw new ConflictError(`container ${spec.name} exists on ${this.node}`);
      return this.start(spec, 0);
    });
  }

  get(name: string): Promise<AgentContainer> {
    return this.step('get', () => this.require(name));
  }

  stop(name: string): Promise<AgentContainer> {
    return this.step('stop', () => {
      const container = this.require(name);
      container.status = 'stopped';
      return container;
    });
  }

  remove(name: string): Promise<void> {
    return this.step('remove', () => {
      this.require(name);
      this.containers.delete(name);
    });
  }

  logs(name: string, opts: LogsOptions = {}): Promise<string> {
    return this.step('logs', () => {
      this.require(name);
      return `${name} on ${this.node} (${opts.stream ?? 'all'})\n`;
    });
  }

  stats(name: string): Promise<ContainerStats> {
    return this.step('stats', () => {
      this.require(name);
      return { name, cpuUsageNs: 1, memoryBytes: 1 << 20, pids: 1 };
    });
  }

  checkpoint(name: string, req: CheckpointRequest): Promise<CheckpointResult> {
    return this.step('checkpoint', () => {
      this.checkpointRequests.push(req);
      const container = this.require(name);
      if (container.status !== 'running') throw new ConflictError(`${name} is ${container.status} on ${this.node}`);
      // Dumped (copy) or frozen behind a page server (lazy): either way it no longer runs here.
      container.status = 'migrating';
      this.checkpoints.set(req.migrationId, { name, bytes: 4096 });
      return {
        migrationId: req.migrationId,
        imageBytes: 4000,
        upperBytes: 96,
        frozenAt: Date.now(),
        ...(req.pageServerPort !== undefined ? { pageServer: { address: this.address, port: req.pageServerPort } } : {}),
      };
    });
  }

  restore(migrationId: string, req: RestoreRequest): Promise<RestoreResult> {
    return this.step('restore', () => {
      if (req.checkpoint) {
        const stored = this.cluster.catalog.find(req.spec.name, req.checkpoint.id);
        if (!stored || stored.corrupt) throw new TransferFailedError(`checkpoint ${req.checkpoint.id} of ${req.spec.name} cannot be read from the store`);
        const container = this.start(req.spec, req.generation);
        this.restoredBy.set(migrationId, req.spec.name);
        return { container, bytesTransferred: stored.logicalBytes, restoredAt: Date.now() };
      }
      const checkpoint = this.cluster.agent(req.source.node).checkpoints.get(migrationId);
      if (!checkpoint) throw new TransferFailedError(`no checkpoint ${migrationId} on ${req.source.node}`);
      const container = this.start(req.spec, req.generation);
      this.restoredBy.set(migrationId, req.spec.name);
      return { container, bytesTransferred: checkpoint.bytes, restoredAt: Date.now() };
    });
  }

  rollback(migrationId: string): Promise<AgentContainer> {
    return this.step('rollback', () => {
      const checkpoint = this.checkpoints.get(migrationId);
      if (!checkpoint) throw new NotFoundError(`no migration ${migrationId} on ${this.node}`);
      this.checkpoints.delete(migrationId);
      const container = this.require(checkpoint.name);
      if (container.status !== 'running') {
        container.status = 'running';
        container.generation += 1;
      }
      return container;
    });
  }

  finish(migrationId: string): Promise<void> {
    return this.step('finish', () => {
      const checkpoint = this.checkpoints.get(migrationId);
      if (!checkpoint) throw new NotFoundError(`no migration ${migrationId} on ${this.node}`);
      this.checkpoints.delete(migrationId);
      this.containers.delete(checkpoint.name);
    });
  }

  prepare(_migrationId: string, req: PrepareRequest): Promise<void> {
    return this.step('prepare', () => {
      if (this.containers.has(req.spec.name)) throw new ConflictError(`${this.node} already has a container named ${req.spec.name}`);
    });
  }

  progress(migrationId: string): Promise<TransferProgress> {
    return this.step('progress', () => ({ migrationId, what: 'images' as const, bytes: 0 }));
  }

  settle(migrationId: string): Promise<SettleResult> {
    return this.step('settle', () => {
      if (!this.restoredBy.has(migrationId)) throw new NotFoundError(`no restore of migration ${migrationId} on ${this.node}`);
      this.restoredBy.delete(migrationId);
      return { lazyPagesBytes: FAKE_LAZY_PAGES_BYTES };
    });
  }

  abort(migrationId: string): Promise<void> {
    return this.step('abort', () => {
      const name = this.restoredBy.get(migrationId);
      if (name !== undefined) this.containers.delete(name);
      this.restoredBy.delete(migrationId);
    });
  }

  snapshot(name: string, req: SnapshotRequest): Promise<SnapshotResult> {
    return this.step('snapshot', () => {
      const container = this.require(name);
      if (container.status !== 'running') throw new ConflictError(`${name} is ${container.status} on ${this.node}`);
      this.snapshots.set(req.snapshotId, name);
      return { snapshotId: req.snapshotId, frozenMs: 1, imageBytes: 4000, filesBytes: 96 };
    });
  }

  uploadSnapshot(snapshotId: string, req: UploadSnapshotRequest): Promise<CheckpointInfo> {
    return this.step('uploadSnapshot', () => {
      if (!this.snapshots.has(snapshotId)) throw new NotFoundError(`no snapshot ${snapshotId} on ${this.node}`);
      return this.cluster.catalog.add(req.container, req.logPosition);
    });
  }

  discardSnapshot(snapshotId: string): Promise<void> {
    return this.step('discardSnapshot', () => {
      this.snapshots.delete(snapshotId);
    });
  }

  private start(spec: ContainerSpec, generation: number): AgentContainer {
    const container: AgentContainer = {
      name: spec.name,
      spec,
      status: 'running',
      generation,
      ip: `198.19.${this.index}.${this.nextIp++}`,
      createdAt: new Date().toISOString(),
    };
    this.containers.set(spec.name, container);
    return container;
  }

  private require(name: string): AgentContainer {
    const container = this.containers.get(name);
    if (!container) throw new NotFoundError(`no container ${name} on ${this.node}`);
    return container;
  }

  /** One call: recorded, possibly held or failed, and answered with a copy as over the wire. */
  private async step<T>(method: AgentMethod, effect: () => T): Promise<T> {
    this.cluster.calls.push(`${this.node}.${method}`);
    await this.gates.get(method);
    const failure = this.failures.get(method);
    this.failures.delete(method);
    if (failure && !failure.afterEffect) throw failure.error;
    const result = effect();
    if (failure) throw failure.error;
    return structuredClone(result);
  }
}
