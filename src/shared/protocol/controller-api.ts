/** The controller's API as the CLI and agents use it: nodes, controllers, containers, routes. */
import { Type, type Static } from '@sinclair/typebox';
import { ContainerName, ContainerSpec, ContainerStatus, HostCapabilities, NodeName } from './containers.js';
import { MigrationMode } from './agent-api.js';

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
