/**
 * Exposed services: which container the gateway fronts, on which port, in which protocol.
 * The controller owns the table (store keys /routes/NAME) and pushes it to the gateway: the
 * whole table after every change and periodically (so a restarted gateway is current within
 * one period), and hold/release around each migration of an exposed container.
 *
 * Every route pushed carries the owner, this store's identity: a sync removes only routes of
 * this owner that the store no longer has, so the routes (and request logs) of another
 * controller, or of an older one that set no owner, are never touched; they are reported.
 *
 * Holds end only by a release. The sync settles holds left behind (their operation ended
 * without releasing, e.g. a controller died): it releases them, unless the container is locked
 * (its operation, or a failover whose replay is still owed, keeps the lock: failover.ts).
 */
import type { Logger } from 'pino';
import { ConflictError, InvalidInputError, NotFoundError, UnavailableError, toChipmunkError } from '../shared/errors.js';
import type { StateStore } from './store/index.js';
import { GatewayClient, type LogPosition, type RouteView, type SyncedRoute, type Upstream } from '../gateway/index.js';
import type { ExposeRequest, ExposedRoute } from '../shared/protocol.js';
import { containerKey, type ContainerRecord } from './container-lock.js';

const routeKey = (name: string) => `/routes/${name}`;
const SYNC_PERIOD_MS = 5_000;

/** A protected container's HTTP route logs every request: a failover replays them. */
function logs(route: ExposedRoute, container: ContainerRecord): boolean {
  return route.protocol === 'http' && container.protection !== undefined;
}

export class RouteService {
  private readonly gateway?: GatewayClient;
  private timer?: NodeJS.Timeout;
  private queue: Promise<unknown> = Promise.resolve();
  /** Where clients reach the gateway's route listeners, for `ps`. */
  private readonly gatewayHost?: string;
  /** This store's identity: the owner of every route this controller pushes. */
  private readonly owner: string;
  /** Routes of other owners already reported, so the log says it once per change. */
  private reportedForeign = '';

  constructor(
    private readonly store: StateStore,
    private readonly nodeAddress: (node: string) => Promise<string | undefined>,
    private readonly log: Logger,
    gateway?: { url: string; token: string; publicHost?: string; owner: string; term?: () => number | undefined },
    /** Whether a node is alive: a leftover hold is released only towards a live node. */
    private readonly nodeReady: (node: string) => Promise<boolean> = async () => true,
    /**
     * Whether a container's cluster address is routed to `node` (address-routes.ts), waiting for
     * it a bounded time; absent when the controller routes no addresses.
     */
    private readonly addressRouted?: (address: string, node: string) => Promise<boolean>,
  ) {
    if (gateway) this.gateway = new GatewayClient({ url: gateway.url, token: gateway.token, term: gateway.term });
    this.gatewayHost = gateway?.publicHost;
    this.owner = gateway?.owner ?? '';
  }

