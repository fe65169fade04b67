/**
 * The gateway's state machine: the route table (routes.ts), one proxy per route, the timers that
 * turn away requests of holds not released in time (the hold itself stays until released), and
 * the state file. The API (server.ts) calls it.
 *
 * Changes are applied one at a time. Each goes to the proxies first and to the state file right
 * after (before the API answers): traffic follows a hold or release at once, and a failed write
 * is reported as such (StoreFailedError) with the change already live.
 */
import { join } from 'node:path';
import type { Logger } from 'pino';
import { ConflictError, InvalidInputError } from '../shared/errors.js';
import type { HoldLimits } from './gate.js';
import { HttpRouteProxy } from './http-proxy.js';
import type { GatewayMetrics } from './metrics.js';
import type { HoldRequest, HoldResponse, LogPosition, ReleaseRequest, ReplayRequest, ReplayResult, Route, RouteSpec, RouteView, SyncedRoute } from './protocol.js';
import type { RouteProxy } from './proxy.js';
import { requireSameLog } from './log-identity.js';
import { RequestLog } from './request-log.js';
import { RouteStateFile, RouteTable, sameUpstream } from './routes.js';
import { TcpRouteProxy } from './tcp-proxy.js';

export interface GatewaySettings {
  /** Address route listeners bind. */
  routeHost: string;
  limits: HoldLimits;
  replayableBodyBytes: number;
  upstreamConnections: number;
  upstreamStallMs: number;
  /** Logged routes keep their request logs in `<logDir>/<route>/`. */
  logDir: string;
  maxLoggedBodyBytes: number;
  maxReplayWaitMs: number;
  stateFile: RouteStateFile;
  metrics: GatewayMetrics;
  log: Logger;
}

/** Longest wait, at the start of a hold, for requests already on their way to the container. */
const HOLD_DRAIN_MS = 5_000;

export class Gateway {
  private readonly proxies = new Map<string, RouteProxy>();
  /** Routes left without a listener, and why (port taken when the gateway started, or when a protocol change rebound it). */
  private readonly listenErrors = new Map<string, string>();
  private readonly holdTimers = new Map<string, NodeJS.Timeout>();
  /** The open request log of every logged route. */
  private readonly requestLogs = new Map<string, RequestLog>();
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;

  private constructor(
    private readonly table: RouteTable,
    private readonly settings: GatewaySettings,
  ) {}

  /** Loads the saved table and starts a listener per route; a route whose port is taken is kept, with its listenError. */
  static async open(settings: GatewaySettings): Promise<Gateway> {
    const gateway = new Gateway(new RouteTable(await settings.stateFile.load()), settings);
    for (const route of gateway.table.list()) {
      try {
        gateway.proxies.set(route.name, await gateway.startProxy(route));
      } catch (err) {
        gateway.listenErrors.set(route.name, (err as Error).message);
        settings.log.error({ route: route.name, err: (err as Error).message }, 'route listener not started');
      }
      if (route.state === 'holding') gateway.armHoldTimer(route);
    }
    return gateway;
  }

  list(): RouteView[] {
    return this.table.list().map((route) => this.view(route));
  }

  get(name: string): RouteView {
    return this.view(this.table.get(name));
  }

  /** Creates or changes a route. A port change binds the new port before the old one is let go. */
  put(name: string, spec: RouteSpec): Promise<RouteView> {
    return this.serialized(async () => {
      await this.applySpec(name, spec);
      await this.save();
      return this.get(name);
    });
  }

  /** Removes the route and deletes its request log; refused unless `owner` is the route's owner (or it has none). */
  remove(name: string, owner: string | undefined): Promise<void> {
    return this.serialized(async () => {
      this.table.checkOwner(this.table.get(name), owner, 'remove');
      await this.drop(name);
      await this.save();
    });
  }

