/**
 * Real agents for the agent contract: the agent's HTTP server (buildAgentServer) over a real
 * RuncRuntime in each test host of a runc pair (test/support/runc-pair.ts: bridge chmkr-br0,
 * 198.18.2.0/24), a checkpoint store with its routes, all in this process and reached through
 * HttpAgentApi, as the controller reaches agents.
 *
 * The HTTP servers listen on loopback (this process fetches trees and uploads checkpoints for
 * every agent); each agent advertises its test host's address, where its CRIU page server
 * listens for the other test host's lazy-pages daemon.
 */
import { mkdir, mkdtemp, readdir } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Fastify, { type FastifyInstance } from 'fastify';
import { AGENT_VERSION } from '../../src/agent/index.js';
import { FaultInjector } from '../../src/agent/faults.js';
import { ImageStore } from '../../src/agent/runtime/images.js';
import { buildAgentServer } from '../../src/agent/server.js';
import { CheckpointStore, checkpointStoreRoutes } from '../../src/checkpoint-store/index.js';
import { HttpAgentApi } from '../../src/controller/agent-client.js';
import { runUnchecked } from '../../src/shared/exec.js';
import { installApiConventions } from '../../src/shared/http.js';
import { TermFence } from '../../src/shared/term-fence.js';
import type { AgentCluster } from '../contract/agent.contract.js';
import { RUNC_PAIR_NET, RUNC_PAIR_NODES, makeRuncPair } from './runc-pair.js';
import type { RuntimePair } from '../contract/runtime.contract.js';
import type { HostCapabilities } from '../../src/shared/protocol.js';

const TOKEN = 'agent-contract-token';
/** Page server ports for this suite's lazy dumps (in the source test host's namespace). */
const PAGE_SERVER_PORT_BASE = 27400;
/** A hung step fails the test instead of waiting the controller's 15 minutes. */
const STEP_TIMEOUT_MS = 60_000;

// Per pair network: a suite on another network must not sweep this one's directories as leftovers.
const TMP_PREFIX = `chipmunk-agent-contract${RUNC_PAIR_NET === 2 ? '' : RUNC_PAIR_NET}-`;

/** The agent cluster, and a way to take its checkpoint store down as a dead host would. */
export type RuncAgents = AgentCluster & { killStore(): Promise<void> };

export async function makeRuncAgents(): Promise<RuncAgents> {
  // A run killed before its cleanup left its store and scratch space (no mounts: those are the pair's).
  for (const entry of await readdir(tmpdir())) {
    if (entry.startsWith(TMP_PREFIX)) await runUnchecked('rm', ['-rf', '--one-file-system', '--', join(tmpdir(), entry)]);
  }
  const pair = await makeRuncPair();
  const servers: FastifyInstance[] = [];
  let store: CheckpointStore | undefined;
  const root = await mkdtemp(join(tmpdir(), TMP_PREFIX));
  const cleanup = async () => {
    for (const server of servers) await server.close().catch(() => undefined);
    await store?.close().catch(() => undefined);
    // The pair removes containers, mounts, namespaces and test hosts; then our own directory.
    try {
      await pair.cleanup();
    } finally {
      await runUnchecked('rm', ['-rf', '--one-file-system', '--', root]);
    }
  };
  try {
    store = await CheckpointStore.open({ root: join(root, 'store') });
    const storeServer = Fastify();
    servers.push(storeServer);
    installApiConventions(storeServer, TOKEN);
    await storeServer.register(checkpointStoreRoutes(store));
    const storeUrl = await storeServer.listen({ host: '127.0.0.1', port: 0 });
    const killStore = async () => {
      storeServer.server.closeAllConnections();
      await storeServer.close();
    };

    const agents = await startPairAgentServers(pair, root, TOKEN);
    servers.push(...agents.map((a) => a.app));
    const nodes = agents.map(({ node, url }) => ({ name: node, url, api: new HttpAgentApi({ node, url, token: TOKEN, migrationStepTimeoutMs: STEP_TIMEOUT_MS }) }));
    let nextPort = PAGE_SERVER_PORT_BASE;
    return {
      nodes,
      image: 'chipmunk/busybox',
      // A shell that ends on SIGTERM at once (a bare sleep as PID 1 ignores it: stop would wait 10 s).
      command: ['/bin/sh', '-c', 'trap "exit 0" TERM; sleep 3600 & wait'],
      storeUrl,
      pageServerPort: () => nextPort++,
      killStore,
      unreachable: new HttpAgentApi({ node: 'gone', url: `http://127.0.0.1:${await closedPort()}`, token: TOKEN, timeoutMs: 5_000 }),
      cleanup,
    };
  } catch (err) {
    await cleanup().catch(() => undefined);
    throw err;
  }
}

/** An agent's HTTP server over one runtime of a runc pair. */
export interface PairAgentServer {
  node: string;
  /** Its test host's address (where its CRIU page server listens). */
  address: string;
  /** Its API, on loopback. */
  url: string;
  capabilities: HostCapabilities;
  app: FastifyInstance;
}

/**
 * The agent's HTTP server (buildAgentServer) over each runtime of `pair`, in this process,
 * listening on loopback and advertising its test host's address; scratch space and term fence in `root`.
 */
export async function startPairAgentServers(pair: RuntimePair, root: string, token: string): Promise<PairAgentServer[]> {
  const runtimes = [pair.source, pair.target];
  const started: PairAgentServer[] = [];
  for (const [i, cfg] of RUNC_PAIR_NODES.entries()) {
    const scratchDir = join(root, `scratch-${cfg.node}`);
    await mkdir(scratchDir, { recursive: true });
    const capabilities = runtimes[i]!.capabilities;
    const app = buildAgentServer({
      // apiPort is informational here: the server listens on loopback, its port picked below.
      info: { node: cfg.node, address: cfg.address, apiPort: 0, capabilities, version: AGENT_VERSION },
      token,
      runtime: runtimes[i]!,
      images: new ImageStore(),
      scratchDir,
      faults: new FaultInjector(false),
      termFence: await TermFence.open(join(root, `leader-term-${cfg.node}`)),
    });
    const url = await app.listen({ host: '127.0.0.1', port: 0 });
    started.push({ node: cfg.node, address: cfg.address, url, capabilities, app });
  }
  return started;
}

/** A loopback port nothing listens on (it was free a moment ago). */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}
