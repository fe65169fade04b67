/**
 * Every message that crosses a process boundary (CLI -> controller -> agents, agent -> agent),
 * one TypeBox schema each. The schemas drive request validation in fastify, the TypeScript
 * types (Static<>), and the API reference (docs/api.md is generated from them).
 */
import { Type, type Static, type TSchema } from '@sinclair/typebox';
import { InvalidInputError } from './errors.js';

// ------------------------------------------------------------------ common

export const NodeName = Type.String({ pattern: '^[a-z0-9][a-z0-9-]{0,30}$', description: 'node name: lowercase letters, digits, dashes' });
export const ContainerName = Type.String({
  pattern: '^[a-z0-9][a-z0-9_.-]{0,39}$',
  description: 'container name: lowercase letters, digits, and _ . - (at most 40 characters)',
});

/**
 * A place in a gateway route's request log: `seq` counts the log's records, `logId` names the log
 * (a random id made with it). A route unlogged and logged again, or removed and exposed again,
 * has a new log whose seqs start over: a position is meaningful only against the log it names.
 */
export const LogPosition = Type.Object({
  logId: Type.String({ minLength: 1, description: 'the request log the position is in' }),
  seq: Type.Integer({ minimum: 0, description: 'requests 1..seq of that log are in the checkpoint' }),
});
export type LogPosition = Static<typeof LogPosition>;

export const PortMapping = Type.Object({
  hostPort: Type.Integer({ minimum: 1, maximum: 65535 }),
  containerPort: Type.Integer({ minimum: 1, maximum: 65535 }),
  protocol: Type.Union([Type.Literal('tcp'), Type.Literal('udp')], { default: 'tcp' }),
});
export type PortMapping = Static<typeof PortMapping>;

export const MigrationMode = Type.Union([Type.Literal('lazy'), Type.Literal('copy')], {
  description: 'lazy: post-copy, memory follows after resume (needs userfaultfd); copy: stop-and-copy',
});
export type MigrationMode = Static<typeof MigrationMode>;

/** What the operator asked for: enough to (re)create the container anywhere. */
/** A named volume: a directory of the container's own, mounted at `path`; it travels with migrations and is part of every checkpoint. */
export const VolumeMount = Type.Object({
  name: Type.String({ pattern: '^[a-z0-9][a-z0-9_.-]{0,62}$', description: 'volume name: lowercase letters, digits, _ . -' }),
  path: Type.String({ pattern: '^(?!.*/\\.\\.?(/|$))/[^\\0]+$', description: 'absolute path in the container, not / and without . or .. segments' }),
});
export type VolumeMount = Static<typeof VolumeMount>;

/** What the schema cannot say about a spec's volumes: names and paths are each used once. */
export function assertDistinctVolumes(volumes: VolumeMount[] = []): void {
  const names = new Set<string>();
  const paths = new Set<string>();
  for (const v of volumes) {
    const path = v.path.replace(/\/+$/, '');
    const conflict = names.has(v.name) ? `volume '${v.name}' is given twice` : paths.has(path) ? `two volumes are mounted at ${path}` : undefined;
    if (conflict) throw new InvalidInputError(`${conflict}: each volume needs its own name and path`, { volumes });
    names.add(v.name);
    paths.add(path);
  }
}

export const ContainerSpec = Type.Object({
  name: ContainerName,
  image: Type.String({ minLength: 1 }),
  /** Overrides the image's CMD when non-empty. */
  command: Type.Array(Type.String(), { default: [] }),
  env: Type.Record(Type.String(), Type.String(), { default: {} }),
  ports: Type.Array(PortMapping, { default: [] }),
  /** Memory limit in bytes; 0 means none. */
  memoryBytes: Type.Integer({ minimum: 0, default: 0 }),
  volumes: Type.Optional(Type.Array(VolumeMount)),
  /**
   * The container's cluster-wide address (IPv4), which the controller allocates and which stays
   * with it across moves, failovers and restores; set by the controller, never by a client.
   * Absent: the container has only its node's address from the node's subnet.
   */
  address: Type.Optional(Type.String({ pattern: '^\\d{1,3}(\\.\\d{1,3}){3}$' })),
});
export type ContainerSpec = Static<typeof ContainerSpec>;

export const ContainerStatus = Type.Union([
  Type.Literal('created'),
  Type.Literal('running'),
  Type.Literal('stopped'),
  Type.Literal('migrating'),
  Type.Literal('unknown'),
  /** Its memory was lost with a node and it has no checkpoint to come back from (see `chipmunk migrations`). */
  Type.Literal('lost'),
]);
export type ContainerStatus = Static<typeof ContainerStatus>;