  /**
   * Holds new traffic for `migrationId` until release(); requests that wait longer than the
   * hold's timeout get 503 hold-timeout, but the route stays held. On a logged route the answer
   * carries the cut: the log position a checkpoint taken now is at.
   */
  hold(name: string, request: HoldRequest): Promise<HoldResponse> {
    return this.serialized(async () => {
      this.applyHold(name, request, request.takeOver === true);
      await this.save();
      const lost = this.proxies.get(name);
      if (request.connectionsLost && lost instanceof TcpRouteProxy) lost.resetLost();
      if (request.connectionsLost && lost instanceof HttpRouteProxy) lost.connectionsLost();
      // Answers only once requests already sent have been answered (bounded): the controller
      // freezes the container right after, and a request it applied must not lose its answer.
      // One turn of the event loop first: a request let through just before the hold may
      // still be between the gate and the upstream, not yet counted as in flight.
      await new Promise((resolve) => setImmediate(resolve));
      const proxy = this.proxies.get(name);
      if (request.drain !== false) await proxy?.idle(HOLD_DRAIN_MS);
      const cut = proxy instanceof HttpRouteProxy ? proxy.cut() : undefined;
      return { ...this.get(name), ...cut };
    });
  }

  /**
   * Sends a held, logged route's records after `request.after` to the restored container (see
   * HttpRouteProxy.replay). Not queued with the other changes: it may take a while, and the
   * periodic sync must go on meanwhile; release() is refused until it ends. Sent again under the
   * same hold (same position and upstream), it goes on after the last record answered.
   */
  async replay(name: string, request: ReplayRequest): Promise<ReplayResult> {
    const proxy = this.loggedProxy(name);
    // The start is saved with the hold: a replay sent again after a gateway restart must not
    // apply from the start what the restored container may have applied already.
    const fresh = await this.serialized(async () => {
      const route = this.table.get(name);
      const started = route.migration?.replay;
      const same = started && started.after.logId === request.after.logId && started.after.seq === request.after.seq && sameUpstream(started.upstream, request.upstream);
      if (same || route.state !== 'holding' || !route.migration) return !same;
      this.commit({ ...route, generation: route.generation + 1, migration: { ...route.migration, replay: { after: request.after, upstream: request.upstream } } });
      await this.save();
      return true;
    });
    return proxy.replay(request.after, request.upstream, fresh);
  }

  /** Drops the log records up to `upTo`: a checkpoint at that position is committed. */
  async trimLog(name: string, upTo: LogPosition): Promise<RouteView> {
    this.loggedProxy(name);
    const requestLog = this.requestLogs.get(name);
    if (requestLog) {
      requireSameLog(name, requestLog.id, upTo, 'trim');
      await requestLog.trim(upTo.seq);
    }
    return this.get(name);
  }

  /** Sends held and new traffic to `upstream`, the container's new location (or its old one after a failed migration). */
  release(name: string, request: ReleaseRequest): Promise<RouteView> {
    return this.serialized(async () => {
      const proxy = this.proxies.get(name);
      if (proxy instanceof HttpRouteProxy && proxy.replaying) {
        throw new ConflictError(`container '${name}''s request log is being replayed: release the route once the replay has answered`, { name });
      }
      const now = Date.now();
      const route = this.table.withRelease(name, request.migrationId, request.upstream, now);
      this.commit(route);
      await this.save();
      return this.get(name);
    });
  }

  /**
   * Makes `owner`'s routes exactly `routes` (the controller resends everything after a restart
   * of either side); routes of other owners, or of none, are left alone, and so are the owner's
   * routes created after store revision `revision` (the store is older than they are). Every
   * route that can be applied is; the ones that cannot (port taken, another owner's) keep their
   * previous state and are named in the ConflictError thrown at the end. A sync never ends a hold.
   */
  sync(owner: string, routes: SyncedRoute[], revision?: number): Promise<RouteView[]> {
    return this.serialized(async () => {
      const wanted = new Map(routes.map((r) => [r.name, r]));
      if (wanted.size !== routes.length) throw new InvalidInputError('a route name appears twice in the sync: list each container once', { names: routes.map((r) => r.name) });
      for (const route of this.table.list()) {
        // A route its owner's store has not seen created (an older copy of the store) stays.
        const seen = revision === undefined || (route.storeRevision !== undefined && route.storeRevision <= revision);
        if (route.owner === owner && !wanted.has(route.name) && seen) await this.drop(route.name);
      }
      const failed: Record<string, string> = {};
      for (const synced of routes) {
        try {
          await this.applySpec(synced.name, { ...synced, owner });
          this.applySyncedHold(synced);
        } catch (err) {
          failed[synced.name] = (err as Error).message;
        }
      }
      await this.save();
      if (Object.keys(failed).length) {
        throw new ConflictError(`the sync could not apply ${Object.keys(failed).join(', ')}: ${Object.values(failed).join('; ')}`, { failed });
      }
      return this.list();
    });
  }

