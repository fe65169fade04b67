/**
 * The route table: one route per container, and the rules of its life (a port belongs to one
 * route; a route belongs to the controller that put it, its owner; a hold belongs to one
 * migration and ends only when released). Pure state: the listeners that carry the traffic
 * live in the proxies, and the gateway (gateway.ts) applies each change to them.
 *
 * Every change makes a new Route object with the next generation, so a proxy can tell whether
 * the route changed since it sent a request (see RouteGate.retryDelay).
 *
 * The table is also kept in a JSON state file, written whole and renamed over the old one,
 * so a restarted gateway serves the same routes before the controller has resent anything.
 */
import { open, readFile, rename } from 'node:fs/promises';
import { Value } from '@sinclair/typebox/value';
import { ConflictError, InvalidInputError, NotFoundError, StoreFailedError } from '../shared/errors.js';
import { RouteTableFile, type Route, type RouteSpec, type Upstream } from './protocol.js';

export class RouteTable {
  private readonly routes = new Map<string, Route>();

  constructor(routes: Iterable<Route> = []) {
    for (const route of routes) this.routes.set(route.name, route);
  }

  list(): Route[] {
    return [...this.routes.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  find(name: string): Route | undefined {
    return this.routes.get(name);
  }

  get(name: string): Route {
    const route = this.routes.get(name);
    if (!route) throw new NotFoundError(`the gateway has no route for container '${name}'`, { name });
    return route;
  }

  /**
   * The route as PUT makes it: spec replaced, hold state kept (a resent route must not end a
   * running migration's hold). The table is unchanged until set().
   */
  withSpec(name: string, spec: RouteSpec): Route {
    const previous = this.routes.get(name);
    if (previous) this.checkOwner(previous, spec.owner, 'change');
    const portTaken = [...this.routes.values()].find((r) => r.listenPort === spec.listenPort && r.name !== name);
    if (portTaken) {
      throw new ConflictError(`port ${spec.listenPort} is already the gateway port of container '${portTaken.name}': pick another listenPort`, {
        listenPort: spec.listenPort,
        route: portTaken.name,
      });
    }
    if (spec.log && spec.protocol !== 'http') {
      throw new InvalidInputError(`only http routes can be logged: the gateway cannot replay a TCP stream (container '${name}')`, { name, protocol: spec.protocol });
    }
    const owner = spec.owner ?? previous?.owner;
    const storeRevision = spec.storeRevision ?? previous?.storeRevision;
    const route: Route = {
      name,
      protocol: spec.protocol,
      listenPort: spec.listenPort,
      ...(spec.upstream ? { upstream: { address: spec.upstream.address, port: spec.upstream.port } } : {}),
      ...(spec.log ? { log: true } : {}),
      ...(owner ? { owner } : {}),
      ...(storeRevision !== undefined ? { storeRevision } : {}),
      state: previous?.state ?? 'open',
      generation: (previous?.generation ?? 0) + 1,
      ...(previous?.migration ? { migration: previous.migration } : {}),
    };
    return previous && sameRoute(previous, route) ? previous : route;
  }

  /**
   * A route may be changed or removed by its owner only; one without an owner by anyone (the
   * first owner that puts it claims it).
   */
  checkOwner(route: Route, owner: string | undefined, action: 'change' | 'remove'): void {
    if (route.owner === undefined || route.owner === owner) return;
    const who = owner === undefined ? 'a request naming no owner' : `owner ${owner}`;
    throw new ConflictError(`the route of container '${route.name}' belongs to the controller whose store is ${route.owner}; ${who} cannot ${action} it (use that controller, or name its owner)`, {
      name: route.name,
      owner: route.owner,
    });
  }

  /**
   * Holding by `migrationId`; waiting requests are turned away after `expiresAt`. Holding again
   * for the same migration changes nothing; `replace` takes over a hold of another migration
   * (the route stays held throughout).
   */
  withHold(name: string, migrationId: string, expiresAt: number, now: number, replace = false): Route {
    const route = this.get(name);
    if (route.state === 'holding' && !replace) {
      if (route.migration?.id === migrationId) return route;
      throw new ConflictError(`the route of container '${name}' is held by migration ${route.migration?.id}; release it first`, {
        name,
        heldBy: route.migration?.id,
      });
    }
    if (route.state === 'holding' && route.migration?.id === migrationId) return route;
    return { ...route, state: 'holding', generation: route.generation + 1, migration: { id: migrationId, heldAt: now, expiresAt } };
  }

  /**
   * Open again, towards `upstream`. Accepted from the migration that holds the route (also once
   * its time bound passed: the route is still held), and resent by the one that released it last.
   */
  withRelease(name: string, migrationId: string, upstream: Upstream, now: number): Route {
    const route = this.get(name);
    const migration = route.migration;
    if (migration?.id !== migrationId) {
      const why = route.state === 'holding' ? `is held by migration ${migration?.id}` : 'is not held';
      throw new ConflictError(`the route of container '${name}' ${why}, not by migration ${migrationId}: nothing to release`, {
        name,
        migrationId,
        heldBy: route.state === 'holding' ? migration?.id : undefined,
      });
    }
    if (route.state === 'open' && route.upstream && sameUpstream(route.upstream, upstream)) return route;
    return {
      ...route,
      state: 'open',
      upstream: { address: upstream.address, port: upstream.port },
      generation: route.generation + 1,
      migration: route.state === 'holding' ? { ...migration, endedAt: now, outcome: 'released' } : migration,
    };
  }

  /**
   * The hold's time bound passed without a release: still held (the migration or failover may
   * still be replaying, and only its release may open the route), but requests are turned away.
   */
  withLapsedHold(name: string, now: number): Route {
    const route = this.get(name);
    if (route.state !== 'holding' || !route.migration || route.migration.lapsedAt !== undefined) return route;
    return { ...route, generation: route.generation + 1, migration: { ...route.migration, lapsedAt: now } };
  }

  set(route: Route): void {
    this.routes.set(route.name, route);
  }

  delete(name: string): Route {
    const route = this.get(name);
    this.routes.delete(name);
    return route;
  }
}

export function sameUpstream(a: Upstream | undefined, b: Upstream | undefined): boolean {
  return a === b || (a !== undefined && b !== undefined && a.address === b.address && a.port === b.port);
}

function sameRoute(a: Route, b: Route): boolean {
  return a.protocol === b.protocol && a.listenPort === b.listenPort && sameUpstream(a.upstream, b.upstream) && Boolean(a.log) === Boolean(b.log) && a.owner === b.owner && a.storeRevision === b.storeRevision;
}

/** The table's JSON file. Written whole to a temporary file, synced, then renamed over the old one. */
export class RouteStateFile {
  constructor(readonly path: string) {}

  /** The saved routes; none if the file does not exist yet. */
  async load(): Promise<Route[]> {
    let text: string;
    try {
      text = await readFile(this.path, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw new StoreFailedError(`cannot read the gateway state file ${this.path}`, err);
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch (err) {
      throw new InvalidInputError(`the gateway state file ${this.path} is not JSON (${(err as Error).message}): fix or remove it`, { path: this.path });
    }
    if (!Value.Check(RouteTableFile, parsed)) {
      const first = [...Value.Errors(RouteTableFile, parsed)][0];
      throw new InvalidInputError(`the gateway state file ${this.path} is not a route table (${first?.path || '/'}: ${first?.message}): fix or remove it`, {
        path: this.path,
      });
    }
    return parsed.routes;
  }

  async save(routes: Route[]): Promise<void> {
    const body: RouteTableFile = { version: 1, routes };
    const partial = `${this.path}.partial`;
    try {
      const file = await open(partial, 'w', 0o600);
      try {
        await file.writeFile(`${JSON.stringify(body, null, 2)}\n`);
        // Synced before the rename, so a crash leaves the old table or the new one, never half of one.
        await file.sync();
      } finally {
        await file.close();
      }
      await rename(partial, this.path);
    } catch (err) {
      throw new StoreFailedError(`cannot write the gateway state file ${this.path}: the change is live but would be lost on restart`, err);
    }
  }
}
