/**
 * The part of holding that HTTP and TCP routes share: a route's gate lets traffic through to
 * the current upstream while the route is open, and queues it (bounded) while it is held; on
 * release the queue drains in arrival order. It also decides when a failed attempt to reach the
 * upstream may be tried again (retryDelay); each proxy decides whether its request is safe
 * to send again at all.
 */
import { ChipmunkError, UnavailableError } from '../shared/errors.js';
import type { Route } from './protocol.js';
import { sameUpstream } from './routes.js';

export interface HoldLimits {
  /** Requests (http) or connections (tcp) one route may hold; more are refused (503 queue-full / reset). */
  maxQueued: number;
  /** Request body bytes one route may hold in memory (bodies are read before the queue, to keep its order). */
  maxQueuedBytes: number;
  /**
   * Longest wait for a release: then the waiting requests get 503 hold-timeout (they were never
   * acknowledged). The route stays held until it is released; a request arriving after the
   * bound passed waits at most the hold's timeout itself.
   */
  maxHoldMs: number;
  /**
   * After a release (or an upstream change), for this long a connection the upstream refuses is
   * tried again rather than failed: the container may need a moment before it answers there.
   */
  reconnectMs: number;
}

export const DEFAULT_HOLD_LIMITS: HoldLimits = { maxQueued: 10_000, maxQueuedBytes: 256 * 1024 * 1024, maxHoldMs: 30_000, reconnectMs: 5_000 };

/**
 * Why traffic was turned away; the `X-Chipmunk-Reason` header of a 503. The last two are for
 * logged routes: the log could not be written (the request was not forwarded), or the upstream
 * was lost and no replay answered within maxReplayWaitMs.
 */
export type RefusalReason = 'queue-full' | 'hold-timeout' | 'no-upstream' | 'route-removed' | 'shutting-down' | 'log-failed' | 'upstream-lost';

export class RouteRefusedError extends UnavailableError {
  constructor(
    readonly reason: RefusalReason,
    message: string,
    details: Record<string, unknown> = {},
  ) {
    super(message, { reason, ...details });
  }
}

/** Why the proxy answered 502 itself: the upstream could not be reached, or failed before answering. */
export type UpstreamFailureReason = 'upstream-unreachable' | 'upstream-failed';

export class UpstreamFailedError extends ChipmunkError {
  constructor(
    readonly reason: UpstreamFailureReason,
    message: string,
    details: Record<string, unknown> = {},
  ) {
    super('CHIPMUNK_UNAVAILABLE', message, { status: 502, details: { reason, ...details } });
  }
}

/** What happened to a failed attempt, as far as retrying is concerned. */
export interface FailedAttempt {
  /** The route as it was when the attempt started. */
  route: Route;
  /** Sending it again cannot do harm (proxy's rule: idempotent, or it never reached the upstream). */
  resendable: boolean;
  /** No byte of it reached the upstream: the connection itself failed. */
  connectFailed: boolean;
  /** Attempts so far, for the backoff. */
  attempts: number;
}

interface Waiter {
  bytes: number;
  resolve(): void;
  reject(err: Error): void;
}

export class RouteGate {
  private current: Route;
  private readonly waiters = new Set<Waiter>();
  private waitingBytes = 0;
  /** When traffic was last redirected (hold ended, upstream changed): starts the reconnect window. */
  private openedAt = 0;

  constructor(
    route: Route,
    private readonly limits: HoldLimits,
    /** Told the queue length after every change, for the held-traffic gauge. */
    private readonly onHeldChange: (held: number) => void,
  ) {
    this.current = route;
  }

  get route(): Route {
    return this.current;
  }

  get held(): number {
    return this.waiters.size;
  }

  /** The route, if traffic goes through at once (open, with an upstream): pass() without its await. */
  openRoute(): (Route & { upstream: NonNullable<Route['upstream']> }) | undefined {
    const route = this.current;
    return route.state !== 'holding' && route.upstream ? (route as Route & { upstream: NonNullable<Route['upstream']> }) : undefined;
  }

  /**
   * The route to send to now: at once while open, after the hold while holding. Rejects with
   * RouteRefusedError when the queue is full, the route has no upstream, or the hold ended badly.
   * `signal` withdraws a waiting client (it went away); `bytes` is what it holds in memory.
   */
  async pass(signal?: AbortSignal, bytes = 0): Promise<Route & { upstream: NonNullable<Route['upstream']> }> {
    while (this.current.state === 'holding') await this.wait(signal, bytes, this.lapsedWaitMs());
    const route = this.current;
    if (!route.upstream) {
      throw new RouteRefusedError('no-upstream', `container '${route.name}' runs nowhere the gateway knows of: no upstream for this route`, {
        route: route.name,
      });
    }
    return route as Route & { upstream: NonNullable<Route['upstream']> };
  }

