/**
 * What the gateway needs from a route's proxy (http-proxy.ts, tcp-proxy.ts), whatever its
 * protocol: a listener on the route's port that follows the route's changes.
 */
import type { Server } from 'node:net';
import type { Logger } from 'pino';
import { ConflictError, InvalidInputError } from '../shared/errors.js';
import type { HoldLimits } from './gate.js';
import type { RouteMetrics } from './metrics.js';
import type { Route } from './protocol.js';

export interface RouteProxy {
  /** Requests or connections waiting for the hold to end. */
  readonly held: number;
  /** A new version of the route, same protocol and port. */
  update(route: Route): void;
  /**
   * Resolves once no request is on its way to the upstream, or after `timeoutMs`: a hold waits
   * for this before the controller freezes the container, so no request the container has
   * applied can lose its answer to the freeze. (TCP connections are not waited for.)
   */
  idle(timeoutMs: number): Promise<void>;
  /** Stops listening, turns held traffic away with `reason`, and ends every connection. */
  close(reason: 'route-removed' | 'shutting-down'): Promise<void>;
}

export interface ProxySettings {
  /** Address route listeners bind. */
  host: string;
  limits: HoldLimits;
  log: Logger;
  metrics: RouteMetrics;
}

/** Binds a route's listener; a taken port is a ConflictError that names it. */
export function listenForRoute(server: Server, host: string, route: Route): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException): void => {
      const where = `${host}:${route.listenPort}`;
      if (err.code === 'EADDRINUSE') {
        reject(new ConflictError(`port ${route.listenPort} is already in use on the gateway host (${where}, by another program): pick another listenPort`, {
          route: route.name,
          listenPort: route.listenPort,
        }));
      } else {
        reject(new InvalidInputError(`the gateway cannot listen on ${where} for container '${route.name}' (${err.code ?? err.message})`, {
          route: route.name,
          listenPort: route.listenPort,
          code: err.code,
        }));
      }
    };
    server.once('error', onError);
    server.listen({ host, port: route.listenPort }, () => {
      server.off('error', onError);
      resolve();
    });
  });
}