  /** Stops every listener; held traffic gets 503 shutting-down. The state file keeps the routes. */
  async close(): Promise<void> {
    await this.serialized(async () => {
      this.closed = true;
      for (const timer of this.holdTimers.values()) clearTimeout(timer);
      this.holdTimers.clear();
      await Promise.all([...this.proxies.values()].map((proxy) => proxy.close('shutting-down')));
      this.proxies.clear();
      await Promise.all([...this.requestLogs.values()].map((log) => log.close()));
      this.requestLogs.clear();
    });
  }

  private async drop(name: string): Promise<void> {
    this.table.delete(name);
    this.clearHoldTimer(name);
    this.listenErrors.delete(name);
    const proxy = this.proxies.get(name);
    this.proxies.delete(name);
    await proxy?.close('route-removed');
    await this.dropRequestLog(name);
    this.settings.log.info({ route: name }, 'route removed');
  }

  private async applySpec(name: string, spec: RouteSpec): Promise<void> {
    const previous = this.table.find(name);
    const route = this.table.withSpec(name, spec);
    const proxy = this.proxies.get(name);
    const requestLog = await this.requestLogOf(route);
    if (previous && proxy && route.protocol === previous.protocol && route.listenPort === previous.listenPort) {
      if (proxy instanceof HttpRouteProxy) proxy.useLog(requestLog);
      if (route !== previous) this.commit(route);
      if (!route.log) await this.dropRequestLog(name);
      return;
    }
    // A new listener: for a new route, a route whose listener failed before, or a new port or protocol.
    let replaced = proxy;
    if (replaced && route.listenPort === previous?.listenPort) {
      // Same port, other protocol: the old listener must go first.
      await replaced.close('route-removed');
      this.proxies.delete(name);
      replaced = undefined;
    }
    let started: RouteProxy;
    try {
      started = await this.startProxy(route);
    } catch (err) {
      // A route left without any listener says why.
      if (previous && !this.proxies.has(name)) this.listenErrors.set(name, (err as Error).message);
      // A route that could not be created keeps no log.
      if (!previous) await this.dropRequestLog(name);
      throw err;
    }
    await replaced?.close('route-removed');
    this.proxies.set(name, started);
    this.listenErrors.delete(name);
    this.table.set(route);
    if (!route.log) await this.dropRequestLog(name);
    this.settings.log.info({ route: route.name, protocol: route.protocol, listenPort: route.listenPort, upstream: route.upstream }, 'route listening');
  }

  private applyHold(name: string, request: HoldRequest, replace = false): void {
    const now = Date.now();
    const timeoutMs = Math.min(request.timeoutMs ?? this.settings.limits.maxHoldMs, this.settings.limits.maxHoldMs);
    const route = this.table.withHold(name, request.migrationId, now + timeoutMs, now, replace);
    this.commit(route);
  }

  /**
   * A synced route with `hold` is held by that migration (the controller knows which one runs:
   * it takes over another's hold). Without it a held route stays held: only a release opens it,
   * so that no sync can send traffic to a copy that was not caught up yet.
   */
  private applySyncedHold(synced: SyncedRoute): void {
    if (synced.hold) this.applyHold(synced.name, synced.hold, true);
  }

  /** Records a changed route and applies it to its proxy and hold timer. */
  private commit(route: Route): void {
    const previous = this.table.get(route.name);
    if (route === previous) return;
    this.table.set(route);
    this.proxies.get(route.name)?.update(route);
    if (route.state === 'holding' && (previous.state !== 'holding' || previous.migration?.id !== route.migration?.id)) {
      this.armHoldTimer(route);
      this.settings.log.info({ route: route.name, migrationId: route.migration?.id, expiresAt: route.migration?.expiresAt }, 'route holding');
    } else if (previous.state === 'holding' && route.state === 'open') {
      this.clearHoldTimer(route.name);
      const migration = route.migration;
      if (migration?.outcome === 'released' && migration.endedAt !== undefined) {
        this.settings.metrics.holdEnded(route.name, migration.outcome, (migration.endedAt - migration.heldAt) / 1000);
      }
      this.settings.log.info({ route: route.name, migrationId: migration?.id, outcome: migration?.outcome, upstream: route.upstream }, 'route open');
    }
  }

