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
import { CheckpointService, type CheckpointCatalog } from './checkpoints.js';
import { FailoverService } from './failover.js';
import { DEFAULT_NODE_READY_WITHIN_MS, NodeRegistry } from './registry.js';
import { recoverStaleLocks } from './recovery.js';
import { RouteService } from './routes.js';
import { buildControllerServer } from './server.js';
import { openStore, storeIdentity } from './store/index.js';

export type { AgentApi } from './agent-client.js';
export type { AgentResolver } from './containers.js';
export type { NodeRecord } from './registry.js';

export const DEFAULT_STORE_SPEC = 'sqlite:/var/lib/chipmunk/controller.db';

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
   * with the memory store.
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
}

export interface RunningController {
  url: string;
  close(): Promise<void>;
}

export async function startController(opts: ControllerOptions): Promise<RunningController> {
  const logger = opts.logger ?? pino({ name: 'chipmunk-controller' });
  const storeSpec = opts.storeSpec ?? DEFAULT_STORE_SPEC;
  if (storeSpec.startsWith('sqlite:')) await mkdir(dirname(storeSpec.slice('sqlite:'.length)), { recursive: true });
  const store = await openStore(storeSpec);
  // Made once per store: it marks the gateway routes (and request logs) this controller owns.
  const storeId = await storeIdentity(store);

  const agentFor: AgentResolver = opts.agentFactory ?? ((node) => new HttpAgentApi({ node: node.name, url: node.url, token: opts.token }));
  const nodeLeaseMs = opts.nodeReadyWithinMs ?? DEFAULT_NODE_READY_WITHIN_MS;
  const nodes = new NodeRegistry(store, nodeLeaseMs);
  const locks = new ContainerLocks(store);
  const fences = new Fences(store);
  const range = opts.containerRange === 'off' ? undefined : parseContainerRange(opts.containerRange ?? DEFAULT_CONTAINER_RANGE);
  const containers = new ContainerService(store, nodes, agentFor, locks, new ContainerAddresses(store, range));
  const addressRoutes = opts.addressRoutesCommand ? new AddressRoutes(store, nodes, opts.addressRoutesCommand, logger) : undefined;
  const routes = new RouteService(
    store,
    async (node) => (await nodes.get(node).catch(() => undefined))?.address,
    logger,
    opts.gateway ? { ...opts.gateway, token: opts.token, owner: storeId } : undefined,
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
  const catalog: CheckpointCatalog = {
    list: async (container) => checkpointStore.list(container),
    forget: async (container) => void (await checkpointStore.forget(container)),
  };
  // Agents upload to the store through this URL: known once listening, when no advertised URL was given.
  let storeUrl = opts.advertiseUrl ?? '';
  const checkpoints = new CheckpointService({ store, nodes, agentFor, locks, traffic: routes, catalog, storeUrl: () => storeUrl, log: logger });
  const failovers = new FailoverService({ store, nodes, locks, fences, agentFor, nodeLeaseMs, checkpoints, catalog, traffic: routes, log: logger });
  const migrations = new MigrationOrchestrator({ store, nodes, agentFor, locks, fences, log: logger, traffic: routes, rescuer: failovers });
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
    heartbeatMs: Math.max(100, Math.floor(nodeLeaseMs / 4)),
    enableFaults: process.env.CHIPMUNK_ENABLE_FAULTS === '1',
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
  storeUrl ||= `http://${host}:${address.port}`;
  routes.start();
  // Agents heartbeat from the moment the API listens; what a previous controller left is settled
  // from then on (its locks keep new operations off those containers meanwhile), and node deaths
  // are judged only once agents had a lease's time to heartbeat.
  await failovers.start();
  void recoverStaleLocks({ locks, nodes, agentFor, traffic: routes, failovers, log: logger }).catch((err: unknown) =>
    logger.error({ err: (err as Error).message }, 'settling what the previous controller left failed'),
  );
  migrations.start();
  checkpoints.start();
  await addressRoutes?.start();
  logger.info({ store: storeSpec, storeId }, `controller listening on http://${host}:${address.port}`);
  return {
    url: `http://${host}:${address.port}`,
    close: async () => {
      addressRoutes?.stop();
      routes.stop();
      checkpoints.stop();
      failovers.stop();
      migrations.stop();
      await app.close();
      await closeCheckpointStore();
      await store.close();
    },
  };
}
