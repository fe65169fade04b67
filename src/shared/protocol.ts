/**
 * Every message that crosses a process boundary (CLI -> controller -> agents, agent -> agent),
 * one TypeBox schema each. The schemas drive request validation in fastify, the TypeScript
 * types (Static<>), and the API reference (docs/api.md is generated from them).
 *
 * This file is the one import surface; the schemas live in protocol/ by concern: containers and
 * nodes, the agent API, the controller API, migrations.
 */
import type { TSchema } from '@sinclair/typebox';
import { AgentContainer, AgentInfo, ContainerSpec, ContainerStats, PortMapping, VolumeMount } from './protocol/containers.js';
import {
  DumpRequest,
  DumpResult,
  DumpState,
  LogPosition,
  MigrationStep,
  PrepareRequest,
  RestoreRequest,
  RestoreResult,
  RollbackRequest,
  SettleResult,
  StoredCheckpointRef,
  TakeCheckpointRequest,
  TakeCheckpointResult,
  TransferProgress,
  UploadCheckpointRequest,
} from './protocol/agent-api.js';
import {
  ContainerView,
  ExposeRequest,
  ExposedRoute,
  FencedContainer,
  HeartbeatResponse,
  MigrateRequest,
  NodeView,
  ProtectionPolicy,
  RegisterNodeRequest,
  RestoreFromRequest,
  RunRequest,
} from './protocol/controller-api.js';
import { ErrorBody, MigrationEvent, MigrationRecord, MigrationSummary } from './protocol/migrations.js';

export * from './protocol/containers.js';
export * from './protocol/agent-api.js';
export * from './protocol/controller-api.js';
export * from './protocol/migrations.js';

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
