/**
 * The gateway's API messages (docs/gateway.md, "API"), one TypeBox schema each: they validate
 * the requests in fastify, type the code (Static<>), and describe the state file.
 */
import { Type, type Static } from '@sinclair/typebox';
import { ContainerName, LogPosition } from '../shared/protocol.js';

export { LogPosition };

const Port = Type.Integer({ minimum: 1, maximum: 65535 });

export const RouteProtocol = Type.Union([Type.Literal('http'), Type.Literal('tcp')], {
  description: 'http: HTTP/1.1 reverse proxy, requests held and retried; tcp: connections piped, new ones held',
});
export type RouteProtocol = Static<typeof RouteProtocol>;

/** Where the container answers: its node's address and the published port. */
export const Upstream = Type.Object({
  address: Type.String({ minLength: 1, description: 'IP address or host name' }),
  port: Port,
});
export type Upstream = Static<typeof Upstream>;

/**
 * HTTP routes only (a TCP route with it is refused): every request is written to the route's
 * durable request log before it is forwarded, so it can be replayed to the container restored
 * from a checkpoint (docs/gateway.md, "Request log"). Off by default; turning it off deletes the log.
 */
const LogFlag = Type.Optional(Type.Boolean({ description: 'log every request durably before forwarding it (http routes only)' }));

/**
 * Who pushed the route: the identity of the controller's store (docs/gateway.md, "Owners"). A
 * sync removes only its own owner's routes; PUT and DELETE of a route another owner has are refused.
 */
export const RouteOwner = Type.String({ minLength: 1, maxLength: 128, description: "the pushing controller's store id" });

/**
 * The owner's store revision that created the route (its key's createRevision). A sync from a
 * store whose revision is below it (an older copy of the store) does not remove the route.
 */
const StoreRevision = Type.Optional(Type.Integer({ minimum: 1 }));


/** PUT /v1/routes/:name: what the controller states about one container's route. */
export const RouteSpec = Type.Object({
  protocol: RouteProtocol,
  /** Port the gateway listens on for this container's clients. */
  listenPort: Port,
  /** Absent while the container runs nowhere: requests get 503, connections are closed. */
  upstream: Type.Optional(Upstream),
  log: LogFlag,
  /** Required to change or remove a route that has an owner; a route without one is claimed by the first owner that puts it. */
  owner: Type.Optional(RouteOwner),
  storeRevision: StoreRevision,
});
export type RouteSpec = Static<typeof RouteSpec>;

/** POST /v1/routes/:name/hold: a migration begins; hold new traffic until it is released. */
export const HoldRequest = Type.Object({
  migrationId: Type.String({ minLength: 1 }),
  /**
   * How long requests wait for the release; capped at the gateway's maximum hold. When it passes,
   * the waiting requests get 503 hold-timeout but the route stays held: only a release opens it.
   */
  timeoutMs: Type.Optional(Type.Integer({ minimum: 1 })),
  /**
   * Wait (bounded) for requests already sent to be answered before answering: the default, for a
   * freeze. A failover sets it false: what was sent to a dead node will not be answered from there.
   */
  drain: Type.Optional(Type.Boolean()),
  /**
   * Take the hold over from the operation holding the route now, if another does (a failover
   * that took the container's lock from a checkpoint or a migration): the route stays held
   * throughout, and only this hold's release opens it. Without it such a hold is refused (409).
   */
  takeOver: Type.Optional(Type.Boolean()),
  /**
   * The container's running copy is lost (its host died: a failover restores it from a
   * checkpoint), and with it the state of its open TCP connections. A TCP route resets the
   * connections it pipes to the container at once, so their clients reconnect (their new
   * connections wait for the release) instead of sending into silence until a packet reaches the
   * restored copy, whose kernel resets it.
   */
  connectionsLost: Type.Optional(Type.Boolean()),
});
export type HoldRequest = Static<typeof HoldRequest>;

/** POST /v1/routes/:name/release: the migration ended; send traffic to where the container runs now. */
export const ReleaseRequest = Type.Object({
  migrationId: Type.String({ minLength: 1 }),
  /** The new location, or the old one when the migration failed and rolled back. */
  upstream: Upstream,
});
export type ReleaseRequest = Static<typeof ReleaseRequest>;

/** One route in a sync: its spec, and the hold the controller knows of, if a migration is running. */
export const SyncedRoute = Type.Object({
  name: ContainerName,
  protocol: RouteProtocol,
  listenPort: Port,
  upstream: Type.Optional(Upstream),
  log: LogFlag,
  storeRevision: StoreRevision,
  hold: Type.Optional(HoldRequest),
});
export type SyncedRoute = Static<typeof SyncedRoute>;

/**
 * PUT /v1/routes: every route of one owner at once; that owner's routes not listed are removed,
 * other owners' are left alone. With `revision` (the owner's store revision when it listed its
 * routes), a route created at a later revision is not removed either: the store is older than it.
 */
export const SyncRoutesRequest = Type.Object({ owner: RouteOwner, revision: Type.Optional(Type.Integer({ minimum: 0 })), routes: Type.Array(SyncedRoute) });
export type SyncRoutesRequest = Static<typeof SyncRoutesRequest>;

