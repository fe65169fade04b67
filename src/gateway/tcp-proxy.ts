/**
 * A TCP route: each client connection is piped to a connection to the container's current
 * upstream. While the route is held, new connections are accepted but not read from (what the
 * client sends waits in the kernel) and connected once the hold ends. Nothing is retried after
 * a connection is piped: the gateway cannot know what the bytes meant.
 *
 * Connections open when a migration starts stay piped to the old location: a container's TCP
 * connections do not survive a move to another address. They end when the old upstream closes
 * or resets them, or at the latest when the route's upstream changes (a checkpointed container's
 * connections vanish without a reset, so the gateway cannot wait for one). Either way the client
 * gets what was already piped, then a clean end of stream (FIN), and can reconnect, through the
 * gateway, to the new location.
 */
import { createServer, connect, type Server, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { RouteGate, RouteRefusedError } from './gate.js';
import type { Route, Upstream } from './protocol.js';
import { listenForRoute, type ProxySettings, type RouteProxy } from './proxy.js';
import { sameUpstream } from './routes.js';

/** An upstream that does not accept within this long counts as unreachable. */
const CONNECT_TIMEOUT_MS = 5_000;
/** After the upstream side ended, how long the client may take to close its side before it is cut. */
const LINGER_MS = 10_000;

export class TcpRouteProxy implements RouteProxy {
  private readonly gate: RouteGate;
  private readonly server: Server;
  private readonly sockets = new Set<Socket>();
  /** Upstream connections in use, with where they go. */
  private readonly piped = new Map<Socket, Upstream>();

  private constructor(
    route: Route,
    private readonly settings: ProxySettings,
  ) {
    this.gate = new RouteGate(route, settings.limits, settings.metrics.held);
    // pauseOnConnect: nothing is read from a held client until its upstream is there to take it.
    this.server = createServer({ pauseOnConnect: true, allowHalfOpen: true, noDelay: true }, (client) => void this.accept(client));
  }

  static async listen(route: Route, settings: ProxySettings): Promise<TcpRouteProxy> {
    const proxy = new TcpRouteProxy(route, settings);
    await listenForRoute(proxy.server, settings.host, route);
    return proxy;
  }

  get held(): number {
    return this.gate.held;
  }

  /** Open connections are not drained: they end with the container's move (docs/gateway.md). */
  idle(): Promise<void> {
    return Promise.resolve();
  }

  update(route: Route): void {
    for (const [socket, upstream] of this.piped) if (!sameUpstream(upstream, route.upstream)) socket.destroy();
    this.gate.update(route);
  }

  async close(reason: 'route-removed' | 'shutting-down'): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.gate.refuseAll(reason, reason === 'route-removed' ? `the route of container '${this.gate.route.name}' was removed` : 'the gateway is shutting down');
    for (const socket of this.sockets) socket.destroy();
    await closed;
  }

  private async accept(client: Socket): Promise<void> {
    this.track(client);
    client.on('error', () => client.destroy());
    const clientGone = new AbortController();
    client.once('close', () => clientGone.abort());
    for (let attempts = 0; ; attempts++) {
      let route: Route & { upstream: Upstream };
      try {
        route = await this.gate.pass(clientGone.signal);
      } catch (err) {
        if (err instanceof RouteRefusedError) {
          this.settings.metrics.connection(err.reason);
          this.settings.log.debug({ route: this.gate.route.name, reason: err.reason }, 'connection refused');
          // A reset, not an end of stream: the client must not take it for an (empty) answer.
          if (!client.destroyed) client.resetAndDestroy();
        }
        return;
      }
      let upstream: Socket;
      try {
        upstream = await connectTo(route.upstream);
      } catch (err) {
        if (client.destroyed) return;
        // Nothing was sent yet (the client's bytes wait in its socket), so any connect failure may be retried.
        const delay = this.gate.retryDelay({ route, resendable: true, connectFailed: true, attempts });
        if (delay === undefined) {
          this.settings.metrics.connection('upstream-unreachable');
          this.settings.log.warn({ route: route.name, upstream: route.upstream, err: (err as Error).message }, 'upstream unreachable: connection reset');
          client.resetAndDestroy();
          return;
        }
        this.settings.metrics.retry();
        if (delay > 0) await sleep(delay);
        continue;
      }
      if (client.destroyed) {
        upstream.destroy();
        return;
      }
      if (this.gate.route.generation !== route.generation) {
        // Held or redirected while connecting: nothing was sent yet, so start over.
        upstream.destroy();
        continue;
      }
      this.settings.metrics.connection('proxied');
      this.piped.set(upstream, route.upstream);
      upstream.once('close', () => this.piped.delete(upstream));
      this.splice(client, upstream);
      return;
    }
  }

  /** Pipes both ways; an end of stream on one side is passed on as an end of stream (half-close). */
  private splice(client: Socket, upstream: Socket): void {
    this.track(upstream);
    client.pipe(upstream);
    upstream.pipe(client);
    client.on('close', () => upstream.destroy());
    // Closed or reset by the upstream (the container stopped or hung up), or given up because the
    // container moved: the client gets what was already piped, then a clean end of stream.
    upstream.once('close', () => {
      if (client.destroyed) return;
      client.unpipe(upstream);
      client.resume();
      client.end();
      setTimeout(() => client.destroy(), LINGER_MS).unref();
    });
    client.resume();
  }

  private track(socket: Socket): void {
    this.sockets.add(socket);
    socket.once('close', () => this.sockets.delete(socket));
  }
}

function connectTo(upstream: Upstream): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: upstream.address, port: upstream.port, allowHalfOpen: true, noDelay: true });
    socket.setTimeout(CONNECT_TIMEOUT_MS, () => socket.destroy(Object.assign(new Error(`connect timed out after ${CONNECT_TIMEOUT_MS} ms`), { code: 'ETIMEDOUT' })));
    socket.once('error', reject);
    socket.once('connect', () => {
      socket.setTimeout(0);
      socket.off('error', reject);
      // From now on an error (a reset) just closes it; splice() passes the close on to the client.
      socket.on('error', () => socket.destroy());
      resolve(socket);
    });
  });
}
