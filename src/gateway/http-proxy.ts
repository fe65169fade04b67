/**
 * An HTTP route: an HTTP/1.1 reverse proxy on the route's port, towards the container's current
 * upstream through an UpstreamPool (keep-alive, bounded connections, client connections served
 * in turn; upstream-pool.ts). Bodies stream both ways with backpressure; only request bodies up to `replayableBodyBytes` are read whole first, so that
 * they can be sent again (docs/gateway.md, "Which requests are sent again").
 *
 * A logged route (docs/gateway.md, "Request log") reads every body whole, appends the request
 * to the route's RequestLog when it is about to be forwarded and forwards it once that is on
 * disk. A logged request whose upstream is lost before it answers is parked: its client waits
 * for replay(), which sends the log after a checkpoint's position to the restored container
 * and gives each waiting client the answer to its own request (http-replay.ts).
 *
 * Client connections are served lean while their requests are plain, and by node's HTTP server
 * from their first request that is not (http-client-connection.ts): keep-alive, and pipelined
 * requests answered in order, either way.
 */
import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { type ChipmunkError, InvalidInputError, toChipmunkError } from '../shared/errors.js';
import { RouteGate, RouteRefusedError, UpstreamFailedError } from './gate.js';
import { ClientConnection, LeanRequest, type ClientAnswer, type ClientRequest } from './http-client-connection.js';
import { MovedAwayError, ProxiedExchange, mayResend, upstreamFailure, type AttemptListener, type FailedSend } from './http-exchange.js';
import { BodyTooLargeToLogError, NO_BODY, hasNoBody, readBody, readLoggedBody, upstreamHeadText, upstreamHeaders } from './http-messages.js';
import { LogReplayer } from './http-replay.js';
import type { LogPosition, ReplayResult, Route, Upstream } from './protocol.js';
import { listenForRoute, type ProxySettings, type RouteProxy } from './proxy.js';
import type { RequestLog } from './request-log.js';
import { sameUpstream } from './routes.js';
import { UpstreamPool } from './upstream-pool.js';

export interface HttpProxySettings extends ProxySettings {
  /** Request bodies up to this size are read whole before they are sent, so they can be sent again. */
  replayableBodyBytes: number;
  /** Connections to one upstream; a released queue of thousands must not open thousands at once. */
  upstreamConnections: number;
  /** See UpstreamPoolSettings.stallMs. */
  upstreamStallMs: number;
  /** Logged routes: larger request bodies are refused (413 body-too-large-to-log). */
  maxLoggedBodyBytes: number;
  /** Logged routes: how long a request whose upstream was lost waits for a replay (then 503 upstream-lost). */
  maxReplayWaitMs: number;
  /** The route's request log, if it is logged. */
  requestLog?: RequestLog;
}

/** How long close() lets answers in progress finish before it cuts the connections. */
const CLOSE_GRACE_MS = 1_000;

export class HttpRouteProxy implements RouteProxy, AttemptListener {
  private readonly gate: RouteGate;
  private readonly server: Server;
  /** Client connections still served lean (node's server keeps track of the others). */
  private readonly leanConnections = new Set<ClientConnection>();
  private upstream?: UpstreamPool;
  /**
   * Pools replaced by a release to the same upstream (retire()), still finishing what they
   * carry: a failover gives them up with the current one (abandonUpstream).
   */
  private readonly retired = new Set<UpstreamPool>();
  /** Requests sent to the upstream and not yet answered. */
  private inFlight = 0;
  /**
   * The current hold found nothing in flight before the container froze: whatever is still
   * at the old location when the container moves was sent to a frozen container, which never
   * read it (its connections come back closed), so it is safe to send again.
   */
  private drainedBeforeMove = false;
  private readonly idleWaiters: Array<() => void> = [];
  private requestLog?: RequestLog;
  /** Logged requests by seq whose clients still wait for an answer (in flight, retrying or parked). */
  private readonly unanswered = new Map<number, ProxiedExchange>();
  private parkedCount = 0;
  private readonly replayer: LogReplayer;

  private constructor(
    route: Route,
    private readonly settings: HttpProxySettings,
  ) {
    this.gate = new RouteGate(route, settings.limits, settings.metrics.held);
    this.requestLog = settings.requestLog;
    this.followUpstream(route, false);
    this.replayer = new LogReplayer({
      route: () => this.gate.route,
      requestLog: () => this.requestLog,
      unanswered: this.unanswered,
      abandonUpstream: () => this.abandonUpstream(),
      metrics: settings.metrics,
      log: settings.log,
      stallMs: settings.upstreamStallMs,
    });
    this.server = createServer({ noDelay: true }, (req, res) => void this.forward(req, res));
    // The server's own 'connection' listener is its HTTP machinery: a connection gets it only
    // once a request needs it (see http-client-connection.ts).
    const [nodeConnection, ...others] = this.server.listeners('connection') as Array<(socket: Socket) => void>;
    if (typeof nodeConnection !== 'function' || others.length > 0) throw new Error("node's HTTP server no longer has exactly one 'connection' listener: http-client-connection.ts needs revisiting for this node version");
    this.server.removeListener('connection', nodeConnection);
    this.server.on('connection', (socket: Socket) => {
      const connection = new ClientConnection(
        socket,
        (req, res) => void this.forward(req, res),
        (handed) => {
          this.leanConnections.delete(connection);
          nodeConnection.call(this.server, handed);
        },
      );
      this.leanConnections.add(connection);
      socket.once('close', () => this.leanConnections.delete(connection));
    });
  }

