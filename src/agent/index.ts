/**
 * The agent: one per host. Public entry of the component.
 *
 * It probes the host (CRIU, userfaultfd), serves the agent API on its node address, and
 * registers with the controller, repeating the registration as a heartbeat.
 */
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import pino, { type Logger } from 'pino';
import { detectCapabilities, resolveCriuPath } from '../shared/host/capabilities.js';
import { CRIU_KERNEL_CACHE, prepareCriuKernelCache } from './host/criu-kernel-cache.js';
import { PAGE_SERVER_PORTS } from '../shared/protocol.js';
import { TermFence } from '../shared/term-fence.js';
import type { AgentInfo, FencedContainer } from '../shared/protocol.js';
import { FaultInjector } from './faults.js';
import { startHeartbeats } from './heartbeat.js';
import { ImageStore } from './runtime/images.js';
import { RuncRuntime } from './runtime/runc-runtime.js';
import type { WritableLayerKind } from './runtime/rootfs.js';
import type { ContainerRuntime } from './runtime/types.js';
import { buildAgentServer } from './server.js';

export interface AgentOptions {
  node: string;
  listen: { host: string; port: number };
  /** Address other nodes and clients reach this node at; defaults to the listen host. */
  advertiseAddress?: string;
  /** The controllers to heartbeat to: any of them takes it; the next one when one cannot be reached. */
  controllerUrls?: string[];
  token: string;
  dataDir: string;
  runDir: string;
  /** Container subnet of this node (CIDR). */
  subnet: string;
  criuPath?: string;
  heartbeatMs?: number;
  /** A private Podman store (root dir; runroot beside it) instead of the machine's default. */
  imageStore?: string;
  enableFaults?: boolean;
  /** New containers' writable layer (src/agent/runtime/rootfs.ts); a directory if not given. */
  writableLayer?: WritableLayerKind;
  /** New containers in a user namespace of their own (src/agent/runtime/bundle.ts); true if not given. */
  userNamespace?: boolean;
}

export interface RunningAgent {
  url: string;
  info: AgentInfo;
  close(): Promise<void>;
}

export const AGENT_VERSION = '0.1.0';

/**
 * Fencing: a container the controller restored elsewhere while this node was cut off must not
 * run here too. Any incarnation older than the one that runs elsewhere is stopped and removed;
 * its state lives on in the newer one.
 */
async function fenceMovedContainers(runtime: ContainerRuntime, fence: FencedContainer[], log: Logger): Promise<void> {
  if (fence.length === 0) return;
  const local = new Map((await runtime.list()).map((c) => [c.name, c]));
  for (const moved of fence) {
    const here = local.get(moved.name);
    if (here?.error) {
      log.error({ container: moved.name, err: here.error }, `${moved.name} runs elsewhere now, but this node's record of it is damaged, so whether this copy is older cannot be told: not removed`);
      continue;
    }
    if (!here || here.generation >= moved.generation) continue;
    log.warn({ container: moved.name, generation: here.generation, runsElsewhereAs: moved.generation }, `fencing ${moved.name}: it was restored on another node while this one was unreachable; removing this copy`);
    await runtime.remove(moved.name, { force: true, fenced: true }).catch((err: unknown) => log.error({ err: (err as Error).message }, `could not remove fenced container ${moved.name}`));
  }
}

export async function startAgent(opts: AgentOptions): Promise<RunningAgent> {
  const log = pino({ name: `agent-${opts.node}`, level: process.env.CHIPMUNK_LOG_LEVEL ?? 'info' });
  const criuPath = resolveCriuPath(opts);
  await mkdir(opts.dataDir, { recursive: true });
  await mkdir(opts.runDir, { recursive: true });
  const capabilities = await detectCapabilities({ criuPath });
  if (!(await prepareCriuKernelCache(criuPath).catch(() => false))) log.warn({ cache: CRIU_KERNEL_CACHE }, 'CRIU has no kernel cache: each CRIU run probes the kernel again, inside migrations\' frozen windows');
  const address = opts.advertiseAddress ?? opts.listen.host;
  const info: AgentInfo = { node: opts.node, address, apiPort: opts.listen.port, capabilities, version: AGENT_VERSION };
  const images = new ImageStore(opts.imageStore ? { root: join(opts.imageStore, 'root'), runroot: join(opts.imageStore, 'runroot') } : {});
  const runtime = new RuncRuntime({ node: opts.node, dataDir: opts.dataDir, runDir: opts.runDir, subnet: opts.subnet, criuPath, capabilities, images,
    nodeAddress: address,
    writableLayer: opts.writableLayer,
    userNamespace: opts.userNamespace,
    onWarning: (message, details) => log.warn(details, message),
    reservedHostPorts: [
      { from: opts.listen.port, to: opts.listen.port, usedBy: 'the chipmunk agent' },
      { from: PAGE_SERVER_PORTS.first, to: PAGE_SERVER_PORTS.last, usedBy: 'migration page servers' },
    ],
  });
  const { resumed, abandoned } = await runtime.recoverAtStart();
  if (resumed.length > 0) log.warn({ containers: resumed }, 'resumed containers an interrupted checkpoint had left paused');
  if (abandoned.length > 0) log.warn({ left: abandoned }, 'removed what migrations and restores the previous agent process died in left behind');
  const faults = new FaultInjector(opts.enableFaults ?? process.env.CHIPMUNK_ENABLE_FAULTS === '1');
  const termFence = await TermFence.open(join(opts.dataDir, 'leader-term'));
  const app = buildAgentServer({ info, token: opts.token, runtime, images, scratchDir: join(opts.dataDir, 'scratch'), faults, termFence, logger: log });
  await app.listen({ host: opts.listen.host, port: opts.listen.port });
  const url = `http://${address}:${opts.listen.port}`;
  log.info({ url, capabilities }, 'agent listening');

  const heartbeats = opts.controllerUrls?.length
    ? await startHeartbeats({
        controllerUrls: opts.controllerUrls,
        token: opts.token,
        registration: { name: opts.node, address, url, capabilities },
        ...(opts.heartbeatMs !== undefined ? { intervalMs: opts.heartbeatMs } : {}),
        onAnswer: (answer) => fenceMovedContainers(runtime, answer.fence, log),
        log,
      })
    : undefined;

  return {
    url,
    info,
    async close() {
      heartbeats?.stop();
      await app.close();
      await runtime.close();
    },
  };
}
