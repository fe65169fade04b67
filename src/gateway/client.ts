/**
 * The gateway API as the controller calls it: typed methods over the shared ApiClient (cluster
 * token, our error classes back from the wire). Migration order: hold() before the dump
 * freezes the container, release() once it answers at its new location (or, after a rollback,
 * at the old one); sync() after either side restarted.
 */
import { ApiClient } from '../shared/http.js';
import type { HoldResponse, LogPosition, ReplayResult, RouteSpec, RouteView, SyncedRoute, Upstream } from './protocol.js';

export interface GatewayClientOptions {
  url: string;
  token: string;
  timeoutMs?: number;
  /** The controller leader's term, sent with every call (src/shared/term-fence.ts). */
  term?: () => number | undefined;
}

export class GatewayClient {
  private readonly api: ApiClient;

  constructor(opts: GatewayClientOptions) {
    this.api = new ApiClient({ baseUrl: opts.url, token: opts.token, timeoutMs: opts.timeoutMs ?? 10_000, peer: 'gateway', term: opts.term });
  }

  listRoutes(): Promise<RouteView[]> {
    return this.api.get('/v1/routes');
  }

  getRoute(name: string): Promise<RouteView> {
    return this.api.get(`/v1/routes/${encodeURIComponent(name)}`);
  }

  /** Creates or changes a container's route (a running hold is kept). */
  putRoute(name: string, spec: RouteSpec): Promise<RouteView> {
    return this.api.put(`/v1/routes/${encodeURIComponent(name)}`, spec);
  }

  /** Removes the route and deletes its request log; `owner` must be the route's, if it has one. */
  removeRoute(name: string, owner?: string): Promise<void> {
    const query = owner === undefined ? '' : `?owner=${encodeURIComponent(owner)}`;
    return this.api.delete(`/v1/routes/${encodeURIComponent(name)}${query}`);
  }

  /**
   * New traffic waits from now on, until release(); requests waiting longer than `timeoutMs`
   * (capped by the gateway) get 503 hold-timeout, but the route stays held. On a logged route the answer has the cut: `logPosition`, or `uncleanCut`
   * saying why a checkpoint taken now is not a restore point.
   */
  hold(name: string, migrationId: string, opts: { timeoutMs?: number; drain?: boolean; takeOver?: boolean; connectionsLost?: boolean } = {}): Promise<HoldResponse> {
    return this.api.post(`/v1/routes/${encodeURIComponent(name)}/hold`, {
      migrationId,
      ...(opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {}),
      ...(opts.drain !== undefined ? { drain: opts.drain } : {}),
      ...(opts.takeOver !== undefined ? { takeOver: opts.takeOver } : {}),
      ...(opts.connectionsLost !== undefined ? { connectionsLost: opts.connectionsLost } : {}),
    });
  }

  /**
   * Sends the held route's logged requests after `after` (the checkpoint's logPosition), in
   * order, to the container restored at `upstream`; waiting clients get their answers. Then
   * release() to the same upstream. A long log takes a while: `timeoutMs` defaults to 5 minutes.
   * A position of another log than the route's current one: LogMismatchError.
   */
  replay(name: string, after: LogPosition, upstream: Upstream, timeoutMs = 300_000): Promise<ReplayResult> {
    return this.api.post(`/v1/routes/${encodeURIComponent(name)}/replay`, { after, upstream }, { timeoutMs });
  }

  /** The checkpoint at `upTo` is committed: log records up to it are deleted. */
  trimLog(name: string, upTo: LogPosition): Promise<RouteView> {
    return this.api.post(`/v1/routes/${encodeURIComponent(name)}/log/trim`, { upTo });
  }

  /** Held and new traffic goes to `upstream` from now on. */
  release(name: string, migrationId: string, upstream: Upstream): Promise<RouteView> {
    return this.api.post(`/v1/routes/${encodeURIComponent(name)}/release`, { migrationId, upstream });
  }

  /**
   * Replaces `owner`'s routes: its routes not listed are removed (unless created after store
   * revision `revision`), other owners' are left alone. Ends no hold.
   */
  sync(owner: string, routes: SyncedRoute[], revision?: number): Promise<RouteView[]> {
    return this.api.put('/v1/routes', { owner, routes, ...(revision !== undefined ? { revision } : {}) });
  }
}
