/** Containers and the nodes that run them, as agents report them and clients ask for them. */
import { Type, type Static } from '@sinclair/typebox';
import { InvalidInputError } from '../errors.js';

export const NodeName = Type.String({ pattern: '^[a-z0-9][a-z0-9-]{0,30}$', description: 'node name: lowercase letters, digits, dashes' });
export const ContainerName = Type.String({
  pattern: '^[a-z0-9][a-z0-9_.-]{0,39}$',
  description: 'container name: lowercase letters, digits, and _ . - (at most 40 characters)',
});

export const PortMapping = Type.Object({
  hostPort: Type.Integer({ minimum: 1, maximum: 65535 }),
  containerPort: Type.Integer({ minimum: 1, maximum: 65535 }),
  protocol: Type.Union([Type.Literal('tcp'), Type.Literal('udp')], { default: 'tcp' }),
});
export type PortMapping = Static<typeof PortMapping>;

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
/** What the operator asked for: enough to (re)create the container anywhere. */
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