/** What an agent reports about one container it runs. */
export const AgentContainer = Type.Object({
  name: ContainerName,
  spec: ContainerSpec,
  status: ContainerStatus,
  /** Increments with every restore: names the runc container and cgroup of this incarnation. */
  generation: Type.Integer({ minimum: 0 }),
  ip: Type.Optional(Type.String()),
  pid: Type.Optional(Type.Integer()),
  exitCode: Type.Optional(Type.Integer()),
  createdAt: Type.String(),
  /**
   * Set when the agent cannot read what it knows of the container (status `unknown`; `spec`,
   * `generation` and `createdAt` are then placeholders): the container is there, maybe running.
   */
  error: Type.Optional(Type.Object({ code: Type.String(), message: Type.String() })),
});
export type AgentContainer = Static<typeof AgentContainer>;

export const ContainerStats = Type.Object({
  name: ContainerName,
  cpuUsageNs: Type.Number(),
  memoryBytes: Type.Number(),
  memoryLimitBytes: Type.Optional(Type.Number()),
  pids: Type.Number(),
});
export type ContainerStats = Static<typeof ContainerStats>;

/** What a host can do for migrations (src/shared/host/capabilities.ts probes it). */
export const HostCapabilities = Type.Object({
  /** Post-copy migration: CRIU >= 4.2 and userfaultfd for non-cooperative processes. */
  lazyMigration: Type.Boolean(),
  /** Soft-dirty page tracking, which CRIU pre-dump (iterative pre-copy) needs. */
  softDirty: Type.Boolean(),
  criuVersion: Type.Optional(Type.String()),
  /** v1, v2, hybrid or none. */
  cgroupMode: Type.String(),
});
export type HostCapabilities = Static<typeof HostCapabilities>;

export const AgentInfo = Type.Object({
  node: NodeName,
  /** Address other agents and clients reach this node at. */
  address: Type.String(),
  apiPort: Type.Integer(),
  capabilities: HostCapabilities,
  version: Type.String(),
});
export type AgentInfo = Static<typeof AgentInfo>;

// ------------------------------------------------------------------ agent: migration steps

/**
 * One timed step of a migration's frozen window (src/shared/steps.ts), by the clock of the node
 * that did it: `at` its start (ms since epoch), `ms` how long it took.
 */
export const MigrationStep = Type.Object({ step: Type.String(), at: Type.Number(), ms: Type.Number({ minimum: 0 }) });
export type MigrationStep = Static<typeof MigrationStep>;

/** Ports the controller hands to source agents for CRIU page servers (lazy mode). */
export const PAGE_SERVER_PORTS = { first: 27000, last: 27999 } as const;

/** Source side: freeze and dump the container for a migration (it stops running here). */
export const DumpRequest = Type.Object({
  migrationId: Type.String({ minLength: 1 }),
  mode: MigrationMode,
  /** Port the source's CRIU page server listens on (lazy mode). */
  pageServerPort: Type.Optional(Type.Integer({ minimum: 1024, maximum: 65535 })),
});
export type DumpRequest = Static<typeof DumpRequest>;

/** Where a source's CRIU page server listens (lazy mode). */
export const PageServerAddress = Type.Object({ address: Type.String(), port: Type.Integer() });

export const DumpResult = Type.Object({
  migrationId: Type.String(),
  /** Bytes of the image directory the target must fetch before restore. */
  imageBytes: Type.Integer(),
  /** Bytes of the file-system changes (overlay upper layer). */
  upperBytes: Type.Integer(),
  /** When the container stopped answering (ms since epoch, source clock). */
  frozenAt: Type.Number(),
  pageServer: Type.Optional(PageServerAddress),
  /** The dump step by step (runc, CRIU's freeze, network lock and dump, the layer's sync). */
  steps: Type.Optional(Type.Array(MigrationStep)),
});
export type DumpResult = Static<typeof DumpResult>;

/** Target side, before the dump: get the image if missing, set up the network. */
export const PrepareRequest = Type.Object({
  migrationId: Type.String({ minLength: 1 }),
  mode: MigrationMode,
  spec: ContainerSpec,
  generation: Type.Integer({ minimum: 0 }),
  source: Type.Object({ node: NodeName, url: Type.String() }),
});
export type PrepareRequest = Static<typeof PrepareRequest>;