  /** At the hold's time bound, its waiting requests are turned away; the route stays held. */
  private armHoldTimer(route: Route): void {
    this.clearHoldTimer(route.name);
    if (route.migration?.lapsedAt !== undefined) return;
    const delay = Math.max(0, (route.migration?.expiresAt ?? 0) - Date.now());
    const timer = setTimeout(() => {
      this.holdTimers.delete(route.name);
      void this.serialized(async () => {
        const current = this.table.find(route.name);
        if (this.closed || current?.state !== 'holding' || current.migration?.id !== route.migration?.id) return;
        this.settings.log.warn(
          { route: route.name, migrationId: route.migration?.id, held: this.proxies.get(route.name)?.held ?? 0 },
          "hold's time bound passed without a release: waiting requests get 503 hold-timeout; the route stays held until its release",
        );
        this.commit(this.table.withLapsedHold(route.name, Date.now()));
        await this.save();
      }).catch((err: unknown) => this.settings.log.error({ route: route.name, err: (err as Error).message }, 'turning away the requests of a lapsed hold failed'));
    }, delay);
    timer.unref();
    this.holdTimers.set(route.name, timer);
  }

  private clearHoldTimer(name: string): void {
    clearTimeout(this.holdTimers.get(name));
    this.holdTimers.delete(name);
  }

  private async startProxy(route: Route): Promise<RouteProxy> {
    const { routeHost: host, limits, log, metrics } = this.settings;
    const settings = { host, limits, log, metrics: metrics.forRoute(route.name) };
    if (route.protocol === 'tcp') return TcpRouteProxy.listen(route, settings);
    const { replayableBodyBytes, upstreamConnections, upstreamStallMs, maxLoggedBodyBytes, maxReplayWaitMs } = this.settings;
    const requestLog = await this.requestLogOf(route);
    return HttpRouteProxy.listen(route, { ...settings, replayableBodyBytes, upstreamConnections, upstreamStallMs, maxLoggedBodyBytes, maxReplayWaitMs, requestLog });
  }

  /** The route's request log, opened (and kept) on first use; none if the route is not logged. */
  private async requestLogOf(route: Route): Promise<RequestLog | undefined> {
    if (!route.log) return undefined;
    let requestLog = this.requestLogs.get(route.name);
    if (!requestLog) {
      const metrics = this.settings.metrics;
      requestLog = await RequestLog.open(join(this.settings.logDir, route.name), {
        onBatch: (records, seconds) => metrics.logBatch(route.name, records, seconds),
      });
      this.requestLogs.set(route.name, requestLog);
    }
    return requestLog;
  }

  /** A route no longer logged (or removed): its log no longer describes the container, it is deleted. */
  private async dropRequestLog(name: string): Promise<void> {
    const requestLog = this.requestLogs.get(name);
    if (!requestLog) return;
    this.requestLogs.delete(name);
    await requestLog.destroy();
    this.settings.log.info({ route: name, dir: requestLog.dir }, 'request log deleted');
  }

  private loggedProxy(name: string): HttpRouteProxy {
    const route = this.table.get(name);
    const proxy = this.proxies.get(name);
    if (!route.log || !(proxy instanceof HttpRouteProxy)) {
      throw new ConflictError(`the route of container '${name}' is not logged (PUT it with log: true, http only)${proxy ? '' : ', or has no listener'}`, { name });
    }
    return proxy;
  }

  private view(route: Route): RouteView {
    const listenError = this.listenErrors.get(route.name);
    const proxy = this.proxies.get(route.name);
    const requestLog = this.requestLogs.get(route.name);
    return {
      ...route,
      held: proxy?.held ?? 0,
      ...(listenError ? { listenError } : {}),
      ...(requestLog ? { requestLog: { ...requestLog.state(), parked: proxy instanceof HttpRouteProxy ? proxy.parked : 0 } } : {}),
    };
  }

  private save(): Promise<void> {
    return this.settings.stateFile.save(this.table.list());
  }

  /** Runs changes one after the other: listeners and the state file never see two at once. */
  private serialized<T>(change: () => Promise<T>): Promise<T> {
    const next = this.queue.then(change, change);
    this.queue = next.catch(() => undefined);
    return next;
  }
}

