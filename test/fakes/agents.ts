/**
 * In-memory agents for controller tests. They keep just enough state to check the migration
 * invariant (each container runs exactly once), record every call in order across the cluster,
 * and fail or pause a chosen call on demand. They answer as real agents do, errors included:
 * test/unit/agent-contract-fake.test.ts runs the agent contract (test/contract/agent.contract.ts)
 * against them, and test/integration/agent-contract.test.ts the same suite against real agents.
 */
import { CapabilityMissingError, ConflictError, InvalidInputError, NotFoundError, RuntimeFailedError, TransferFailedError, UnavailableError } from '../../src/shared/errors.js';
import type {
  AgentContainer,
  AgentInfo,
  ContainerSpec,
  ContainerStats,
  DumpRequest,
  DumpResult,
  DumpState,
  RegisterNodeRequest,
  PrepareRequest,
  RestoreRequest,
  RestoreResult,
  SettleResult,
  TakeCheckpointRequest,
  TakeCheckpointResult,
  TransferProgress,
  UploadCheckpointRequest,
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

/** A migration (or a restore from the store) on its target agent: prepared, then restored. */
interface TargetRestore {
  name: string;
  mode: 'lazy' | 'copy';
  restored: boolean;
}

/** A migration's dump on its source agent. */
interface Dump {
  name: string;
  bytes: number;
  mode: 'lazy' | 'copy';
  /** Lazy mode: a target pulled pages from the page server, so the memory left this node. */
  pagesPulled?: boolean;
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

  /** One replica, the controller's own; the fake agents' uploads land in this catalog directly. */
  async uploadTargets(): Promise<string[]> {
    return ['http://controller'];
  }

  async committed(info: CheckpointInfo, replicas: string[]): Promise<CheckpointSummary> {
    return { ...info, replicas: replicas.map((url) => ({ url, state: 'intact' as const })) };
  }

  async readFrom(): Promise<string[]> {
    return ['http://controller'];
  }
}

export class FakeCluster {
  /** Every agent call, in order: "node1.dump". */
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
  readonly dumpRequests: DumpRequest[] = [];
  /** Dumps of migrations in flight, by migration id. */
  readonly dumps = new Map<string, Dump>();
  /** Checkpoints taken and not discarded: id -> container name. */
  readonly checkpoints = new Map<string, string>();
  /** Migrations this agent is the target of, by id: what `abort` removes and `settle` ends. */
  private readonly targets = new Map<string, TargetRestore>();
  private readonly failures = new Map<AgentMethod, InjectedFailure>();
  private readonly gates = new Map<AgentMethod, Promise<void>>();
  private nextIp = 2;
  /** Its host is dead: every call fails as an unreachable agent's would (UnavailableError). */
  down = false;
  /** The next restore starts the container, which dies at once (its memory pages could not be had). */
  crashNextRestore = false;
  /** Set: a lazy restore's daemon ends badly (its source went away mid-transfer); settle says so. */
  lazyPagesFailure?: string;

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
      if (this.containers.has(spec.name)) throw new ConflictError(`a container named '${spec.name}' already exists on node ${this.node}`, { name: spec.name });
      // The fake nodes lack exactly the images whose name starts with "missing".
      if (/(^|\/)missing/.test(spec.image)) throw new InvalidInputError(`unknown image '${spec.image}': it is not in node ${this.node}'s image store`, { image: spec.image });
      return this.start(spec, 0);
    });
  }

  get(name: string): Promise<AgentContainer> {
    return this.step('get', () => this.require(name));
  }

  stop(name: string): Promise<AgentContainer> {
    return this.step('stop', () => {
      const container = this.requireNotMigrating(name);
      container.status = 'stopped';
      return container;
    });
  }

  remove(name: string): Promise<void> {
    return this.step('remove', () => {
      this.requireNotMigrating(name);
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

  dump(name: string, req: DumpRequest): Promise<DumpResult> {
    return this.step('dump', () => {
      this.dumpRequests.push(req);
      if (req.mode === 'lazy' && !this.lazyMigration) throw new CapabilityMissingError(`lazy migration needs userfaultfd, which node ${this.node} lacks: use --mode copy`);
      if (req.mode === 'lazy' && req.pageServerPort === undefined) throw new InvalidInputError('a lazy dump needs a page server address and port');
      const container = this.requireNotMigrating(name);
      if (container.status !== 'running') throw new ConflictError(`container '${name}' is not running on node ${this.node}; only running containers migrate`, { name });
      // Dumped (copy) or frozen behind a page server (lazy): either way it no longer runs here.
      container.status = 'migrating';
      this.dumps.set(req.migrationId, { name, bytes: 4096, mode: req.mode });
      return {
        migrationId: req.migrationId,
        imageBytes: 4000,
        upperBytes: 96,
        frozenAt: Date.now(),
        ...(req.mode === 'lazy' ? { pageServer: { address: this.address, port: req.pageServerPort! } } : {}),
        steps: [{ step: 'criu-dump', at: Date.now(), ms: 1 }],
      };
    });
  }

  restore(migrationId: string, req: RestoreRequest): Promise<RestoreResult> {
    return this.step('restore', () => {
      const prepared = this.targets.get(migrationId);
      if (this.containers.has(req.spec.name) && prepared?.name !== req.spec.name) {
        throw new ConflictError(`node ${this.node} already has a container named '${req.spec.name}'`, { name: req.spec.name });
      }
      if (req.checkpoint) {
        const stored = this.cluster.catalog.find(req.spec.name, req.checkpoint.id);
        if (!stored || stored.corrupt) throw new TransferFailedError(`checkpoint ${req.checkpoint.id} of ${req.spec.name} cannot be read from the store`);
        const container = this.start(req.spec, req.generation);
        this.targets.set(migrationId, { name: req.spec.name, mode: req.mode, restored: true });
        return { container, bytesTransferred: stored.logicalBytes, restoredAt: Date.now() };
      }
      const source = this.cluster.agent(req.source.node);
      if (source.down) throw new TransferFailedError(`agent ${req.source.node} is unreachable: fetching the dump failed`);
      const dump = source.dumps.get(migrationId);
      if (!dump) throw new TransferFailedError(`no dump of migration ${migrationId} on ${req.source.node}`);
      // A lazy restore pulls pages from the source's page server: from here its memory is split.
      if (req.pageServer) dump.pagesPulled = true;
      const container = this.start(req.spec, req.generation);
      this.targets.set(migrationId, { name: req.spec.name, mode: req.mode, restored: true });
      if (this.crashNextRestore) {
        this.crashNextRestore = false;
        container.status = 'stopped';
        throw new RuntimeFailedError('the restored process died: a memory page could not be fetched', { op: 'restore' });
      }
      return { container, bytesTransferred: dump.bytes, restoredAt: Date.now(), steps: [{ step: 'fetch-images', at: Date.now(), ms: 2 }, { step: 'criu-restore', at: Date.now(), ms: 3 }] };
    });
  }

  dumpState(migrationId: string): Promise<DumpState> {
    return this.step('dumpState', () => {
      const dump = this.dumps.get(migrationId);
      if (!dump) return { migrationId, canRollBack: false, reason: `${this.node} has no dump of migration ${migrationId}` };
      if (dump.pagesPulled) return { migrationId, canRollBack: false, reason: `a target pulled memory pages from ${this.node}'s page server` };
      return { migrationId, canRollBack: true };
    });
  }

  rollback(migrationId: string): Promise<AgentContainer> {
    return this.step('rollback', () => {
      const dump = this.dumps.get(migrationId);
      if (!dump) throw new NotFoundError(`no migration ${migrationId} on ${this.node}`);
      if (dump.pagesPulled) throw new RuntimeFailedError(`cannot roll '${dump.name}' back on node ${this.node}: a target pulled its memory pages`, { op: 'rollback' });
      this.dumps.delete(migrationId);
      const container = this.require(dump.name);
      if (container.status !== 'running') {
        container.status = 'running';
        container.generation += 1;
      }
      return container;
    });
  }

  finish(migrationId: string): Promise<void> {
    return this.step('finish', () => {
      // Idempotent: a finish asked again (its answer was lost) finds nothing left to do.
      const dump = this.dumps.get(migrationId);
      if (!dump) return;
      this.dumps.delete(migrationId);
      this.containers.delete(dump.name);
    });
  }

  prepare(migrationId: string, req: PrepareRequest): Promise<void> {
    return this.step('prepare', () => {
      if (this.targets.get(migrationId)?.name === req.spec.name) return;
      if (this.containers.has(req.spec.name)) throw new ConflictError(`node ${this.node} already has a container named '${req.spec.name}'`, { name: req.spec.name });
      // Image and network ready, nothing running: the name is taken on this node from here.
      const container = this.start(req.spec, req.generation);
      container.status = 'migrating';
      this.targets.set(migrationId, { name: req.spec.name, mode: req.mode, restored: false });
    });
  }

  progress(migrationId: string): Promise<TransferProgress> {
    return this.step('progress', () => ({ migrationId, what: 'images' as const, bytes: 0 }));
  }

  settle(migrationId: string): Promise<SettleResult> {
    return this.step('settle', () => {
      // Idempotent, like the real one: an unknown or settled migration has no pages left to wait for.
      const target = this.targets.get(migrationId);
      if (!target?.restored) return { lazyPagesBytes: 0 };
      this.targets.delete(migrationId);
      if (target.mode === 'lazy' && this.lazyPagesFailure) return { lazyPagesBytes: 0, lazyPagesFailed: this.lazyPagesFailure };
      return { lazyPagesBytes: target.mode === 'lazy' ? FAKE_LAZY_PAGES_BYTES : 0 };
    });
  }

  abort(migrationId: string): Promise<void> {
    return this.step('abort', () => {
      const target = this.targets.get(migrationId);
      if (target) this.containers.delete(target.name);
      this.targets.delete(migrationId);
    });
  }

  checkpoint(name: string, req: TakeCheckpointRequest): Promise<TakeCheckpointResult> {
    return this.step('checkpoint', () => {
      const container = this.requireNotMigrating(name);
      if (container.status !== 'running') throw new ConflictError(`container '${name}' is not running on node ${this.node}; only running containers can be checkpointed`, { name });
      this.checkpoints.set(req.checkpointId, name);
      return { checkpointId: req.checkpointId, frozenMs: 1, imageBytes: 4000, filesBytes: 96 };
    });
  }

  uploadCheckpoint(checkpointId: string, req: UploadCheckpointRequest): Promise<CheckpointInfo> {
    return this.step('uploadCheckpoint', () => {
      if (!this.checkpoints.has(checkpointId)) throw new NotFoundError(`no checkpoint ${checkpointId} on ${this.node}`);
      return this.cluster.catalog.add(req.container, req.logPosition);
    });
  }

  discardCheckpoint(checkpointId: string): Promise<void> {
    return this.step('discardCheckpoint', () => {
      this.checkpoints.delete(checkpointId);
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

  /** A container a migration holds (dumped here, or prepared or restored here) takes no other operation. */
  private requireNotMigrating(name: string): AgentContainer {
    const container = this.require(name);
    if (container.status === 'migrating') throw new ConflictError(`container '${name}' is being migrated on node ${this.node}; try again when it is done`, { name });
    return container;
  }

  /** One call: recorded, possibly held or failed, and answered with a copy as over the wire. */
  private async step<T>(method: AgentMethod, effect: () => T): Promise<T> {
    this.cluster.calls.push(`${this.node}.${method}`);
    await this.gates.get(method);
    if (this.down) throw new UnavailableError(`agent ${this.node} is unreachable at ${this.registration().url} (ECONNREFUSED)`, { code: 'ECONNREFUSED' });
    const failure = this.failures.get(method);
    this.failures.delete(method);
    if (failure && !failure.afterEffect) throw failure.error;
    const result = effect();
    if (failure) throw failure.error;
    return structuredClone(result);
  }
}
