/**
 * `chipmunk controller` and `chipmunk agent`: the long-running processes. Each starts, prints
 * where it listens, and runs until SIGTERM or SIGINT, then closes cleanly.
 */
import type { Command } from 'commander';
import pino from 'pino';

import { daemonToken } from '../context.js';
import { addJsonOption, parseIPv4Cidr, parseLeaderLease, parseListen, parseNodeLease, parseNodeName, parsePositiveInt, parseUrl, parseUrlList, parseUserns, parseWritableLayer, type ListenAddress } from '../options.js';
import { printJson } from '../output.js';

const DEFAULT_CONTROLLER_LISTEN = '127.0.0.1:7400';
const DEFAULT_STORE = 'sqlite:/var/lib/chipmunk/controller.db';
const DEFAULT_GATEWAY_API = '127.0.0.1:7402';
const DEFAULT_GATEWAY_ROUTE_HOST = '0.0.0.0';
const DEFAULT_GATEWAY_STATE = '/var/lib/chipmunk/gateway/routes.json';
const DEFAULT_AGENT_DATA_DIR = '/var/lib/chipmunk/agent';
const DEFAULT_AGENT_RUN_DIR = '/run/chipmunk/agent';
const DEFAULT_AGENT_SUBNET = '198.19.0.0/24';

/** Resolves at the first SIGTERM or SIGINT; a second one exits at once, for a close that hangs. */
function untilStopSignal(): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    const signals: NodeJS.Signals[] = ['SIGTERM', 'SIGINT'];
    const onFirst = (signal: NodeJS.Signals): void => {
      for (const s of signals) {
        process.off(s, onFirst);
        process.once(s, () => process.exit(1));
      }
      resolve(signal);
    };
    for (const s of signals) process.on(s, onFirst);
  });
}

/** Announces the daemon's URL on stdout (JSON with --json), runs it until a stop signal, closes it. */
async function serveUntilStopped(json: boolean | undefined, what: string, daemon: { url: string; close(): Promise<void> }): Promise<never> {
  if (json) printJson({ url: daemon.url });
  else process.stdout.write(`${what} listening at ${daemon.url}\n`);
  await untilStopSignal();
  await daemon.close();
  // Closed: a handle it forgot (a timer, a keep-alive socket) must not keep the process around.
  process.exit(0);
}

interface ControllerOptions {
  listen: ListenAddress;
  store: string;
  tokenFile?: string;
  gateway?: string;
  gatewayHost?: string;
  advertiseUrl?: string;
  checkpointDir?: string;
  keepCheckpoints: number;
  checkpointReplicas?: number;
  checkpointStorePeers?: string[];
  nodeLease: number;
  containerRange?: string;
  addressRoutes?: string;
  leaderLease: number;
  node?: string;
  json?: boolean;
}

interface GatewayDaemonOptions {
  api: ListenAddress;
  routeHost: string;
  state: string;
  maxHeld?: number;
  maxHoldMs?: number;
  logDir?: string;
  maxLoggedBody?: number;
  maxReplayWaitMs?: number;
  tokenFile?: string;
  json?: boolean;
}

interface AgentOptions {
  node: string;
  controller: string[];
  listen: ListenAddress;
  tokenFile?: string;
  dataDir: string;
  runDir: string;
  subnet: string;
  imageStore?: string;
  writableLayer: 'directory' | 'image';
  userns: 'on' | 'off';
  json?: boolean;
}

