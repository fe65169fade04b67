/** A migration as the controller streams and records it; ErrorBody is how any API call reports a failure. */
import { Type, type Static } from '@sinclair/typebox';
import { ContainerName, NodeName } from './containers.js';
import { MigrationMode, MigrationStep } from './agent-api.js';

export const ErrorBody = Type.Object({
  code: Type.String(),
  message: Type.String(),
  details: Type.Optional(Type.Record(Type.String(), Type.Unknown())),
});

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