  static async listen(route: Route, settings: HttpProxySettings): Promise<HttpRouteProxy> {
    const proxy = new HttpRouteProxy(route, settings);
    try {
      await listenForRoute(proxy.server, settings.host, route);
    } catch (err) {
      await proxy.upstream?.destroy(err as Error);
      throw err;
    }
    return proxy;
  }

  get held(): number {
    return this.gate.held;
  }

  /** Logged requests waiting for a replay to answer them. */
  get parked(): number {
    return this.parkedCount;
  }

  get replaying(): boolean {
    return this.replayer.running;
  }

  /** Starts or stops logging; a request keeps the log it started with. */
  useLog(requestLog: RequestLog | undefined): void {
    this.requestLog = requestLog;
  }

  /**
   * The cut at the start of a hold (after idle()): the log position every request up to which
   * was answered, none after it forwarded; or why there is no clean one.
   */
  cut(): { logPosition: LogPosition } | { uncleanCut: string } | undefined {
    const log = this.requestLog;
    if (!log) return undefined;
    if (log.failed) return { uncleanCut: `the request log cannot be written (${log.failed.message})` };
    if (this.inFlight > 0 || this.unanswered.size > 0) {
      return {
        uncleanCut: `${Math.max(this.inFlight, this.unanswered.size)} logged requests are still unanswered (${this.parkedCount} parked): the container may or may not have applied them`,
      };
    }
    return { logPosition: { logId: log.id, seq: log.lastSeq } };
  }

  update(route: Route): void {
    const released = this.gate.route.state === 'holding' && route.state !== 'holding';
    // The pool first: requests the gate releases below go to the new upstream.
    this.followUpstream(route, released);
    // Nothing may wait on an idle connection during the hold's drain: an upstream that serves
    // one connection at a time would serve that one and leave the requests in flight unread.
    if (route.state === 'holding' || route.generation !== this.gate.route.generation) this.upstream?.closeIdle();
    this.gate.update(route);
  }

