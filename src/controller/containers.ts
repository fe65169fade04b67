/**
 * Containers as the controller knows them: the desired state of each under /containers/<name>
 * (its spec, the node it runs on, its incarnation) and the operations that change it. The agents
 * do the work; this module decides where, and keeps the record in step with what they did.
 */
import { within } from '../shared/time.js';
import { ConflictError, InvalidInputError, NotFoundError, UnavailableError } from '../shared/errors.js';
import type { ContainerStats, AgentContainer, ContainerStatus, ContainerView, RunRequest } from '../shared/protocol.js';
import { assertDistinctVolumes } from '../shared/protocol.js';
import type { ContainerAddresses } from './addresses.js';
import type { AgentApi, LogsOptions } from './agent-client.js';
import { type ContainerLocks, type ContainerRecord } from './container-lock.js';
import type { NodeRecord, NodeRegistry } from './registry.js';
import type { StateStore } from './store/index.js';

/** The agent API of a node; one place decides how the controller reaches agents (HTTP, or fakes in tests). */
export type AgentResolver = (node: NodeRecord) => AgentApi;

const CONTAINERS_PREFIX = '/containers/';

export class ContainerService {
  constructor(
    private readonly store: StateStore,
    private readonly nodes: NodeRegistry,
    private readonly agentFor: AgentResolver,
    private readonly locks: ContainerLocks,
    private readonly addresses: ContainerAddresses,
  ) {}

  /**
   * Starts a container on the requested node, or on the ready node running the fewest. The name
   * is reserved in the store first, so two runs of one name cannot both reach an agent; if the
   * agent refuses (unknown image, port taken...), the reservation is removed and the agent's
   * error is passed on as it is. The record is written through the container lock module's
   * compare-and-swap loop: a write that got in between (a protect) is kept, not a conflict.
   */
  async run(req: RunRequest): Promise<ContainerView> {
    assertDistinctVolumes(req.spec.volumes);
    if (req.spec.address !== undefined) {
      throw new InvalidInputError(`spec.address '${req.spec.address}' was given: the controller allocates each container's address from its --container-range; leave it out`, {
        address: req.spec.address,
      });
    }
    const node = await this.placement(req.node);
    const address = await this.addresses.allocate(req.spec.name);
    try {
      return await this.runWith({ ...req.spec, ...(address ? { address } : {}) }, node, req);
    } catch (err) {
      if (address) await this.addresses.release(address, req.spec.name).catch(() => undefined);
      throw err;
    }
  }

  private async runWith(spec: RunRequest['spec'], node: NodeRecord, req: RunRequest): Promise<ContainerView> {
    const reserved: ContainerRecord = {
      spec,
      node: node.name,
      status: 'created',
      generation: 0,
      createdAt: new Date().toISOString(),
      ...(req.protection ? { protection: req.protection } : {}),
    };
    await this.locks.update(spec.name, (current) => {
      if (!current) return reserved;
      throw new ConflictError(`container name "${spec.name}" is already in use (on node ${current.node}): pick another name, or remove it with \`chipmunk rm ${spec.name}\``, {
        name: spec.name,
      });
    });
    /** Still this run's reservation: not removed, nor removed and run again, meanwhile. */
    const ours = (current: ContainerRecord | undefined): current is ContainerRecord =>
      current !== undefined && current.status === 'created' && current.createdAt === reserved.createdAt && current.node === reserved.node;
    let started: AgentContainer;
    try {
      started = await this.agentFor(node).run(spec);
    } catch (err) {
      await this.locks.update(spec.name, (current) => (ours(current) && !current.lock ? { record: null, ops: [] } : undefined));
      throw err;
    }
    const record = await this.locks.update(spec.name, (current) => {
      if (!ours(current)) {
        // Removed meanwhile: the copy just started belongs to no record (a run of the same name since would have been refused by the agent).
        if (!current) void this.agentFor(node).remove(spec.name).catch(() => undefined);
        throw new ConflictError(`container ${spec.name} was removed while it started on ${node.name}: remove what is left with \`chipmunk rm ${spec.name}\` if \`chipmunk ps\` still shows it`, { name: spec.name });
      }
      return { ...current, status: started.status, generation: started.generation, ip: started.ip, createdAt: started.createdAt };
    });
    return toView(record!, node.address);
  }

