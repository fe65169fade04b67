/**
 * The nodes the controller knows. Agents PUT /v1/nodes/:name periodically; each heartbeat
 * stores the node's record under /nodes/<name> and keeps a store lease alive that holds the
 * node's liveness key /liveness/<name>. A node is ready while that key exists, that is, while it
 * heartbeated within the lease's TTL; when heartbeats stop the lease expires, the store deletes
 * the key (with a delete event) and the node turns unreachable. The record itself stays, so
 * `chipmunk node ls` still lists the node and the containers placed on it keep a valid address.
 *
 * Liveness is a store lease rather than a timestamp comparison so that the fault-tolerance work
 * can react to a node's failure by watching /liveness/ instead of polling.
 */
import { InvalidInputError, StoreFailedError } from '../shared/errors.js';
import type { HostCapabilities, NodeView, RegisterNodeRequest } from '../shared/protocol.js';
import type { StateStore } from './store/index.js';

/** What the store keeps about a node. */
export interface NodeRecord {
  name: string;
  /** Address clients reach the node's published ports at. */
  address: string;
  /** The node's agent API. */
  url: string;
  capabilities: HostCapabilities;
  /** ISO time of the last heartbeat. */
  lastSeen: string;
}

export const DEFAULT_NODE_READY_WITHIN_MS = 5_000;

const NODES_PREFIX = '/nodes/';
const LIVENESS_PREFIX = '/liveness/';

export class NodeRegistry {
  /** Each node's record as this controller last wrote it, and when. */
  private readonly written = new Map<string, { record: NodeRecord; at: number }>();

  /** @param readyWithinMs a node is ready if it heartbeated at most this long ago */
  constructor(
    private readonly store: StateStore,
    private readonly readyWithinMs = DEFAULT_NODE_READY_WITHIN_MS,
  ) {}

  /** How long a node may go without a heartbeat before it is dead. */
  get leaseMs(): number {
    return this.readyWithinMs;
  }

  /**
   * Keeps the node alive first: a write (with etcd, a commit synced to disk on a majority) may
   * take long on a loaded host, and a keep-alive waiting behind it let 1 s node leases run out
   * (spurious failovers, seen under load in cluster-ha-faults). The record is written when it
   * changed, and otherwise once per lease (so `lastSeen` is at most a lease behind): a
   * heartbeat every quarter lease no longer writes to the store four times a lease.
   */
  async heartbeat(req: RegisterNodeRequest): Promise<NodeView> {
    const now = Date.now();
    const record: NodeRecord = { name: req.name, address: req.address, url: req.url, capabilities: req.capabilities, lastSeen: new Date(now).toISOString() };
    await this.keepLivenessLease(req.name);
    const last = this.written.get(req.name);
    if (!last || now - last.at >= this.readyWithinMs || !sameNode(last.record, record)) {
      await this.store.put(NODES_PREFIX + req.name, record);
      this.written.set(req.name, { record, at: now });
    }
    return toView(record, true);
  }

  async get(name: string): Promise<NodeRecord | undefined> {
    return (await this.store.get<NodeRecord>(NODES_PREFIX + name))?.value;
  }

  /** The node's record; an unknown name is the caller's mistake, so the error says where to look. */
  async require(name: string): Promise<NodeRecord> {
    const record = await this.get(name);
    if (!record) throw new InvalidInputError(`unknown node "${name}": see \`chipmunk node ls\` for the nodes of this cluster`, { node: name });
    return record;
  }

  async isReady(name: string): Promise<boolean> {
    return (await this.store.get(LIVENESS_PREFIX + name)) !== undefined;
  }

  async list(): Promise<NodeView[]> {
    return (await this.readiness()).map(({ record, ready }) => toView(record, ready));
  }

  async listReady(): Promise<NodeRecord[]> {
    return (await this.readiness()).filter(({ ready }) => ready).map(({ record }) => record);
  }

  private async readiness(): Promise<{ record: NodeRecord; ready: boolean }[]> {
    const [records, alive] = await Promise.all([this.store.list<NodeRecord>(NODES_PREFIX), this.store.list(LIVENESS_PREFIX)]);
    const readyNames = new Set(alive.map((kv) => kv.key.slice(LIVENESS_PREFIX.length)));
    return records.map((kv) => ({ record: kv.value, ready: readyNames.has(kv.value.name) }));
  }

  private async keepLivenessLease(name: string): Promise<void> {
    const liveness = await this.store.get(LIVENESS_PREFIX + name);
    if (liveness?.lease !== undefined) {
      try {
        await this.store.keepAlive(liveness.lease);
        return;
      } catch (err) {
        // The lease ended between the read and the keep-alive: the node gets a new one below.
        if (!(err instanceof StoreFailedError)) throw err;
      }
    }
    const lease = await this.store.grantLease(this.readyWithinMs);
    await this.store.put(LIVENESS_PREFIX + name, { node: name }, { lease });
  }
}

/** The same node as registered (its record but for lastSeen). */
function sameNode(a: NodeRecord, b: NodeRecord): boolean {
  return a.address === b.address && a.url === b.url && JSON.stringify(a.capabilities) === JSON.stringify(b.capabilities);
}

function toView(record: NodeRecord, ready: boolean): NodeView {
  return {
    name: record.name,
    address: record.address,
    url: record.url,
    status: ready ? 'ready' : 'unreachable',
    capabilities: record.capabilities,
    lastSeen: record.lastSeen,
  };
}
