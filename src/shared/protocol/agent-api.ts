/**
 * The agent API's messages: a migration's steps on the source and the target, checkpoints
 * taken on an agent and uploaded to the checkpoint store, and transfer progress.
 */
import { Type, type Static } from '@sinclair/typebox';
import { AgentContainer, ContainerName, ContainerSpec, NodeName } from './containers.js';

export const MigrationMode = Type.Union([Type.Literal('lazy'), Type.Literal('copy')], {
  description: 'lazy: post-copy, memory follows after resume (needs userfaultfd); copy: stop-and-copy',
});
export type MigrationMode = Static<typeof MigrationMode>;

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