  /**
   * A new version of the route. Leaving `holding` releases the queue in arrival order, or refuses
   * it if there is nowhere to go. A hold whose time bound just passed turns its queue away and
   * stays held.
   */
  update(route: Route): void {
    const previous = this.current;
    this.current = route;
    if (route.state === 'holding') {
      if (route.migration?.lapsedAt !== undefined && previous.migration?.lapsedAt === undefined) {
        this.refuseAll('hold-timeout', `container '${route.name}' is still moving (held by ${route.migration.id}) after the hold's time bound: try again later`);
      }
      return;
    }
    // Traffic is redirected (a hold ended, or the upstream changed): the reconnect window opens.
    if (previous.state === 'holding' || !sameUpstream(previous.upstream, route.upstream)) this.openedAt = Date.now();
    if (previous.state !== 'holding') return;
    if (route.upstream) this.drain((w) => w.resolve());
    else this.refuseAll('no-upstream', `container '${route.name}' was released without an upstream`);
  }

  /** Turns every waiting request or connection away, e.g. when the route is removed. */
  refuseAll(reason: RefusalReason, message: string): void {
    const err = new RouteRefusedError(reason, message, { route: this.current.name });
    this.drain((w) => w.reject(err));
  }

  /**
   * Whether to try a failed attempt again, and after how many ms; undefined: answer the failure.
   * Only resendable attempts qualify, and only when the failure is likely the migration's doing:
   * - the route is holding now, or changed since the attempt started (a hold or release came
   *   in between: the container froze or moved under it) -> again at once (pass() waits out a hold);
   * - the connection failed within `reconnectMs` of a release or upstream change (the container
   *   is not yet answering at its new address) -> again after a short backoff.
   * Otherwise (the upstream failed on its own) the client gets the failure.
   */
  retryDelay(attempt: FailedAttempt): number | undefined {
    if (!attempt.resendable) return undefined;
    if (this.current.state === 'holding' || this.current.generation !== attempt.route.generation) return 0;
    if (attempt.connectFailed && Date.now() < this.openedAt + this.limits.reconnectMs) return Math.min(25 * 2 ** attempt.attempts, 250);
    return undefined;
  }

  /** Past its time bound a hold still holds, but each new request waits at most the hold's own timeout. */
  private lapsedWaitMs(): number | undefined {
    const migration = this.current.migration;
    if (this.current.state !== 'holding' || migration?.lapsedAt === undefined) return undefined;
    return Math.max(1, migration.expiresAt - migration.heldAt);
  }

  private wait(signal: AbortSignal | undefined, bytes: number, timeoutMs: number | undefined): Promise<void> {
    const { maxQueued, maxQueuedBytes } = this.limits;
    if (this.waiters.size >= maxQueued || this.waitingBytes + bytes > maxQueuedBytes) {
      const full = this.waiters.size >= maxQueued ? `${maxQueued} waiting` : `${this.waitingBytes + bytes} bytes of request bodies, more than ${maxQueuedBytes}`;
      return Promise.reject(
        new RouteRefusedError('queue-full', `container '${this.current.name}' is moving and its hold queue is full (${full})`, {
          route: this.current.name,
          maxQueued,
          maxQueuedBytes,
        }),
      );
    }
    return new Promise<void>((resolve, reject) => {
      const onAbort = (): void => {
        clearTimeout(timer);
        if (this.forget(waiter)) this.onHeldChange(this.waiters.size);
        reject(signal?.reason instanceof Error ? signal.reason : new Error('client went away'));
      };
      const onTimeout = (): void => {
        signal?.removeEventListener('abort', onAbort);
        if (this.forget(waiter)) this.onHeldChange(this.waiters.size);
        const route = this.current;
        reject(new RouteRefusedError('hold-timeout', `container '${route.name}' is still moving (held by ${route.migration?.id}) after ${timeoutMs} ms: try again later`, { route: route.name }));
      };
      const timer = timeoutMs === undefined ? undefined : setTimeout(onTimeout, timeoutMs);
      const waiter: Waiter = {
        bytes,
        resolve: () => {
          clearTimeout(timer);
          signal?.removeEventListener('abort', onAbort);
          resolve();
        },
        reject: (err) => {
          clearTimeout(timer);
          signal?.removeEventListener('abort', onAbort);
          reject(err);
        },
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.waiters.add(waiter);
      this.waitingBytes += bytes;
      this.onHeldChange(this.waiters.size);
    });
  }

  private forget(waiter: Waiter): boolean {
    if (!this.waiters.delete(waiter)) return false;
    this.waitingBytes -= waiter.bytes;
    return true;
  }

  private drain(settle: (w: Waiter) => void): void {
    const waiters = [...this.waiters];
    this.waiters.clear();
    this.waitingBytes = 0;
    this.onHeldChange(0);
    // In arrival order: a Set iterates in insertion order, and the waiters' continuations (which
    // send the requests) run as microtasks in the order they were settled.
    for (const w of waiters) settle(w);
  }
}