/** The migration that holds a route, or held it last. Times are ms since the epoch (gateway clock). */
export const RouteMigration = Type.Object({
  id: Type.String(),
  heldAt: Type.Number(),
  /** When waiting requests get 503 hold-timeout if no release came by then (the route stays held). */
  expiresAt: Type.Number(),
  /** The time bound passed without a release: requests are turned away until the release. */
  lapsedAt: Type.Optional(Type.Number()),
  /**
   * A replay was started under this hold, from this position into this upstream. Sent again, it
   * goes on where it stopped; after a gateway restart it is refused (what it applied is unknown).
   */
  replay: Type.Optional(Type.Object({ after: LogPosition, upstream: Upstream })),
  endedAt: Type.Optional(Type.Number()),
  /**
   * released: the controller said where the container is. expired: only in state files of older
   * gateways, whose holds ended by themselves.
   */
  outcome: Type.Optional(Type.Union([Type.Literal('released'), Type.Literal('expired')])),
});
export type RouteMigration = Static<typeof RouteMigration>;

/** A route as the gateway keeps it (and persists it in its state file). */
export const Route = Type.Object({
  name: ContainerName,
  protocol: RouteProtocol,
  listenPort: Port,
  upstream: Type.Optional(Upstream),
  log: LogFlag,
  /** Absent on routes put without one (older controllers, or by hand): no sync removes them. */
  owner: Type.Optional(RouteOwner),
  storeRevision: StoreRevision,
  state: Type.Union([Type.Literal('open'), Type.Literal('holding')]),
  /** Increments with every change of the route (PUT, hold, release, hold lapse). */
  generation: Type.Integer({ minimum: 1 }),
  migration: Type.Optional(RouteMigration),
});
export type Route = Static<typeof Route>;

/** A logged route's request log. Records firstSeq..lastSeq can be replayed; none when firstSeq > lastSeq. */
export const RequestLogView = Type.Object({
  /** The log's identity: positions of another log are refused (CHIPMUNK_LOG_MISMATCH). */
  logId: Type.String(),
  firstSeq: Type.Integer({ minimum: 1 }),
  /** Highest seq on disk: every request forwarded so far has a seq up to this. */
  lastSeq: Type.Integer({ minimum: 0 }),
  bytes: Type.Integer({ minimum: 0 }),
  /** Logged requests whose upstream was lost before it answered, waiting for a replay to answer them. */
  parked: Type.Integer({ minimum: 0 }),
});
export type RequestLogView = Static<typeof RequestLogView>;

/** A route as the API shows it: the stored route and what its listener is doing now. */
export const RouteView = Type.Composite([
  Route,
  Type.Object({
    /** Requests (http) or connections (tcp) waiting for the hold to end. */
    held: Type.Integer({ minimum: 0 }),
    /** Why the listener is not running (its port was taken when the gateway restarted); PUT the route again to retry. */
    listenError: Type.Optional(Type.String()),
    /** Present when the route is logged. */
    requestLog: Type.Optional(RequestLogView),
  }),
]);
export type RouteView = Static<typeof RouteView>;

/**
 * POST /v1/routes/:name/hold's answer: the route, and on a logged route the cut. A clean cut
 * has `logPosition`: every logged request up to its seq was answered by the container, none after
 * it was forwarded (the route holds), so a checkpoint taken now contains exactly requests
 * 1..seq of log logId. Otherwise `uncleanCut` says why (requests still unanswered after the bounded
 * drain, or parked): a checkpoint taken now may or may not contain them, so it must not be
 * used as a restore point.
 */
export const HoldResponse = Type.Composite([
  RouteView,
  Type.Object({
    logPosition: Type.Optional(LogPosition),
    uncleanCut: Type.Optional(Type.String()),
  }),
]);
export type HoldResponse = Static<typeof HoldResponse>;

/** POST /v1/routes/:name/replay: send the logged requests after a checkpoint's position to the restored container. */
export const ReplayRequest = Type.Object({
  /** The checkpoint's logPosition: records of that log with a higher seq are sent. */
  after: LogPosition,
  /** Where the container was restored. */
  upstream: Upstream,
});
export type ReplayRequest = Static<typeof ReplayRequest>;

export const ReplayResult = Type.Object({
  /** Records sent, in seq order. */
  replayed: Type.Integer({ minimum: 0 }),
  /** Of those, answers given to clients still waiting for them. */
  delivered: Type.Integer({ minimum: 0 }),
  /** Of those, answers dropped: their clients had their answer already (or left). */
  dropped: Type.Integer({ minimum: 0 }),
  /** Seq of the last record sent (after.seq if none). */
  lastSeq: Type.Integer({ minimum: 0 }),
});
export type ReplayResult = Static<typeof ReplayResult>;

/** POST /v1/routes/:name/log/trim: a checkpoint at `upTo` is committed; older records are not needed. */
export const TrimLogRequest = Type.Object({ upTo: LogPosition });
export type TrimLogRequest = Static<typeof TrimLogRequest>;

/** The state file: the route table, reloaded when the gateway starts. */
export const RouteTableFile = Type.Object({
  version: Type.Literal(1),
  routes: Type.Array(Route),
});
export type RouteTableFile = Static<typeof RouteTableFile>;

