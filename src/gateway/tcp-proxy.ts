/**
 * A TCP route: each client connection is piped to a connection to the container's current
 * upstream. While the route is held, new connections are accepted but not read from (what the
 * client sends waits in the kernel) and connected once the hold ends. Nothing is retried after
 * a connection is piped: the gateway cannot know what the bytes meant.
 *
 * Connections open when a migration starts stay piped to their upstream. A container that keeps
 * its cluster address (the upstream the controller gives once that address is routed) keeps its
 * established connections across the move, and so do they: the route's upstream does not change,
 * and the gateway's side sees a retransmission, as any client does. An upstream that changes (a
 * container without a cluster address, which loses its connections when it moves) gives up the
 * connections piped to the old one: a checkpointed container's connections vanish without a
 * reset, so the gateway cannot wait for one. The client gets what was already piped, then a clean
 * end of stream (FIN), and can reconnect through the gateway to the new location.
 *
 * A connection that cannot be kept is reset, never left silent: when the upstream resets it (a
 * container restored from a checkpoint has no such connection), and at once when a failover's
 * hold says the container's copy is lost (resetLost).
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
  /** Upstream connections in use: where each goes, and its client's connection. */
  private readonly piped = new Map<Socket, { upstream: Upstream; client: Socket }>();

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

  /** Open connections are not drained: they stay open across the move, or end with it (docs/gateway.md). */
  idle(): Promise<void> {
    return Promise.resolve();
  }

  update(route: Route): void {
    for (const [socket, piped] of this.piped) if (!sameUpstream(piped.upstream, route.upstream)) socket.destroy();
    this.gate.update(route);
  }

  /**
   * The container's copy is lost (a failover's hold): what it held of each connection died with
   * it. Every piped connection is reset now, so its client reconnects, and waits for the release.
   */
  resetLost(): void {
    const lost = [...this.piped];
    for (const [socket, { client }] of lost) {
      client.resetAndDestroy();
      socket.destroy();
    }
    if (lost.length) this.settings.log.info({ route: this.gate.route.name, connections: lost.length }, "the container's copy is lost: its connections were reset");
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
      this.piped.set(upstream, { upstream: route.upstream, client });
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
    // Closed by the upstream (the container hung up or stopped), or given up because the
    // container moved without it: the client gets what was already piped, then a clean end of
    // stream. Reset by the upstream (an error: a restored copy's kernel that has no such
    // connection): the client is reset too, so it cannot take the broken stream for a whole one.
    upstream.once('close', (hadError) => {
      if (client.destroyed) return;
      if (hadError) {
        client.resetAndDestroy();
        return;
      }
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