/** A stored checkpoint to restore from, instead of the source agent's trees. */
export const StoredCheckpointRef = Type.Object({
  /** The checkpoint store's API (the controller's by default). */
  storeUrl: Type.String({ minLength: 1 }),
  /** Other store replicas holding it, read in turn when a read from storeUrl fails (a corrupt or missing chunk, a dead host). */
  replicaUrls: Type.Optional(Type.Array(Type.String({ minLength: 1 }))),
  id: Type.String({ minLength: 1 }),
});
export type StoredCheckpointRef = Static<typeof StoredCheckpointRef>;

/**
 * Target side: fetch the dump from the source agent (or, with `checkpoint`, a checkpoint from
 * the checkpoint store: a failover or a restore of an older version) and restore it here.
 */
export const RestoreRequest = Type.Composite([
  PrepareRequest,
  Type.Object({ pageServer: Type.Optional(PageServerAddress), checkpoint: Type.Optional(StoredCheckpointRef) }),
]);
export type RestoreRequest = Static<typeof RestoreRequest>;

export const RestoreResult = Type.Object({
  container: AgentContainer,
  bytesTransferred: Type.Integer(),
  restoredAt: Type.Number(),
  /** Where the target's time went, ms: fetching the trees (from the store: with preparing), and runc/CRIU restoring. */
  fetchMs: Type.Optional(Type.Number()),
  criuMs: Type.Optional(Type.Number()),
  /** A restore from the checkpoint store: the replicas (store URLs) its trees were read from, images' first; one when both came from the same. */
  readFrom: Type.Optional(Type.Array(Type.String())),
  /** The fetch and restore step by step (trees, bundle, runc, CRIU's restore, the address routed). */
  steps: Type.Optional(Type.Array(MigrationStep)),
});
export type RestoreResult = Static<typeof RestoreResult>;

/**
 * Target side, after the source finished: what the lazy-pages daemon copied; `lazyPagesFailed`
 * when it did not end well (its page server went away mid-transfer, say): then the copy lacks
 * memory it never got, and is not the container any more.
 */
export const SettleResult = Type.Object({ lazyPagesBytes: Type.Integer({ minimum: 0 }), lazyPagesFailed: Type.Optional(Type.String()) });
export type SettleResult = Static<typeof SettleResult>;

/** Source side: the migration failed after the dump; run the container here again. */
export const RollbackRequest = Type.Object({ migrationId: Type.String({ minLength: 1 }) });
export type RollbackRequest = Static<typeof RollbackRequest>;

/**
 * Checkpoint a container and let it run on. The trees wait on the agent, under this id, until
 * they are uploaded (the checkpoint store then names the stored checkpoint) or discarded.
 */
export const TakeCheckpointRequest = Type.Object({ checkpointId: Type.String({ pattern: '^[A-Za-z0-9_-]{1,64}$' }) });
export type TakeCheckpointRequest = Static<typeof TakeCheckpointRequest>;

export const TakeCheckpointResult = Type.Object({
  checkpointId: Type.String(),
  /** How long the container was frozen (paused, files copied, memory dumped). */
  frozenMs: Type.Number(),
  imageBytes: Type.Integer(),
  filesBytes: Type.Integer(),
});
export type TakeCheckpointResult = Static<typeof TakeCheckpointResult>;

/** Send a checkpoint taken on the agent to the checkpoint store; it counts once every chunk is durable there. */
export const UploadCheckpointRequest = Type.Object({
  container: ContainerName,
  storeUrl: Type.String({ minLength: 1 }),
  /** Further store replicas: the checkpoint is committed on storeUrl and each of these, or on none. */
  replicaUrls: Type.Optional(Type.Array(Type.String({ minLength: 1 }))),
  /** The gateway log position the checkpoint was cut at (null: the container is not behind a logging route). */
  logPosition: Type.Union([LogPosition, Type.Null()]),
  /** Kept with the checkpoint for restores: the container spec, its generation. */
  metadata: Type.Record(Type.String(), Type.Unknown()),
});
export type UploadCheckpointRequest = Static<typeof UploadCheckpointRequest>;

/** Progress of a transfer, streamed by agents to the controller (and on to the CLI). */
export const TransferProgress = Type.Object({
  migrationId: Type.String(),
  what: Type.Union([Type.Literal('images'), Type.Literal('files'), Type.Literal('image'), Type.Literal('pages')]),
  bytes: Type.Integer(),
  totalBytes: Type.Optional(Type.Integer()),
});
export type TransferProgress = Static<typeof TransferProgress>;

