/**
 * The real runtime: containers on runc, dumps, checkpoints and restores through runc's CRIU
 * integration (CRIU >= 4.2 installed by setup), file systems as overlays over Podman's image
 * store, networks from CNI plugins. This class is the facade; the work is split by concern:
 *   lifecycle.ts         run, get, list, stop, remove, logs, stats
 *   source-migration.ts  dump, rollback, finish (the node a container leaves)
 *   target-restore.ts    prepare, restore, settle, abort (the node it comes to)
 *   local-checkpoints.ts checkpoints that leave it running, and their recovery at agent start
 *   criu.ts              everything asked of CRIU; runc.ts: runc itself
 *   records.ts, layout.ts  the per-container record, and where things live on disk
 */
import type { AgentContainer, ContainerSpec, ContainerStats, DumpState, HostCapabilities } from '../../shared/protocol.js';
import { RuntimeContext, type RuncRuntimeOptions } from './context.js';
import { ContainerLifecycle } from './lifecycle.js';
import { LocalCheckpoints } from './local-checkpoints.js';
import { SourceMigrations } from './source-migration.js';
import { TargetRestores } from './target-restore.js';
import type { ContainerRuntime, RemoveOptions, DumpOptions, DumpOutcome, LocalCheckpoint, LogStream, MigrationPaths, PrepareOptions, RestoreOptions } from './types.js';

export type { RuncRuntimeOptions } from './context.js';

export class RuncRuntime implements ContainerRuntime {
  readonly capabilities: HostCapabilities;
  private readonly lifecycle: ContainerLifecycle;
  private readonly source: SourceMigrations;
  private readonly target: TargetRestores;
  private readonly checkpoints: LocalCheckpoints;

  constructor(opts: RuncRuntimeOptions) {
    this.capabilities = opts.capabilities;
    const ctx = new RuntimeContext(opts);
    this.lifecycle = new ContainerLifecycle(ctx);
    this.source = new SourceMigrations(ctx);
    this.target = new TargetRestores(ctx);
    this.checkpoints = new LocalCheckpoints(ctx);
  }

  run(spec: ContainerSpec): Promise<AgentContainer> {
    return this.lifecycle.run(spec);
  }

  get(name: string): Promise<AgentContainer> {
    return this.lifecycle.get(name);
  }

  list(): Promise<AgentContainer[]> {
    return this.lifecycle.list();
  }

  stop(name: string, opts?: { timeoutMs?: number }): Promise<AgentContainer> {
    return this.lifecycle.stop(name, opts);
  }

  remove(name: string, opts?: RemoveOptions): Promise<void> {
    return this.lifecycle.remove(name, opts);
  }

  logs(name: string, opts?: { stream?: LogStream; tailLines?: number }): Promise<string> {
    return this.lifecycle.logs(name, opts);
  }

  stats(name: string): Promise<ContainerStats> {
    return this.lifecycle.stats(name);
  }

  migrationPaths(migrationId: string): MigrationPaths {
    return this.source.migrationPaths(migrationId);
  }

  dump(name: string, opts: DumpOptions): Promise<DumpOutcome> {
    return this.source.dump(name, opts);
  }

  rollback(migrationId: string): Promise<AgentContainer> {
    return this.source.rollback(migrationId);
  }

  dumpState(migrationId: string): Promise<DumpState> {
    return this.source.dumpState(migrationId);
  }

  finishMigration(migrationId: string): Promise<void> {
    return this.source.finishMigration(migrationId);
  }

  prepareRestore(spec: ContainerSpec, opts: PrepareOptions): Promise<void> {
    return this.target.prepareRestore(spec, opts);
  }

  restore(spec: ContainerSpec, opts: RestoreOptions): Promise<AgentContainer> {
    return this.target.restore(spec, opts);
  }

  settleRestore(migrationId: string): Promise<{ lazyPagesBytes: number }> {
    return this.target.settleRestore(migrationId);
  }

  abortRestore(migrationId: string): Promise<void> {
    return this.target.abortRestore(migrationId);
  }

  checkpoint(name: string, checkpointId: string): Promise<LocalCheckpoint> {
    return this.checkpoints.checkpoint(name, checkpointId);
  }

  discardCheckpoint(checkpointId: string): Promise<void> {
    return this.checkpoints.discardCheckpoint(checkpointId);
  }

  async recoverAtStart(): Promise<{ resumed: string[]; abandoned: string[] }> {
    const resumed = await this.checkpoints.recoverInterruptedCheckpoints();
    const abandoned = await this.target.removeAbandoned();
    return { resumed, abandoned };
  }

  async close(): Promise<void> {
    // Containers, log writers, lazy-pages daemons and dumps' page servers are detached on
    // purpose: they outlive the agent.
  }
}