  async close(reason: 'route-removed' | 'shutting-down'): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.gate.refuseAll(reason, reason === 'route-removed' ? `the route of container '${this.gate.route.name}' was removed` : 'the gateway is shutting down');
    this.server.closeIdleConnections();
    for (const connection of this.leanConnections) connection.closeWhenDone();
    await Promise.race([closed, sleep(CLOSE_GRACE_MS)]);
    this.server.closeAllConnections();
    for (const connection of this.leanConnections) connection.socket.destroy();
    await closed;
    await this.upstream?.destroy(new Error(`the gateway stopped proxying container '${this.gate.route.name}'`));
  }

  /**
   * A new upstream gets a new pool; the old one is destroyed with what it still carries. The
   * container moved: requests in progress at its old location will never be answered there (a
   * checkpointed container's connections vanish without even a reset). Destroying them now
   * fails them at once: those safe to resend go to the new location (the route changed since
   * they were sent, see RouteGate.retryDelay), the others get a 502, or a cut answer.
   *
   * A release to the same upstream (`released`) gets a new pool too: the hold may have covered
   * a dump and a restore in place (a migration rolled back), whose copy lost every connection
   * silently; a request written to one would be reset after it left, with no way to know
   * whether it was applied. The old pool is closed gently: a container that ran on (a
   * checkpoint) still answers what it carries.
   */
  private followUpstream(route: Route, released: boolean): void {
    if (sameUpstream(this.upstream?.upstream, route.upstream)) {
      if (!released || !this.upstream || !route.upstream) return;
      const kept = this.upstream;
      this.upstream = this.newPool(route.upstream);
      kept.retire();
      for (const pool of this.retired) if (pool.idle) this.retired.delete(pool);
      this.retired.add(kept);
      return;
    }
    const old = this.upstream;
    this.upstream = route.upstream ? this.newPool(route.upstream) : undefined;
    if (old) {
      const moved = route.upstream ? `to ${route.upstream.address}:${route.upstream.port}` : 'away';
      void old.destroy(new MovedAwayError(`the container moved ${moved}: given up at its old location`, this.drainedBeforeMove));
      this.drainedBeforeMove = false;
    }
  }

  private newPool(upstream: Upstream): UpstreamPool {
    return new UpstreamPool(upstream, { maxConnections: this.settings.upstreamConnections, stallMs: this.settings.upstreamStallMs });
  }

  /**
   * A failover's hold: the container's copy is lost, so nothing more may go to its address. With
   * a cluster address the restored copy answers at that same address, and a request still
   * queued or connecting there would reach it before (or beside) the replay, which sends it
   * again: applied twice.
   */
  connectionsLost(): void {
    this.abandonUpstream();
  }

  /**
   * Gives the current upstream up (the container is lost there and restored elsewhere), and the
   * pools retired before it: what is in progress there fails now, and logged requests park for
   * the replay (those not yet written wait at the hold and are claimed by it). The next route
   * update makes a pool again.
   */
  private abandonUpstream(): void {
    const lost = this.upstream;
    this.upstream = undefined;
    this.drainedBeforeMove = false;
    const name = this.gate.route.name;
    for (const pool of [...(lost ? [lost] : []), ...this.retired]) {
      void pool.destroy(new MovedAwayError(`container '${name}' is being restored elsewhere: given up at ${pool.upstream.address}:${pool.upstream.port}`, false));
    }
    this.retired.clear();
  }

  async idle(timeoutMs: number): Promise<void> {
    this.drainedBeforeMove = await new Promise<boolean>((resolve) => {
      if (this.inFlight === 0) return resolve(true);
      const timer = setTimeout(() => resolve(false), timeoutMs);
      this.idleWaiters.push(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }

  /**
   * A client's request. The hot path (no body, route open and not logged) sends it at once and
   * makes no promise: it is most requests, and a promise or an await per request shows in the
   * gateway's garbage collection. Everything else, and a hot-path attempt that failed, goes on
   * through exchange().
   */
  private forward(req: ClientRequest, res: ClientAnswer): void {
    const exchange = new ProxiedExchange(req, res);
    const upstream = this.upstream;
    const route = this.requestLog === undefined && upstream !== undefined && req.url?.[0] === '/' && hasNoBody(req) ? this.gate.openRoute() : undefined;
    if (route === undefined || upstream === undefined) return void this.forwardSlowly(exchange);
    exchange.route = route;
    this.inFlight++;
    try {
      exchange.start(upstream, req instanceof LeanRequest ? upstreamHeadText(req) : upstreamHeaders(req), null, this);
    } catch (err) {
      // Unexpected: failed as an attempt that failed, so its end is told once.
      exchange.onError(err as Error);
    }
  }

  /** A hot-path attempt is over (AttemptListener): answered, or what failed goes through exchange(). */
  attemptOver(exchange: ProxiedExchange, failure: FailedSend | undefined): void {
    this.attemptEnded();
    if (!failure || exchange.clientGone) return this.counted(exchange);
    // Judged in a microtask, as after an await of the attempt: a failure told while update()
    // switches pools is judged once the gate has the new route.
    queueMicrotask(() => void this.forwardSlowly(exchange, { route: exchange.route as Route, failure }));
  }

  private async forwardSlowly(exchange: ProxiedExchange, first?: { route: Route; failure: FailedSend }): Promise<void> {
    try {
      await this.exchange(exchange, first);
    } catch (err) {
      if (!exchange.clientGone) this.answerError(exchange.res, toChipmunkError(err));
    } finally {
      if (exchange.seq !== undefined) this.unanswered.delete(exchange.seq);
    }
    this.counted(exchange);
  }

  private counted({ clientGone, res }: ProxiedExchange): void {
    this.settings.metrics.request(clientGone && !res.headersSent ? 0 : res.statusCode);
  }

  private attemptEnded(): void {
    if (--this.inFlight === 0 && this.idleWaiters.length > 0) for (const wake of this.idleWaiters.splice(0)) wake();
  }

  /**
   * Sends the request until it is answered, or throws the error to answer with. `first`: its
   * first attempt, on the hot path, failed so (it had no body and no log).
   */
  private async exchange(exchange: ProxiedExchange, first?: { route: Route; failure: FailedSend }): Promise<void> {
    const { req } = exchange;
    if (req.url?.[0] !== '/') throw new InvalidInputError('the gateway only proxies origin-form request targets (a path starting with /)');
    // A request keeps the log it started with.
    const requestLog = first ? undefined : this.requestLog;
    // Read before the hold queue, so that held requests leave in the order they came (the
    // queue's byte bound keeps what it holds in memory in check). A logged body is read whole:
    // the log keeps it.
    // Only node's server reads requests with a body (a lean request never has one).
    const body = hasNoBody(req)
      ? NO_BODY
      : requestLog
        ? await readLoggedBody(req as IncomingMessage, this.gate.route.name, this.settings.maxLoggedBodyBytes)
        : await readBody(req as IncomingMessage, this.settings.replayableBodyBytes);
    const headers = upstreamHeaders(req);
    for (let attempts = 0; ; attempts++) {
      let route: Route;
      let failure: FailedSend | undefined;
      if (attempts === 0 && first) ({ route, failure } = first);
      else {
        route = this.gate.openRoute() ?? (await this.gate.pass(this.gate.route.state === 'holding' ? exchange.waitSignal() : undefined, body.bytesInMemory));
        if (exchange.claimed) return this.park(exchange);
        this.inFlight++;
        try {
          // Logged when it is about to be forwarded, not while it was held: so a request is
          // either in the log before a cut, or forwarded after it, never replayed and sent live.
          if (requestLog && exchange.seq === undefined) await this.logRequest(requestLog, exchange, headers, body.payload as Buffer | null);
          // A replay may have taken the request over meanwhile, or given the upstream up.
          if (exchange.claimed) failure = undefined;
          else if (this.upstream) failure = await exchange.send(this.upstream, headers, body.payload);
          else failure = { error: new Error(`container '${route.name}' is being restored elsewhere`), written: false };
        } finally {
          this.attemptEnded();
        }
        if (exchange.claimed) return this.park(exchange);
        if (!failure || exchange.clientGone) return;
      }
      // Sent again only if that cannot do harm: the body is at hand, and mayResend.
      const resendable = body.replayable && mayResend(req.method, failure);
      const delay = this.gate.retryDelay({ route, resendable, connectFailed: !failure.written, attempts });
      if (delay === undefined) {
        // A logged request may or may not have reached the container: not a 502, its answer
        // comes from the replay once the container is restored from a checkpoint.
        if (exchange.seq !== undefined) return this.park(exchange, route, failure);
        throw upstreamFailure(route, failure);
      }
      this.settings.metrics.retry();
      this.settings.log.debug({ route: route.name, method: req.method, url: req.url, err: failure.error.message, delay }, 'sending again after the upstream failed');
      if (delay > 0) await sleep(delay);
      if (exchange.clientGone) return;
    }
  }

  private async logRequest(requestLog: RequestLog, exchange: ProxiedExchange, headers: string[], body: Buffer | null): Promise<void> {
    const { req } = exchange;
    let seq: number;
    try {
      seq = await requestLog.append({ method: req.method as string, url: req.url as string, headers, body });
    } catch (err) {
      throw new RouteRefusedError('log-failed', `the request log of container '${this.gate.route.name}' cannot be written, so the request was not forwarded (${(err as Error).message})`, {
        route: this.gate.route.name,
      });
    }
    exchange.seq = seq;
    if (!exchange.clientGone) this.unanswered.set(seq, exchange);
  }

  /** Waits, bounded by maxReplayWaitMs, for a replay to answer a logged request whose upstream was lost. */
  private async park(exchange: ProxiedExchange, route?: Route, failure?: FailedSend): Promise<void> {
    if (failure && route) {
      this.settings.log.warn(
        { route: route.name, seq: exchange.seq, upstream: route.upstream, err: failure.error.message },
        'upstream lost before answering a logged request: it waits for the replay',
      );
    }
    this.settings.metrics.parked(++this.parkedCount);
    try {
      await exchange.awaitReplay(this.settings.maxReplayWaitMs, () => {
        const name = this.gate.route.name;
        return new RouteRefusedError(
          'upstream-lost',
          `container '${name}' stopped answering and was not restored within ${this.settings.maxReplayWaitMs} ms: request ${exchange.seq} is in its log and may or may not have been applied`,
          { route: name, seq: exchange.seq },
        );
      });
    } finally {
      this.settings.metrics.parked(--this.parkedCount);
    }
  }

  /** See LogReplayer.replay. */
  replay(after: LogPosition, upstream: Upstream, resumable: boolean): Promise<ReplayResult> {
    return this.replayer.replay(after, upstream, resumable);
  }

  private answerError(res: ClientAnswer, err: ChipmunkError): void {
    if (res.headersSent) {
      res.destroy();
      return;
    }
    const reason = err instanceof RouteRefusedError || err instanceof UpstreamFailedError || err instanceof BodyTooLargeToLogError ? err.reason : undefined;
    if (err instanceof UpstreamFailedError) this.settings.log.warn({ route: this.gate.route.name, err: err.toJSON() }, err.message);
    const text = JSON.stringify(err.toJSON());
    res.writeHead(err.status, {
      'content-type': 'application/json; charset=utf-8',
      'content-length': Buffer.byteLength(text),
      ...(reason ? { 'x-chipmunk-reason': reason } : {}),
      ...(err instanceof RouteRefusedError ? { 'retry-after': '1' } : {}),
    });
    res.end(text);
  }
}
