/**
 * The container runtime as the agent sees it. RuncRuntime drives runc + CRIU for real;
 * FakeRuntime keeps everything in memory for unit tests of the agent and controller. Both pass
 * the same contract suite (test/contract/runtime.contract.ts).
 *
 * A migration touches two runtimes: the source's `dump` freezes and dumps the container into
 * `migrationPaths(id)`, the transfer layer copies those trees to the target, and the target's
 * `restore` brings it back there. If anything after the dump fails, the
 * source's `rollback` runs the container on the source again; after success the source's
 * `finishMigration` waits for the last lazy pages and removes what is left of it.
 */
import type { AgentContainer, ContainerSpec, ContainerStats, DumpState, HostCapabilities, MigrationMode } from '../../shared/protocol.js';
import type { StepClock } from '../../shared/steps.js';

export type LogStream = 'stdout' | 'stderr' | 'all';

export interface DumpOptions {
  migrationId: string;
  mode: MigrationMode;
  /** Lazy mode: where the source's CRIU page server listens. */
  pageServer?: { address: string; port: number };
  /** Where the dump's steps are recorded (src/shared/steps.ts). */
  steps?: StepClock;
}

export interface DumpOutcome {
  imageBytes: number;
  upperBytes: number;
  /** ms since epoch at which the container was frozen. */
  frozenAt: number;
}

/** A checkpoint (the container ran on): its trees wait on this node for upload. */
export interface LocalCheckpoint {
  /** CRIU images, and a copy of the container's files taken inside the same freeze. */
  paths: MigrationPaths;
  /** How long the container was frozen. */
  frozenMs: number;
  /** Where the frozen time went (bench/checkpoint-freeze). */
  frozenPhases: FrozenPhases;
  imageBytes: number;
  filesBytes: number;
}

/** RuncRuntimeOptions.checkpointFreeze. */
export type CheckpointFreezeMethod = 'copy-in-freeze' | 'pre-copy';

/** A checkpoint's frozen time by step, ms. `preCopy` is spent before the freeze, while the container runs. */
export interface FrozenPhases {
  preCopyMs: number;
  pauseMs: number;
  filesMs: number;
  dumpMs: number;
  resumeMs: number;
}

export interface RestoreOptions {
  migrationId: string;
  mode: MigrationMode;
  generation: number;
  /** Lazy mode: the source's page server, where the lazy-pages daemon fetches memory from. */
  pageServer?: { address: string; port: number };
  /** Where the restore's steps are recorded (src/shared/steps.ts). */
  steps?: StepClock;
}

export interface PrepareOptions {
  migrationId: string;
  mode: MigrationMode;
  generation: number;
}

/** Where a migration's trees live on this node: what the transfer layer sends or fills. */
export interface MigrationPaths {
  /** CRIU image directory. */
  images: string;
  /** The container's file-system changes (overlay upper layer) and logs. */
  files: string;
}

export interface ContainerRuntime {
  readonly capabilities: HostCapabilities;

  run(spec: ContainerSpec): Promise<AgentContainer>;
  get(name: string): Promise<AgentContainer>;
  list(): Promise<AgentContainer[]>;
  stop(name: string, opts?: { timeoutMs?: number }): Promise<AgentContainer>;
  /**
   * `force` removes a running container; `fenced` (the controller fenced it: it runs elsewhere now)
   * also one a migration holds, with its dump process or lazy-pages daemon.
   */
  remove(name: string, opts?: RemoveOptions): Promise<void>;
  logs(name: string, opts?: { stream?: LogStream; tailLines?: number }): Promise<string>;
  stats(name: string): Promise<ContainerStats>;

  migrationPaths(migrationId: string): MigrationPaths;
  dump(name: string, opts: DumpOptions): Promise<DumpOutcome>;
  /**
   * Target side, before the source freezes: everything a restore needs that does not depend on
   * the dump (the network namespace, its address and published ports), so it is not
   * paid for while the container is frozen. Idempotent; undone by `abortRestore`.
   */
  prepareRestore(spec: ContainerSpec, opts: PrepareOptions): Promise<void>;
  /** Target side: the images and files are in `migrationPaths(id)`; run the container here. */
  restore(spec: ContainerSpec, opts: RestoreOptions): Promise<AgentContainer>;
  /**
   * Target side, after the source finished: wait for the lazy-pages daemon to copy the last
   * page, then drop the migration's images. Reports how much memory came over lazily.
   */
  settleRestore(migrationId: string): Promise<{ lazyPagesBytes: number }>;
  /** Target side: undo a restore that failed or was not wanted. Idempotent. */
  abortRestore(migrationId: string): Promise<void>;
  /** Source side: run the dumped container here again. */
  rollback(migrationId: string): Promise<AgentContainer>;
  /** Source side: whether `rollback` can still work (asked before a failed migration is undone). */
  dumpState(migrationId: string): Promise<DumpState>;
  /** Source side, after the target runs it: wait for lazy pages to drain, then clean up. */
  finishMigration(migrationId: string): Promise<void>;

  /**
   * Checkpoints the container and lets it run on: memory and files are captured in one freeze,
   * so they match. The trees stay in `paths` until `discardCheckpoint`.
   */
  checkpoint(name: string, checkpointId: string): Promise<LocalCheckpoint>;
  /** Drops a checkpoint's trees. Idempotent. */
  discardCheckpoint(checkpointId: string): Promise<void>;
  /**
   * At agent start, what the previous agent process left when it died: a checkpoint left its
   * container paused and its trees behind (the container is resumed, the trees dropped); a
   * restore or a preparation as a migration's target left a copy that does not run, or staged
   * data no record refers to (removed: the controller never counts on those after a restart).
   * A container a migration's dump froze is left as it is: only the controller may decide
   * whether it runs again here (rollback) or elsewhere.
   */
  recoverAtStart(): Promise<{ resumed: string[]; abandoned: string[] }>;

  /** Stops background work (not the containers: they outlive the agent). */
  close(): Promise<void>;
}

export interface RemoveOptions {
  force?: boolean;
  fenced?: boolean;
}