// ------------------------------------------------------------------ controller API (CLI-facing)

export const NodeView = Type.Object({
  name: NodeName,
  address: Type.String(),
  url: Type.String(),
  status: Type.Union([Type.Literal('ready'), Type.Literal('unreachable')]),
  capabilities: Type.Optional(HostCapabilities),
  lastSeen: Type.Optional(Type.String()),
});
export type NodeView = Static<typeof NodeView>;

/** A controller of the cluster, as `GET /v1/controllers` lists it. */
export const ControllerView = Type.Object({
  id: Type.String(),
  url: Type.String(),
  /** The node it runs on (`controller --node`), when it runs on one. */
  node: Type.Optional(NodeName),
  leader: Type.Boolean(),
  /** The leader's term (elected controllers only: a controller that runs alone has none). */
  term: Type.Optional(Type.Integer()),
});
export type ControllerView = Static<typeof ControllerView>;

export const RegisterNodeRequest = Type.Object({
  name: NodeName,
  address: Type.String({ minLength: 1 }),
  url: Type.String({ minLength: 1 }),
  capabilities: HostCapabilities,
});
export type RegisterNodeRequest = Static<typeof RegisterNodeRequest>;

/** A container that moved away from a node while the node was dead: it must not run there. */
export const FencedContainer = Type.Object({
  name: ContainerName,
  /** The incarnation that runs elsewhere now: any older one on this node is stopped and removed. */
  generation: Type.Integer({ minimum: 0 }),
});
export type FencedContainer = Static<typeof FencedContainer>;

/** The controller's answer to a heartbeat. */
export const HeartbeatResponse = Type.Composite([
  NodeView,
  Type.Object({
    /** How often the agent should heartbeat: a fraction of the node lease. */
    heartbeatMs: Type.Integer({ minimum: 1 }),
    fence: Type.Array(FencedContainer),
  }),
]);
export type HeartbeatResponse = Static<typeof HeartbeatResponse>;

/** How often a protected container is checkpointed. */
export const ProtectionPolicy = Type.Object({ everyMs: Type.Integer({ minimum: 1000, description: 'checkpoint interval, ms (at least 1 s)' }) });
export type ProtectionPolicy = Static<typeof ProtectionPolicy>;

export const RunRequest = Type.Object({
  spec: ContainerSpec,
  node: Type.Optional(NodeName),
  /** Protect it from the start (`chipmunk run --checkpoint-every`). */
  protection: Type.Optional(ProtectionPolicy),
});
export type RunRequest = Static<typeof RunRequest>;

export const ContainerView = Type.Object({
  name: ContainerName,
  node: Type.String(),
  status: ContainerStatus,
  image: Type.String(),
  ports: Type.Array(Type.String({ description: 'ADDRESS:HOSTPORT->CTRPORT/PROTO' })),
  /** Routes through the gateway: GATEWAY:PORT->CTRPORT/PROTO. */
  endpoints: Type.Array(Type.String(), { default: [] }),
  ip: Type.Optional(Type.String()),
  /** Its cluster-wide address, which it keeps across moves (README: container addresses). */
  address: Type.Optional(Type.String()),
  createdAt: Type.String(),
  /** Set for protected containers: checkpointed periodically, failed over when their node dies. */
  protection: Type.Optional(ProtectionPolicy),
});
export type ContainerView = Static<typeof ContainerView>;

/** `chipmunk restore NAME --from CKPT`: roll the running container back to a checkpoint. */
export const RestoreFromRequest = Type.Object({ from: Type.String({ minLength: 1 }) });
export type RestoreFromRequest = Static<typeof RestoreFromRequest>;

export const ExposeRequest = Type.Object({
  /** The container port the service listens on. */
  port: Type.Integer({ minimum: 1, maximum: 65535 }),
  /** The gateway port clients use; the container port by default. */
  listen: Type.Optional(Type.Integer({ minimum: 1, maximum: 65535 })),
  protocol: Type.Optional(Type.Union([Type.Literal('http'), Type.Literal('tcp')])),
});
export type ExposeRequest = Static<typeof ExposeRequest>;

export const ExposedRoute = Type.Object({
  name: ContainerName,
  containerPort: Type.Integer(),
  listenPort: Type.Integer(),
  protocol: Type.Union([Type.Literal('http'), Type.Literal('tcp')]),
});
export type ExposedRoute = Static<typeof ExposedRoute>;

export const MigrateRequest = Type.Object({
  to: NodeName,
  mode: Type.Optional(MigrationMode),
});
export type MigrateRequest = Static<typeof MigrateRequest>;

