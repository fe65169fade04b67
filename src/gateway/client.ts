/**
 * The gateway API as the controller calls it: typed methods over the shared ApiClient (cluster
 * token, our error classes back from the wire). Migration order: hold() before the dump
 * freezes the container, release() once it answers at its new location (or, after a rollback,
 * at the old one); sync() after either side restarted.
 */
import { ApiClient } from '../shared/http.js';
import type { HoldResponse, ReplayResult, RouteSpec, RouteView, SyncedRoute, Upstream } from './protocol.js';

export interface GatewayClientOptions {
  url: string;
  token: string;
  timeoutMs?: number;
}

export class GatewayClient {
  private readonly api: ApiClient;

  constructor(opts: GatewayClientOptions) {
    this.api = new ApiClient({ baseUrl: opts.url, token: opts.token, timeoutMs: opts.timeoutMs ?? 10_000, peer: 'gateway' });
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

  removeRoute(name: string): Promise<void> {
    return this.api.delete(`/v1/routes/${encodeURIComponent(name)}`);
  }

  /**
   * New traffic waits from now on; `timeoutMs` (capped by the gateway) ends the hold if no
   * release comes. On a logged route the answer has the cut: `logPosition`, or `uncleanCut`
   * saying why a checkpoint taken now is not a restore point.
   */
  hold(name: string, migrationId: string, opts: { timeoutMs?: number; drain?: boolean } = {}): Promise<HoldResponse> {
    return this.api.post(`/v1/routes/${encodeURIComponent(name)}/hold`, {
      migrationId,
      ...(opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {}),
      ...(opts.drain !== undefined ? { drain: opts.drain } : {}),
    });
  }

  /**
   * Sends the held route's logged requests after `afterSeq` (the checkpoint's logPosition), in
   * order, to the container restored at `upstream`; waiting clients get their answers. Then
   * release() to the same upstream. A long log takes a while: `timeoutMs` defaults to 5 minutes.
   */
  replay(name: string, afterSeq: number, upstream: Upstream, timeoutMs = 300_000): Promise<ReplayResult> {
    return this.api.post(`/v1/routes/${encodeURIComponent(name)}/replay`, { afterSeq, upstream }, { timeoutMs });
  }

  /** The checkpoint at `upToSeq` is committed: log records up to it are deleted. */
  trimLog(name: string, upToSeq: number): Promise<RouteView> {
    return this.api.post(`/v1/routes/${encodeURIComponent(name)}/log/trim`, { upToSeq });
  }

  /** Held and new traffic goes to `upstream` from now on. */
  release(name: string, migrationId: string, upstream: Upstream): Promise<RouteView> {
    return this.api.post(`/v1/routes/${encodeURIComponent(name)}/release`, { migrationId, upstream });
  }

  /** Replaces the whole table: routes not listed are removed. */
  sync(routes: SyncedRoute[]): Promise<RouteView[]> {
    return this.api.put('/v1/routes', { routes });
  }
}
