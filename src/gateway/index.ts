/**
 * The gateway: one stable address per container for its clients, whichever node the container
 * runs on. Public entry of the component (docs/gateway.md).
 *
 * It listens on one port per route (HTTP reverse proxy or TCP pipe) and serves an API on which
 * the controller pushes routes and holds/releases them around migrations. The route table is
 * saved in `stateFile` and reloaded on start.
 */
import { mkdir } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import { dirname, join } from 'node:path';
import { pino, type Logger } from 'pino';
import { InvalidInputError } from '../shared/errors.js';
import { TermFence } from '../shared/term-fence.js';
import { DEFAULT_HOLD_LIMITS, type HoldLimits } from './gate.js';
import { Gateway } from './gateway.js';
import { GatewayMetrics } from './metrics.js';
import { RouteStateFile } from './routes.js';
import { buildGatewayServer } from './server.js';

export { GatewayClient, type GatewayClientOptions } from './client.js';
export { DEFAULT_HOLD_LIMITS, type HoldLimits, type RefusalReason, type UpstreamFailureReason } from './gate.js';
export type {
  HoldRequest,
  HoldResponse,
  LogPosition,
  ReleaseRequest,
  ReplayRequest,
  ReplayResult,
  RequestLogView,
  Route,
  RouteProtocol,
  RouteSpec,
  RouteView,
  SyncedRoute,
  Upstream,
} from './protocol.js';

export const DEFAULT_REPLAYABLE_BODY_BYTES = 1024 * 1024;
export const DEFAULT_UPSTREAM_CONNECTIONS = 256;
export const DEFAULT_UPSTREAM_STALL_MS = 250;
export const DEFAULT_MAX_LOGGED_BODY_BYTES = 8 * 1024 * 1024;
export const DEFAULT_MAX_REPLAY_WAIT_MS = 60_000;

export interface GatewayOptions {
  /** Where the API listens (the controller talks to it). */
  apiListen: { host: string; port: number };
  /** Address the route listeners bind, for the containers' clients; all interfaces by default. */
  routeHost?: string;
  /** The cluster token: the API requires it. */
  token: string;
  /** JSON file the route table is kept in (created with its folder). */
  stateFile: string;
  holdLimits?: Partial<HoldLimits>;
  /** Request bodies up to this size are kept so the request can be sent again after a move (1 MiB). */
  replayableBodyBytes?: number;
  /** Connections per upstream (256). */
  upstreamConnections?: number;
  /**
   * A request on a new upstream connection without an answer for this long (250 ms), while
   * another connection answered, waits in the upstream's backlog: docs/gateway.md, "Upstream connections".
   */
  upstreamStallMs?: number;
  /** Folder of the logged routes' request logs, one subfolder per route (default: `request-log` next to `stateFile`). */
  logDir?: string;
  /** Logged routes refuse larger request bodies with 413 (8 MiB). */
  maxLoggedBodyBytes?: number;
  /** Logged routes: longest wait of a request whose upstream was lost for the replay that answers it (60 s). */
  maxReplayWaitMs?: number;
  logger?: Logger;
}

export interface RunningGateway {
  /** The API's URL. */
  url: string;
  close(): Promise<void>;
}

export async function startGateway(opts: GatewayOptions): Promise<RunningGateway> {
  const logger = opts.logger ?? pino({ name: 'chipmunk-gateway' });
  const limits: HoldLimits = { ...DEFAULT_HOLD_LIMITS, ...opts.holdLimits };
  const replayableBodyBytes = opts.replayableBodyBytes ?? DEFAULT_REPLAYABLE_BODY_BYTES;
  const upstreamConnections = opts.upstreamConnections ?? DEFAULT_UPSTREAM_CONNECTIONS;
  const upstreamStallMs = opts.upstreamStallMs ?? DEFAULT_UPSTREAM_STALL_MS;
  const maxLoggedBodyBytes = opts.maxLoggedBodyBytes ?? DEFAULT_MAX_LOGGED_BODY_BYTES;
  const maxReplayWaitMs = opts.maxReplayWaitMs ?? DEFAULT_MAX_REPLAY_WAIT_MS;
  const logDir = opts.logDir ?? join(dirname(opts.stateFile), 'request-log');
  requirePositive({ ...limits, upstreamConnections, upstreamStallMs, maxReplayWaitMs });
  requirePositive({ replayableBodyBytes, maxLoggedBodyBytes }, 0);

  await mkdir(dirname(opts.stateFile), { recursive: true });
  const metrics = new GatewayMetrics();
  const gateway = await Gateway.open({
    routeHost: opts.routeHost ?? '0.0.0.0',
    limits,
    replayableBodyBytes,
    upstreamConnections,
    upstreamStallMs,
    logDir,
    maxLoggedBodyBytes,
    maxReplayWaitMs,
    stateFile: new RouteStateFile(opts.stateFile),
    metrics,
    log: logger,
  });
  const termFence = await TermFence.open(join(dirname(opts.stateFile), 'leader-term'));
  const app = buildGatewayServer({ token: opts.token, logger, gateway, metrics, termFence });
  try {
    await app.listen(opts.apiListen).catch((err: NodeJS.ErrnoException) => {
      throw new InvalidInputError(`the gateway API cannot listen on ${opts.apiListen.host}:${opts.apiListen.port} (${err.code ?? err.message}): pick another address or port`, {
        host: opts.apiListen.host,
        port: opts.apiListen.port,
      });
    });
  } catch (err) {
    await app.close();
    await gateway.close();
    throw err;
  }

  const address = app.server.address() as AddressInfo;
  const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  const url = `http://${host}:${address.port}`;
  logger.info({ stateFile: opts.stateFile, logDir, routes: gateway.list().length }, `gateway API listening on ${url}`);
  return {
    url,
    close: async () => {
      await app.close();
      await gateway.close();
    },
  };
}

function requirePositive(values: Record<string, number>, minimum = 1): void {
  for (const [name, value] of Object.entries(values)) {
    if (!Number.isInteger(value) || value < minimum) throw new InvalidInputError(`gateway option ${name} must be an integer of at least ${minimum} (got ${value})`, { [name]: value });
  }
}
