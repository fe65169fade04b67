/**
 * The controller process: opens the state store, serves the controller API, and settles what a
 * previous run left mid-way (recovery.ts, the migrations' retry loop).
 */
import { mkdir, mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import type { AddressInfo } from 'node:net';
import { dirname, join } from 'node:path';
import { removeTree } from '../shared/remove-tree.js';
import { pino, type Logger } from 'pino';
import { InvalidInputError } from '../shared/errors.js';
import { HttpAgentApi } from './agent-client.js';
import { ContainerLocks } from './container-lock.js';
import { AddressRoutes } from './address-routes.js';
import { ContainerAddresses, DEFAULT_CONTAINER_RANGE, parseContainerRange } from './addresses.js';
import { ContainerService, type AgentResolver } from './containers.js';
import { Fences } from './fences.js';
import { MigrationOrchestrator } from './migration.js';
import { CheckpointStore } from '../checkpoint-store/index.js';
import { checkpointReplicaCount, checkpointStorePeers } from './checkpoint-replica-options.js';
import { ReplicatedCatalog } from './checkpoint-replicas.js';
import { ReplicaAdmin } from './checkpoint-replica-admin.js';
import { CheckpointBrowser } from './checkpoint-browse.js';
import { CheckpointService } from './checkpoints.js';
import { FailoverService } from './failover.js';
import { DEFAULT_NODE_READY_WITHIN_MS, NodeRegistry } from './registry.js';
import { recoverStaleLocks } from './recovery.js';
import { RouteService } from './routes.js';
import { buildControllerServer } from './server.js';
import { openStore, storeIdentity } from './store/index.js';
import { Leadership, type LeaderWork } from './leadership.js';
import { RaftPlacement } from './store/etcd-raft.js';
import { parseEtcdSpec } from './store/etcd-spec.js';
import { FencedStore } from './store/fenced.js';
import type { StateStore } from './store/types.js';
import type { Leader } from './election.js';

export type { AgentApi } from './agent-client.js';
export type { AgentResolver } from './containers.js';
export type { NodeRecord } from './registry.js';
export { checkpointReplicaCount } from './checkpoint-replica-options.js';

export const DEFAULT_STORE_SPEC = 'sqlite:/var/lib/chipmunk/controller.db';
export const DEFAULT_LEADER_LEASE_MS = 2000;

export interface ControllerOptions {
  listen: { host: string; port: number };
  /** The cluster token: clients and agents must present it, and the controller presents it to agents. */
  token: string;
  /** `sqlite:/path/to/file.db` or `memory:`. */
  storeSpec?: string;
  logger?: Logger;
  /** How the controller reaches a node's agent; HTTP unless replaced (tests pass in-memory agents). */
  agentFactory?: AgentResolver;
  /** A node is ready if it heartbeated at most this long ago. */
  nodeReadyWithinMs?: number;
  /** The gateway, when exposed services go through one: its API, and where clients reach it. */
  gateway?: { url: string; publicHost?: string };
  /**
   * Where the checkpoint store keeps its chunks and index (on this, the controller's, host):
   * `checkpoints/` beside the SQLite store by default; a temporary directory, removed at close,
   * with the memory store; required with an etcd store.
   */
  checkpointDir?: string;
  /** Checkpoints kept per container. */
  keepCheckpoints?: number;
  /** How agents reach this controller (and its checkpoint store); the listen address by default. */
  advertiseUrl?: string;
  /**
   * The range containers' cluster-wide addresses come from (addresses.ts), DEFAULT_CONTAINER_RANGE
   * if not given; 'off': containers get none, only their node's address.
   */
  containerRange?: string;
  /**
   * A command line (words split on spaces) run as `... ADDRESS NODE_ADDRESS` at each placement of a
   * container with an address, and `... ADDRESS` at its removal (address-routes.ts); none: the
   * operator's network knows another way (one L2 segment with proxy ARP, a router of theirs).
   */
  addressRoutesCommand?: string;
  /**
   * N: each checkpoint is committed on this many checkpoint store replicas before it counts.
   * Default: 2 with an etcd store, or when at least 2 replicas are known (this controller's store
   * and its peers'); else 1 with a warning that checkpoints live on one host.
   */
  checkpointReplicas?: number;
  /**
   * The base URLs of other controllers whose checkpoint stores are replicas too. With an etcd
   * store they need not be named: every controller publishes its own there.
   */
  checkpointStorePeers?: string[];
  /** How often under-replicated checkpoints are looked for and copied back to N replicas. */
  replicateEveryMs?: number;
  /** With an etcd store: the lease of a leader's campaign; a dead leader is replaced within about this long. */
  leaderLeaseMs?: number;
  /** The node this controller runs on, if it runs on one (shown by `chipmunk node ls`). */
  node?: string;
}

const DEFAULT_REPLICATE_EVERY_MS = 5_000;

export interface RunningController {
  url: string;
  /** Whether this controller leads (always, with a store inside this process). */
  leading(): boolean;
  /** The elected leader this controller sees (etcd store only). */
  leader(): Leader | undefined;
  close(): Promise<void>;
}

export async function startController(opts: ControllerOptions): Promise<RunningController> {
  const logger = opts.logger ?? pino({ name: 'chipmunk-controller' });
  const storeSpec = opts.storeSpec ?? DEFAULT_STORE_SPEC;
  // Checked before anything opens: a replica count that cannot be met stops the start.
  const peers = checkpointStorePeers(opts.checkpointStorePeers, opts.advertiseUrl);
  const replicaCount = checkpointReplicaCount(opts.checkpointReplicas, peers, logger, storeSpec.startsWith('etcd:'));
  if (storeSpec.startsWith('sqlite:')) await mkdir(dirname(storeSpec.slice('sqlite:'.length)), { recursive: true });
  // The store is on other hosts, so there is no directory to keep checkpoints beside it; a temporary one would lose them at exit.
  if (storeSpec.startsWith('etcd:') && !opts.checkpointDir) {
    throw new InvalidInputError('with an etcd store, say where this controller keeps checkpoints: --checkpoint-dir DIR', { storeSpec });
  }
  const store = await openStore(storeSpec);
  // Made once per store: it marks the gateway routes (and request logs) this controller owns.
  const storeId = await storeIdentity(store);

  // With etcd several controllers may share the store: they elect one to lead (leadership.ts);
  // every write but the nodes' heartbeats goes through the leader's fence (store/fenced.ts), and
  // every call to agents and the gateway carries its term (src/shared/term-fence.ts).
  const elected = storeSpec.startsWith('etcd:');
  let leadership: Leadership | undefined;
  const term = () => leadership?.heldTerm();
  const agentFor: AgentResolver = opts.agentFactory ?? ((node) => new HttpAgentApi({ node: node.name, url: node.url, token: opts.token, term }));
  const nodeLeaseMs = opts.nodeReadyWithinMs ?? DEFAULT_NODE_READY_WITHIN_MS;
  const leaderStore: StateStore = elected ? new FencedStore(store, () => leadership?.fence()) : store;
  const nodes = new NodeRegistry(store, nodeLeaseMs);
  const locks = new ContainerLocks(leaderStore);
  const fences = new Fences(leaderStore);
  const range = opts.containerRange === 'off' ? undefined : parseContainerRange(opts.containerRange ?? DEFAULT_CONTAINER_RANGE);
  const containers = new ContainerService(leaderStore, nodes, agentFor, locks, new ContainerAddresses(leaderStore, range));
  // Only reads and watches the store: the leader runs it (leaderWork).
  const addressRoutes = opts.addressRoutesCommand ? new AddressRoutes(store, nodes, opts.addressRoutesCommand, logger) : undefined;
  const routes = new RouteService(
    leaderStore,
    async (node) => (await nodes.get(node).catch(() => undefined))?.address,
    logger,
    opts.gateway ? { ...opts.gateway, token: opts.token, owner: storeId, term } : undefined,
    (node) => nodes.isReady(node),
    addressRoutes ? (address, node) => addressRoutes.isRoutedTo(address, node) : undefined,
  );
  const temporaryCheckpointDir = opts.checkpointDir || storeSpec.startsWith('sqlite:') ? undefined : await mkdtemp(join(tmpdir(), 'chipmunk-checkpoints-'));
  const checkpointDir = opts.checkpointDir ?? temporaryCheckpointDir ?? join(dirname(storeSpec.slice('sqlite:'.length)), 'checkpoints');
  const checkpointStore = await CheckpointStore.open({ root: checkpointDir, keep: opts.keepCheckpoints, logger });
  const closeCheckpointStore = async () => {
    await checkpointStore.close();
    if (temporaryCheckpointDir) await removeTree(temporaryCheckpointDir);
  };
  // Agents reach this controller's own store through this URL: known once listening, when no advertised URL was given.
  let storeUrl = opts.advertiseUrl?.replace(/\/$/, '') ?? '';
  // Which checkpoints count is leader-only state: committed, forgotten and re-replicated through the fence.
  // The replicas: this controller's own, the peers named, and those the running controllers published (etcd).
  const replicaUrls = () => [...new Set([storeUrl, ...peers, ...(leadership?.checkpointStores() ?? [])])];
  const catalog = new ReplicatedCatalog({ state: leaderStore, replicaUrls, replicas: replicaCount, token: opts.token, log: logger, containerNames: () => locks.names() });
  const checkpoints = new CheckpointService({ store: leaderStore, nodes, agentFor, locks, traffic: routes, catalog, log: logger, ...(elected ? { quietAfterStartMs: nodeLeaseMs } : {}) });
  const failovers = new FailoverService({ store: leaderStore, nodes, locks, fences, agentFor, nodeLeaseMs, checkpoints, catalog, traffic: routes, log: logger });
  const migrations = new MigrationOrchestrator({ store: leaderStore, nodes, agentFor, locks, fences, log: logger, traffic: routes, rescuer: failovers, ...(addressRoutes ? { addressRoutes } : {}) });
  /** This controller as its election and `GET /v1/controllers` name it; its URL is known once it listens. */
  let listening = '';
  const candidate = () => ({ id: locks.owner, url: opts.advertiseUrl ?? listening, checkpointStore: storeUrl, ...(opts.node ? { node: opts.node } : {}) });
  const app = buildControllerServer({
    token: opts.token,
    logger,
    nodes,
    containers,
    migrations,
    routes,
    checkpoints,
    failovers,
    fences,
    checkpointStore,
    browser: new CheckpointBrowser({ catalog, token: opts.token }),
    replicas: new ReplicaAdmin({ catalog, hosts: () => leadership?.checkpointStoreHosts(candidate()) ?? [] }),
    heartbeatMs: Math.max(100, Math.floor(nodeLeaseMs / 4)),
    enableFaults: process.env.CHIPMUNK_ENABLE_FAULTS === '1',
    // Until this controller has joined the election it neither leads nor knows who does: it answers reads only.
    ...(elected ? { leadership: { view: { leading: () => leadership?.leading() ?? false, leader: () => leadership?.leader() }, self: locks.owner } } : {}),
    controllers: async () => (leadership ? leadership.controllers(candidate()) : []),
  });
  try {
    await app.listen(opts.listen).catch((err: NodeJS.ErrnoException) => {
      throw new InvalidInputError(`the controller cannot listen on ${opts.listen.host}:${opts.listen.port} (${err.code ?? err.message}): pick another address or port`, {
        host: opts.listen.host,
        port: opts.listen.port,
      });
    });
  } catch (err) {
    await app.close();
    await closeCheckpointStore();
    await store.close();
    throw err;
  }

  const address = app.server.address() as AddressInfo;
  const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  listening = `http://${host}:${address.port}`;
  const listeningSince = Date.now();
  storeUrl ||= `http://${host}:${address.port}`;
  let replicateTimer: NodeJS.Timeout | undefined;
  // Raft leadership kept off this host while this controller leads: one host's death then costs
  // either a raft election or a leader lease, not both. Hosts are matched by the advertised URL.
  const ownHost = opts.advertiseUrl ? new URL(opts.advertiseUrl).hostname : undefined;
  const raftPlacement =
    elected && ownHost ? new RaftPlacement({ endpoints: parseEtcdSpec(storeSpec).endpoints, ownHost, log: logger }) : undefined;
  const leaderWork: LeaderWork = {
    start: async () => {
      routes.start();
      // Agents heartbeat from the moment the API listens (a follower's too); what a previous
      // controller (or leader) left is settled from then on (its locks keep new operations off
      // those containers meanwhile), and node deaths are judged only once agents had a lease's
      // time to heartbeat since the API listened.
      await failovers.start(listeningSince);
      void recoverStaleLocks({ locks, nodes, agentFor, traffic: routes, failovers, log: logger }).catch((err: unknown) =>
        logger.error({ err: (err as Error).message }, 'settling what the previous controller left failed'),
      );
      migrations.start();
      checkpoints.start();
      replicateTimer = setInterval(
        () => void catalog.replicate().catch((err: unknown) => logger.error({ err: (err as Error).message }, 'bringing checkpoints back to their replica count failed')),
        opts.replicateEveryMs ?? DEFAULT_REPLICATE_EVERY_MS,
      );
      replicateTimer.unref();
      raftPlacement?.start();
      await addressRoutes?.start();
    },
    stop: () => {
      raftPlacement?.stop();
      clearInterval(replicateTimer);
      addressRoutes?.stop();
      routes.stop();
      checkpoints.stop();
      failovers.stop();
      migrations.stop();
    },
  };
  const leading = elected
    ? Leadership.elected({ store, ttlMs: opts.leaderLeaseMs ?? DEFAULT_LEADER_LEASE_MS, work: leaderWork, log: logger })
    : Leadership.alone(leaderWork, logger);
  leadership = leading;
  try {
    await leading.start(candidate());
  } catch (err) {
    await app.close();
    await closeCheckpointStore();
    await store.close();
    throw err;
  }
  logger.info({ store: storeSpec, storeId, checkpointReplicas: replicaCount, checkpointStoreReplicas: replicaUrls() }, `controller listening on http://${host}:${address.port}`);
  return {
    url: `http://${host}:${address.port}`,
    leading: () => leading.leading(),
    leader: () => leading.leader(),
    close: async () => {
      await leading.close();
      await app.close();
      await closeCheckpointStore();
      await store.close();
    },
  };
}
