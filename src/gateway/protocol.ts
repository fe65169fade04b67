/**
 * The gateway's API messages (docs/gateway.md, "API"), one TypeBox schema each: they validate
 * the requests in fastify, type the code (Static<>), and describe the state file.
 */
import { Type, type Static } from '@sinclair/typebox';
import { ContainerName } from '../shared/protocol.js';

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

/** PUT /v1/routes/:name: what the controller states about one container's route. */
export const RouteSpec = Type.Object({
  protocol: RouteProtocol,
  /** Port the gateway listens on for this container's clients. */
  listenPort: Port,
  /** Absent while the container runs nowhere: requests get 503, connections are closed. */
  upstream: Type.Optional(Upstream),
});
export type RouteSpec = Static<typeof RouteSpec>;

/** POST /v1/routes/:name/hold: a migration begins; hold new traffic until it is released. */
export const HoldRequest = Type.Object({
  migrationId: Type.String({ minLength: 1 }),
  /** Ends the hold (back to the old upstream) if no release came; capped at the gateway's maximum hold. */
  timeoutMs: Type.Optional(Type.Integer({ minimum: 1 })),
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
  hold: Type.Optional(HoldRequest),
});
export type SyncedRoute = Static<typeof SyncedRoute>;

/** PUT /v1/routes: the whole table at once; routes not listed are removed. */
export const SyncRoutesRequest = Type.Object({ routes: Type.Array(SyncedRoute) });
export type SyncRoutesRequest = Static<typeof SyncRoutesRequest>;

/** The migration that holds a route, or held it last. Times are ms since the epoch (gateway clock). */
export const RouteMigration = Type.Object({
  id: Type.String(),
  heldAt: Type.Number(),
  /** When the hold ends by itself if no release comes. */
  expiresAt: Type.Number(),
  endedAt: Type.Optional(Type.Number()),
  /** released: the controller said where the container is; expired: the hold timed out (old upstream kept). */
  outcome: Type.Optional(Type.Union([Type.Literal('released'), Type.Literal('expired')])),
});
export type RouteMigration = Static<typeof RouteMigration>;

/** A route as the gateway keeps it (and persists it in its state file). */
export const Route = Type.Object({
  name: ContainerName,
  protocol: RouteProtocol,
  listenPort: Port,
  upstream: Type.Optional(Upstream),
  state: Type.Union([Type.Literal('open'), Type.Literal('holding')]),
  /** Increments with every change of the route (PUT, hold, release, hold expiry). */
  generation: Type.Integer({ minimum: 1 }),
  migration: Type.Optional(RouteMigration),
});
export type Route = Static<typeof Route>;

/** A route as the API shows it: the stored route and what its listener is doing now. */
export const RouteView = Type.Composite([
  Route,
  Type.Object({
    /** Requests (http) or connections (tcp) waiting for the hold to end. */
    held: Type.Integer({ minimum: 0 }),
    /** Why the listener is not running (its port was taken when the gateway restarted); PUT the route again to retry. */
    listenError: Type.Optional(Type.String()),
  }),
]);
export type RouteView = Static<typeof RouteView>;

/** The state file: the route table, reloaded when the gateway starts. */
export const RouteTableFile = Type.Object({
  version: Type.Literal(1),
  routes: Type.Array(Route),
});
export type RouteTableFile = Static<typeof RouteTableFile>;

