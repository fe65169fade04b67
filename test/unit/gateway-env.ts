/**
 * What the gateway tests share: a gateway on loopback with a temporary state file, upstream
 * servers on 127.0.0.1, free ports.
 */
import { createServer as createHttpServer, type IncomingMessage, type Server as HttpServer, type ServerResponse } from 'node:http';
import { createServer as createNetServer, type Server as NetServer, type Socket } from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import { GatewayClient, startGateway, type GatewayOptions, type RunningGateway, type Upstream } from '../../src/gateway/index.js';

export const TOKEN = 'gateway-test-token';
export const LOOPBACK = '127.0.0.1';

export interface TestGateway {
  gateway: RunningGateway;
  client: GatewayClient;
  stateFile: string;
}

export async function withGateway(run: (env: TestGateway) => Promise<void>, opts: Partial<GatewayOptions> = {}): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'chipmunk-gateway-'));
  const stateFile = opts.stateFile ?? join(dir, 'routes.json');
  const gateway = await startGateway({
    apiListen: { host: LOOPBACK, port: 0 },
    routeHost: LOOPBACK,
    token: TOKEN,
    stateFile,
    logger: pino({ level: 'silent' }),
    ...opts,
  });
  try {
    await run({ gateway, client: new GatewayClient({ url: gateway.url, token: TOKEN }), stateFile });
  } finally {
    await gateway.close();
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * A port nothing uses right now, for a route's listener. Picked below the kernel's ephemeral
 * range (32768 and up), where the tests' own client connections take their local ports: one of
 * those could otherwise take the port between this check and the gateway's bind.
 */
export async function freePort(): Promise<number> {
  for (;;) {
    const port = 20_000 + Math.floor(Math.random() * 12_000);
    const server = createNetServer();
    const free = await new Promise<boolean>((resolve) => {
      server.once('error', () => resolve(false));
      server.listen(port, LOOPBACK, () => resolve(true));
    });
    if (!free) continue;
    await new Promise<void>((resolve) => server.close(() => resolve()));
    return port;
  }
}

export interface TestUpstream {
  upstream: Upstream;
  server: HttpServer | NetServer;
  /** Connections accepted so far. */
  connections: number;
  /** Stops at once: open connections are cut (a container that froze and moved away). */
  kill(): Promise<void>;
}

export async function httpUpstream(handler: (req: IncomingMessage, res: ServerResponse) => void, port = 0): Promise<TestUpstream> {
  const server = createHttpServer(handler);
  return listening(server, port, () => server.closeAllConnections());
}

/** Echoes every byte back, after `prefix` once per connection (to tell upstreams apart). */
export async function echoUpstream(prefix: string, port = 0): Promise<TestUpstream & { sockets: Set<Socket> }> {
  const sockets = new Set<Socket>();
  const server = createNetServer({ allowHalfOpen: true }, (socket) => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
    socket.on('error', () => socket.destroy());
    socket.write(prefix);
    socket.pipe(socket);
  });
  const upstream = await listening(server, port, () => {
    for (const socket of sockets) socket.destroy();
  });
  return Object.assign(upstream, { sockets });
}

async function listening(server: HttpServer | NetServer, port: number, cut: () => void): Promise<TestUpstream> {
  await new Promise<void>((resolve) => server.listen(port, LOOPBACK, resolve));
  const test: TestUpstream = {
    upstream: { address: LOOPBACK, port: (server.address() as { port: number }).port },
    server,
    connections: 0,
    kill: async () => {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      cut();
      await closed;
    },
  };
  server.on('connection', () => test.connections++);
  return test;
}

/** Polls until `check` holds, for state the tests cannot await directly. */
export async function eventually(check: () => boolean | Promise<boolean>, what: string, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}