/**
 * The source's view of its dump for a migration (asked when a migration failed): whether it can
 * still run the container again from it.
 */
export const DumpState = Type.Object({
  migrationId: Type.String(),
  /** True with the images of a copy-mode dump, or a lazy page server no target has pulled pages from. */
  canRollBack: Type.Boolean(),
  /** Why not, when it cannot. */
  reason: Type.Optional(Type.String()),
});
export type DumpState = Static<typeof DumpState>;

export const MigrationPhaseName = Type.Union([
  Type.Literal('prepare'),
  Type.Literal('dump'),
  Type.Literal('transfer'),
  Type.Literal('restore'),
  Type.Literal('verify'),
  Type.Literal('cleanup'),
  Type.Literal('rollback'),
  Type.Literal('done'),
  Type.Literal('failed'),
]);
export type MigrationPhaseName = Static<typeof MigrationPhaseName>;

/** One line of the migration's progress stream (NDJSON), and its stored record. */
export const MigrationEvent = Type.Object({
  migrationId: Type.String(),
  phase: MigrationPhaseName,
  at: Type.Number(),
  bytes: Type.Optional(Type.Integer()),
  totalBytes: Type.Optional(Type.Integer()),
  message: Type.Optional(Type.String()),
  /** What the phase's node did, step by step (dump: the source's; transfer: the target's), written when the phase ends. */
  steps: Type.Optional(Type.Array(MigrationStep)),
});
export type MigrationEvent = Static<typeof MigrationEvent>;

export const MigrationSummary = Type.Object({
  id: Type.String(),
  name: ContainerName,
  from: NodeName,
  to: NodeName,
  mode: MigrationMode,
  /** Container frozen on the source until it runs on the target (agent clocks, same host clock in local clusters). */
  downtimeMs: Type.Number(),
  totalMs: Type.Number(),
  bytesTransferred: Type.Integer(),
  /** Each phase's time, and the steps its node reported (the frozen window's: dump, transfer). */
  phases: Type.Array(Type.Object({ phase: Type.String(), ms: Type.Number(), steps: Type.Optional(Type.Array(Type.Object({ step: Type.String(), ms: Type.Number() }))) })),
});
export type MigrationSummary = Static<typeof MigrationSummary>;

export const ErrorBody = Type.Object({
  code: Type.String(),
  message: Type.String(),
  details: Type.Optional(Type.Record(Type.String(), Type.Unknown())),
});

/** A migration as the controller records it: where it stands, how it got there, how it ended. */
export const MigrationRecord = Type.Object({
  id: Type.String(),
  name: ContainerName,
  from: NodeName,
  to: NodeName,
  mode: MigrationMode,
  /** The phase it is in, or `done` / `failed` once it ended. */
  phase: MigrationPhaseName,
  /** Every phase entered, in order, as streamed to the client. */
  history: Type.Array(MigrationEvent),
  startedAt: Type.Number(),
  /** The container's incarnation on the source when the migration began (the target's is one more). */
  generation: Type.Optional(Type.Integer({ minimum: 0 })),
  finishedAt: Type.Optional(Type.Number()),
  /** Committed, but the source has not confirmed removing its copy yet: the controller keeps asking it. */
  cleanupPending: Type.Optional(Type.Boolean()),
  summary: Type.Optional(MigrationSummary),
  error: Type.Optional(ErrorBody),
});
export type MigrationRecord = Static<typeof MigrationRecord>;

/** Schemas by name, for the generated API reference. */
export const schemas: Record<string, TSchema> = {
  DumpState,
  ContainerSpec,
  LogPosition,
  VolumeMount,
  PortMapping,
  AgentContainer,
  ContainerStats,
  AgentInfo,
  MigrationStep,
  DumpRequest,
  DumpResult,
  PrepareRequest,
  RestoreRequest,
  RestoreResult,
  RollbackRequest,
  SettleResult,
  TakeCheckpointRequest,
  TakeCheckpointResult,
  UploadCheckpointRequest,
  StoredCheckpointRef,
  TransferProgress,
  NodeView,
  RegisterNodeRequest,
  HeartbeatResponse,
  FencedContainer,
  ProtectionPolicy,
  RunRequest,
  RestoreFromRequest,
  ContainerView,
  ExposeRequest,
  ExposedRoute,
  MigrateRequest,
  MigrationEvent,
  MigrationSummary,
  ErrorBody,
  MigrationRecord,
};