  /** Starts the periodic push; a gateway that restarted gets the table back. */
  start(): void {
    if (!this.gateway) return;
    void this.sync();
    this.timer = setInterval(() => void this.sync(), SYNC_PERIOD_MS);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  async expose(name: string, req: ExposeRequest): Promise<ExposedRoute> {
    if (!this.gateway) throw new InvalidInputError('this controller has no gateway: start it with --gateway URL (the local cluster has one)');
    const container = await this.store.get<ContainerRecord>(containerKey(name));
    if (!container) throw new NotFoundError(`no container named '${name}': 'chipmunk ps' lists them`, { name });
    const route: ExposedRoute = { name, containerPort: req.port, listenPort: req.listen ?? req.port, protocol: req.protocol ?? 'http' };
    for (const other of await this.list()) {
      if (other.name !== name && other.listenPort === route.listenPort) {
        throw new ConflictError(`gateway port ${route.listenPort} already serves '${other.name}': pick another with --listen`, { port: route.listenPort });
      }
    }
    const upstream = await this.upstreamOf(container.value, route);
    // The gateway opens the listener first: a port taken on its host fails here, nothing stored.
    await this.gateway.putRoute(name, { protocol: route.protocol, listenPort: route.listenPort, log: logs(route, container.value), owner: this.owner, ...(upstream ? { upstream } : {}) });
    await this.store.put(routeKey(name), route);
    return route;
  }

  async unexpose(name: string): Promise<void> {
    const existing = await this.store.get(routeKey(name));
    if (!existing) throw new NotFoundError(`container '${name}' is not exposed`, { name });
    await this.store.delete(routeKey(name));
    // The only place a route's request log is deleted: an explicit unexpose by its owner.
    await this.gateway?.removeRoute(name, this.owner).catch((err: unknown) => this.warn(`removing route ${name} from the gateway failed`, err));
  }

  async get(name: string): Promise<ExposedRoute | undefined> {
    return (await this.store.get<ExposedRoute>(routeKey(name)))?.value;
  }

  async list(): Promise<ExposedRoute[]> {
    return (await this.store.list<ExposedRoute>('/routes/')).map((kv) => kv.value);
  }

  /** Before the container freezes: new requests wait at the gateway. A gateway that does not answer fails the migration before anything froze. */
  async hold(name: string, migrationId: string): Promise<void> {
    if (!this.gateway || !(await this.get(name))) return;
    const gateway = this.gateway;
    // Without the hold, requests would reach the frozen container (a logged one could then be
    // neither answered nor replayed): the migration does not freeze it, and nothing changes.
    await this.serial(() => gateway.hold(name, migrationId)).catch((err: unknown) => {
      throw new UnavailableError(`the gateway did not hold ${name}'s traffic (${toChipmunkError(err).message}): it was not frozen; migrate again once the gateway answers`, { name });
    });
  }

  /**
   * The cut of a checkpoint: on a logging route, holds it and returns the log position the
   * container has answered up to. A route that is not (yet) logging, or a gateway that cannot
   * give a clean cut, fails the checkpoint rather than store one without its position.
   */
  async cut(name: string, holdId: string): Promise<{ held: boolean; logPosition: LogPosition | null }> {
    const route = await this.get(name);
    const container = (await this.store.get<ContainerRecord>(containerKey(name)))?.value;
    if (!this.gateway || !route || !container || !logs(route, container)) return { held: false, logPosition: null };
    const gateway = this.gateway;
    const held = await this.serial(() => gateway.hold(name, holdId));
    if (held.logPosition === undefined) {
      if (held.upstream) await this.serial(() => gateway.release(name, holdId, held.upstream!)).catch((err: unknown) => this.warn(`gateway release of ${name} failed`, err));
      throw new UnavailableError(`no clean cut of ${name}'s request log (${held.uncleanCut ?? 'the route does not log yet'}): the checkpoint was not taken; the previous one stays valid`, { name });
    }
    return { held: true, logPosition: held.logPosition };
  }

  /**
   * A failover: hold at once (nothing will come back from the dead node), taking over the hold
   * of the operation whose lock it took (a checkpoint's cut, a migration). The route stays held
   * until released, however long the restore and replay take. The container's open connections
   * died with its copy: a TCP route resets them now, never leaving them silent.
   */
  async holdNow(name: string, holdId: string): Promise<boolean> {
    if (!this.gateway || !(await this.get(name))) return false;
    const gateway = this.gateway;
    try {
      await this.serial(() => gateway.hold(name, holdId, { drain: false, takeOver: true, connectionsLost: true }));
      return true;
    } catch (err) {
      this.warn(`gateway hold of ${name} for its failover failed; its clients may see errors`, err);
      return false;
    }
  }

  /** After the move (or the rollback): held and new requests go to where the container runs now. */
  async release(name: string, migrationId: string, container: ContainerRecord): Promise<void> {
    const route = await this.get(name);
    if (!this.gateway || !route) return;
    const upstream = await this.upstreamOf(container, route);
    if (!upstream) return;
    const gateway = this.gateway;
    await this.serial(() => gateway.release(name, migrationId, upstream)).catch((err: unknown) => this.warn(`gateway release of ${name} failed`, err));
  }

  async trimLog(name: string, upTo: LogPosition): Promise<void> {
    if (!this.gateway || !(await this.get(name))) return;
    await this.gateway.trimLog(name, upTo);
  }

  /** Replays the logged requests after `after` into the container where it runs now (the route is held). */
  async replay(name: string, after: LogPosition, container: ContainerRecord): Promise<{ replayed: number; delivered: number }> {
    const route = await this.get(name);
    if (!this.gateway || !route) return { replayed: 0, delivered: 0 };
    const upstream = await this.upstreamOf(container, route);
    if (!upstream) throw new UnavailableError(`cannot replay into ${name}: it has no address the gateway can reach`, { name });
    const result = await this.gateway.replay(name, after, upstream);
    return { replayed: result.replayed, delivered: result.delivered };
  }

  /** The id of the container's current request log at the gateway; undefined if its route does not log (or no gateway). */
  async currentLogId(name: string): Promise<string | undefined> {
    if (!this.gateway || !(await this.get(name))) return undefined;
    return (await this.gateway.getRoute(name)).requestLog?.logId;
  }

  /** Pushes the table now: a protection change turns the route's request log on or off. */
  refresh(_name: string): Promise<void> {
    return this.sync();
  }

  /** "GATEWAY:PORT->CTRPORT/proto" by container, for `ps`. */
  async endpointsByContainer(): Promise<Map<string, string[]>> {
    const out = new Map<string, string[]>();
    const host = this.gatewayHost ?? 'gateway';
    for (const r of await this.list()) out.set(r.name, [...(out.get(r.name) ?? []), `${host}:${r.listenPort}->${r.containerPort}/${r.protocol}`]);
    return out;
  }

  /**
   * Pushes this owner's whole table. A route whose container is migrating (or locked by another
   * operation) is resent exactly as the gateway has it (upstream and hold): during a move only the
   * operation's own hold and release say where traffic goes; the store still names the source
   * until the move is recorded. Then holds left behind are settled, and routes of other owners
   * reported. Serialized with hold and release, so a sync never lands between them with older data.
   */
  private sync(): Promise<void> {
    return this.serial(async () => {
      if (!this.gateway) return;
      try {
        // Read before the routes: a route created after it is not removed even if missed below.
        const revision = await this.store.currentRevision();
        const live = new Map((await this.gateway.listRoutes()).map((route) => [route.name, route]));
        const routes: SyncedRoute[] = [];
        const stale: Array<{ name: string; holdId: string; upstream: Upstream }> = [];
        for (const { value: r, createRevision: storeRevision } of await this.store.list<ExposedRoute>('/routes/')) {
          const container = await this.store.get<ContainerRecord>(containerKey(r.name));
          const current = live.get(r.name);
          // Without the flag the gateway stops logging and deletes the log: always state it.
          const log = container ? logs(r, container.value) : false;
          const holdId = current?.state === 'holding' ? current.migration?.id : undefined;
          if (current && container?.value.lock) {
            routes.push({ name: r.name, protocol: r.protocol, listenPort: r.listenPort, log, storeRevision, ...(current.upstream ? { upstream: current.upstream } : {}), ...(holdId ? { hold: { migrationId: holdId } } : {}) });
            continue;
          }
          const upstream = container ? await this.upstreamOf(container.value, r) : undefined;
          routes.push({ name: r.name, protocol: r.protocol, listenPort: r.listenPort, log, storeRevision, ...(upstream ? { upstream } : {}) });
          // Towards a dead node it stays held: its failover will restore the container elsewhere.
          const settle = holdId && upstream && container && current?.owner === this.owner && (await this.nodeReady(container.value.node));
          if (settle) stale.push({ name: r.name, holdId, upstream });
        }
        const synced = await this.gateway.sync(this.owner, routes, revision);
        for (const { name, holdId, upstream } of stale) {
          this.log.warn({ container: name, holdId, upstream }, `the gateway still held ${name} for ${holdId}, which no longer runs: releasing it to where the container runs`);
          await this.gateway.release(name, holdId, upstream).catch((err: unknown) => this.warn(`releasing the leftover hold ${holdId} of ${name} failed; the next sync tries again`, err));
        }
        this.reportForeign(synced, new Set(routes.map((r) => r.name)));
      } catch (err) {
        this.warn('pushing the route table to the gateway failed; will retry', err);
      }
    });
  }

  /**
   * Routes at the gateway this controller left alone, said once: other owners' (or none), and
   * its own that its store does not have but did not see created (the store is older than them).
   */
  private reportForeign(routes: RouteView[], listed: Set<string>): void {
    const foreign = routes
      .filter((r) => r.owner !== this.owner || !listed.has(r.name))
      .map((r) => `${r.name} (${r.owner === this.owner ? `this owner's, created at store revision ${r.storeRevision ?? '?'}, which this store has not reached` : r.owner ? `owner ${r.owner}` : 'no owner'})`);
    const summary = foreign.join(', ');
    if (summary === this.reportedForeign) return;
    this.reportedForeign = summary;
    if (foreign.length) this.log.warn({ routes: foreign, owner: this.owner }, `the gateway has routes this controller does not own, left alone: ${summary}`);
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.queue.then(fn, fn);
    this.queue = next.catch(() => undefined);
    return next;
  }

  /**
   * Where the gateway reaches the container: at its cluster address, once that is routed to its
   * node: the upstream then stays the same across moves, so the gateway's open TCP connections
   * stay open (the container keeps them too). Else its node's address and the host port it
   * publishes for the exposed port (reachable from anywhere the node is), else its node-local
   * address, which needs a route to the node's container subnet.
   */
  private async upstreamOf(container: ContainerRecord, route: ExposedRoute): Promise<Upstream | undefined> {
    const kept = container.spec.address;
    if (kept && this.addressRouted && (await this.addressRouted(kept, container.node))) return { address: kept, port: route.containerPort };
    const published = container.spec.ports.find((p) => p.containerPort === route.containerPort && p.protocol === 'tcp');
    if (published) {
      const address = await this.nodeAddress(container.node);
      if (address) return { address, port: published.hostPort };
    }
    return container.ip ? { address: container.ip, port: route.containerPort } : undefined;
  }

  private warn(message: string, err: unknown): void {
    this.log.warn({ err: toChipmunkError(err).toJSON() }, message);
  }
}