export function registerDaemonCommands(program: Command): void {
  addJsonOption(
    program
      .command('controller')
      .description('run the controller: it knows the nodes and containers and orchestrates migrations')
      .option('--listen <host:port>', 'address to serve the API on', parseListen, parseListen(DEFAULT_CONTROLLER_LISTEN))
      .option('--store <spec>', 'state store: sqlite:/path/to/file.db, memory:, or etcd://HOST:PORT[,HOST:PORT...][/NAMESPACE] (an etcd cluster)', DEFAULT_STORE)
      .option('--token-file <file>', 'file holding the cluster token (default: $CHIPMUNK_TOKEN)')
      .option('--gateway <url>', "the gateway's API, for exposed services", parseUrl)
      .option('--gateway-host <address>', 'where clients reach the gateway (shown by ps)')
      .option('--advertise-url <url>', 'how agents reach this controller and its checkpoint store (default: the listen address)', parseUrl)
      .option('--checkpoint-dir <dir>', 'where the checkpoint store keeps chunks and index (default: checkpoints/ beside the SQLite store; required with etcd)')
      .option('--keep-checkpoints <n>', 'checkpoints kept per container', parsePositiveInt, 5)
      .option('--checkpoint-replicas <n>', 'checkpoint store replicas each checkpoint must be committed on before it counts (default: 2 with an etcd store or peers, else 1)', parsePositiveInt)
      .option('--checkpoint-store-peers <urls>', "other controllers (URL,URL...) whose checkpoint stores are replicas too (with etcd, running controllers publish theirs: no need)", parseUrlList)
      .option('--node-lease <duration>', 'a node that has not heartbeated for this long is dead: its protected containers fail over', parseNodeLease, 5000)
      .option('--node <name>', 'the node this controller runs on, if any (shown by `chipmunk node ls`)', parseNodeName)
      .option('--leader-lease <duration>', 'with an etcd store: a leader that cannot renew its lease for this long stops leading, and another takes over', parseLeaderLease, 2000)
      .option('--container-range <cidr|off>', "containers' cluster-wide addresses, kept across moves (default 198.19.128.0/18; off: only their node's address)")
      .option('--address-routes <command>', 'run as `COMMAND ADDRESS NODE_ADDRESS` whenever a container (re)starts on a node, `COMMAND ADDRESS` when removed (README: container addresses)'),
  ).action(async (opts: ControllerOptions) => {
    const token = await daemonToken(opts.tokenFile);
    // Loaded only here: the other commands need neither fastify nor the store.
    const { startController } = await import('../../controller/index.js');
    // Logs on stderr: stdout carries only the announcement (which --json scripts parse).
    const logger = pino(pino.destination(2));
    const controller = await startController({
      listen: opts.listen,
      token,
      storeSpec: opts.store,
      logger,
      ...(opts.gateway ? { gateway: { url: opts.gateway, publicHost: opts.gatewayHost } } : {}),
      ...(opts.advertiseUrl ? { advertiseUrl: opts.advertiseUrl } : {}),
      ...(opts.checkpointDir ? { checkpointDir: opts.checkpointDir } : {}),
      keepCheckpoints: opts.keepCheckpoints,
      ...(opts.checkpointReplicas !== undefined ? { checkpointReplicas: opts.checkpointReplicas } : {}),
      ...(opts.checkpointStorePeers ? { checkpointStorePeers: opts.checkpointStorePeers } : {}),
      nodeReadyWithinMs: opts.nodeLease,
      leaderLeaseMs: opts.leaderLease,
      ...(opts.containerRange ? { containerRange: opts.containerRange } : {}),
      ...(opts.addressRoutes ? { addressRoutesCommand: opts.addressRoutes } : {}),
      ...(opts.node ? { node: opts.node } : {}),
    });
    await serveUntilStopped(opts.json, 'controller', controller);
  });

  addJsonOption(
    program
      .command('gateway')
      .description("run the gateway: clients keep one address while containers move; the controller pushes its routes")
      .option('--api <host:port>', 'address to serve the gateway API on (the controller talks to it)', parseListen, parseListen(DEFAULT_GATEWAY_API))
      .option('--route-host <address>', "address the routes' listeners bind (clients connect there)", DEFAULT_GATEWAY_ROUTE_HOST)
      .option('--state <file>', 'route table file (survives restarts)', DEFAULT_GATEWAY_STATE)
      .option('--max-held <n>', 'requests (or connections) one route may hold during a migration; more get 503 queue-full', parsePositiveInt)
      .option('--max-hold-ms <ms>', 'longest wait of a held request; then it gets 503 hold-timeout (the route stays held until released)', parsePositiveInt)
      .option('--log-dir <dir>', "logged routes' request logs, one folder per route (default: request-log next to --state)")
      .option('--max-logged-body <bytes>', 'logged routes refuse larger request bodies with 413 (default 8 MiB)', parsePositiveInt)
      .option('--max-replay-wait-ms <ms>', 'logged routes: how long a request whose container was lost waits for its replay, then 503 upstream-lost (default 60000)', parsePositiveInt)
      .option('--token-file <file>', 'file holding the cluster token (default: $CHIPMUNK_TOKEN)'),
  ).action(async (opts: GatewayDaemonOptions) => {
    const token = await daemonToken(opts.tokenFile);
    const { startGateway } = await import('../../gateway/index.js');
    const logger = pino(pino.destination(2));
    const holdLimits = {
      ...(opts.maxHeld !== undefined ? { maxQueued: opts.maxHeld } : {}),
      ...(opts.maxHoldMs !== undefined ? { maxHoldMs: opts.maxHoldMs } : {}),
    };
    const gateway = await startGateway({
      apiListen: opts.api,
      routeHost: opts.routeHost,
      token,
      stateFile: opts.state,
      holdLimits,
      logger,
      ...(opts.logDir !== undefined ? { logDir: opts.logDir } : {}),
      ...(opts.maxLoggedBody !== undefined ? { maxLoggedBodyBytes: opts.maxLoggedBody } : {}),
      ...(opts.maxReplayWaitMs !== undefined ? { maxReplayWaitMs: opts.maxReplayWaitMs } : {}),
    });
    await serveUntilStopped(opts.json, 'gateway', gateway);
  });

  addJsonOption(
    program
      .command('agent')
      .description("run a node's agent: it runs containers with runc and CRIU and moves them between nodes")
      .requiredOption('--node <name>', 'this node\'s name', parseNodeName)
      .requiredOption('--controller <urls>', 'controller URL to register with, or several comma-separated (every controller of an HA cluster)', parseUrlList)
      .requiredOption('--listen <addr:port>', 'address to serve the agent API on (other nodes reach this node there)', parseListen)
      .option('--token-file <file>', 'file holding the cluster token (default: $CHIPMUNK_TOKEN)')
      .option('--data-dir <dir>', 'persistent state: container layers, checkpoints', DEFAULT_AGENT_DATA_DIR)
      .option('--run-dir <dir>', 'runtime state: runc root, sockets', DEFAULT_AGENT_RUN_DIR)
      .option('--subnet <cidr>', "containers' addresses on this node", parseIPv4Cidr, DEFAULT_AGENT_SUBNET)
      .option('--image-store <dir>', "a private Podman store for this agent's images (default: the machine's)")
      .option(
        '--writable-layer <kind>',
        "new containers' writable layer: directory, or image (ext4 in one file: keeps inode numbers across moves, which SQLite needs; a 10 GiB disk quota)",
        parseWritableLayer,
        'directory',
      )
      .option(
        '--userns <on|off>',
        'new containers in a user namespace of their own (on: capabilities count only inside it, and CRIU can dump non-root processes where the host withholds CAP_SYS_RESOURCE) or in the host\'s (off)',
        parseUserns,
        'on',
      ),
  ).action(async (opts: AgentOptions) => {
    const token = await daemonToken(opts.tokenFile);
    const { startAgent } = await import('../../agent/index.js');
    const agent = await startAgent({
      node: opts.node,
      listen: opts.listen,
      controllerUrls: opts.controller,
      token,
      dataDir: opts.dataDir,
      runDir: opts.runDir,
      subnet: opts.subnet,
      imageStore: opts.imageStore,
      writableLayer: opts.writableLayer,
      userNamespace: opts.userns === 'on',
    });
    await serveUntilStopped(opts.json, `agent ${opts.node}`, agent);
  });
}