  /**
   * Desired state from the store, status as the agents see it now: a container whose node is
   * unreachable, or whose agent does not know it, is `unknown`, not what it was last told.
   */
  async list(): Promise<ContainerView[]> {
    const [records, nodes, ready] = await Promise.all([this.store.list<ContainerRecord>(CONTAINERS_PREFIX), this.nodes.list(), this.nodes.listReady()]);
    const addressOf = new Map(nodes.map((node) => [node.name, node.address]));
    const observed = new Map<string, ContainerStatus>();
    await Promise.all(
      ready.map(async (node) => {
        const running = await within(this.agentFor(node).listContainers(), AGENT_LIST_TIMEOUT_MS).catch(() => undefined);
        for (const c of running ?? []) observed.set(`${node.name}/${c.name}`, c.status);
      }),
    );
    return records.map(({ value }) => {
      const status = observed.get(`${value.node}/${value.spec.name}`) ?? 'unknown';
      return toView({ ...value, status: value.status === 'created' && status === 'unknown' ? 'created' : status }, addressOf.get(value.node) ?? value.node);
    });
  }

  async logs(name: string, opts: LogsOptions): Promise<string> {
    const { value } = await this.require(name);
    return this.agentFor(await this.nodes.require(value.node)).logs(name, opts);
  }

  async stats(name: string): Promise<ContainerStats> {
    const { value } = await this.require(name);
    return this.agentFor(await this.nodes.require(value.node)).stats(name);
  }

  /** Stops the container where it runs; waits (bounded) for an operation holding it to end. */
  async stop(name: string): Promise<ContainerView> {
    const held = await this.locks.acquire(name, 'stop');
    try {
      const node = await this.nodes.require(held.record.node);
      const stopped = await this.agentFor(node).stop(name);
      return toView(await this.locks.release(held, { ...held.record, status: stopped.status }), node.address);
    } finally {
      await this.locks.releaseIfHeld(held);
    }
  }

  /** Removes the container from its node and its record; waits (bounded) for an operation holding it to end. */
  async remove(name: string): Promise<void> {
    const held = await this.locks.acquire(name, 'remove');
    try {
      const node = await this.nodes.require(held.record.node);
      try {
        await this.agentFor(node).remove(name);
      } catch (err) {
        // The agent does not have it (a run the controller did not see through): only the record is left to remove.
        if (!(err instanceof NotFoundError)) throw err;
      }
      // Its address goes with its record, in one transaction: never one without the other.
      await this.locks.remove(held, held.record.spec.address ? [this.addresses.releaseOp(held.record.spec.address)] : []);
    } finally {
      await this.locks.releaseIfHeld(held);
    }
  }

  async require(name: string) {
    return this.locks.require(name);
  }

  private async placement(requested: string | undefined): Promise<NodeRecord> {
    if (requested !== undefined) {
      const node = await this.nodes.require(requested);
      if (!(await this.nodes.isReady(requested))) throw unreachable(node);
      return node;
    }
    const ready = await this.nodes.listReady();
    if (ready.length === 0) throw new UnavailableError('no node is ready to run containers: start an agent, and see `chipmunk node ls`');
    const containersOn = new Map<string, number>();
    for (const { value } of await this.store.list<ContainerRecord>(CONTAINERS_PREFIX)) {
      containersOn.set(value.node, (containersOn.get(value.node) ?? 0) + 1);
    }
    // Ties go to the first node in name order (the list's order), so placement is predictable.
    return ready.reduce((best, node) => ((containersOn.get(node.name) ?? 0) < (containersOn.get(best.name) ?? 0) ? node : best));
  }
}

export function unreachable(node: NodeRecord): UnavailableError {
  return new UnavailableError(`node ${node.name} is unreachable (last heartbeat ${node.lastSeen}): start its agent, or pick another node`, {
    node: node.name,
  });
}

/** The `chipmunk ps` row: published ports at the address of the node the container runs on. */
function toView(record: ContainerRecord, nodeAddress: string): ContainerView {
  return {
    name: record.spec.name,
    node: record.node,
    status: record.lock?.operation === 'migration' ? 'migrating' : record.status,
    image: record.spec.image,
    ports: record.spec.ports.map((port) => `${nodeAddress}:${port.hostPort}->${port.containerPort}/${port.protocol}`),
    endpoints: [],
    ...(record.ip !== undefined ? { ip: record.ip } : {}),
    ...(record.spec.address !== undefined ? { address: record.spec.address } : {}),
    createdAt: record.createdAt,
    ...(record.protection ? { protection: record.protection } : {}),
  };
}

/** How long `ps` waits for an agent before showing its containers as unknown. */
const AGENT_LIST_TIMEOUT_MS = 3_000;
