/**
 * A route's connections to its upstream (docs/gateway.md, "Upstream connections"): keep-alive
 * connections, one request at a time each, at most `maxConnections`, and a queue in front of
 * them that takes the requests of different client connections in turn (round-robin), so no
 * client can keep the others waiting by sending fast or pipelining.
 *
 * Some servers serve fewer connections than they accept: Python's http.server (HTTP/1.1, not
 * threading) serves one keep-alive connection until it closes, and the others wait unread in
 * its backlog. A request written on such a waiting connection is answered only once the served
 * connections close. So when a request on a connection that never answered has no answer after
 * the stall time while another connection answered (or finished reading an answer) meanwhile,
 * the pool takes it for a connection the upstream has not accepted yet:
 * - it closes the connections the upstream serves as soon as they are idle (rotation), and sends
 *   nothing new until the stalled ones answer, so the server moves on to them; nothing is sent
 *   twice, the stalled request itself gets its answer;
 * - it lowers its limit to the number of connections seen served at once (1 for http.server),
 *   and later probes one more connection now and then (backoff from 1 s to 30 s): an upstream
 *   that serves more at once gets its connections back one by one.
 * A rotation that frees nothing within a second stall time ends, and the limit is put back: it
 * was a false alarm (a first request that was only slow, such as a long poll).
 *
 * Each connection is an UpstreamConnection (upstream-connection.ts), one request at a time.
 */
import type { Upstream } from './protocol.js';
import { UpstreamConnection, type UpstreamHandler } from './upstream-connection.js';
import type { UpstreamRequest } from './upstream-request.js';

export interface UpstreamPoolSettings {
  /** Most connections open to the upstream at once. */
  maxConnections: number;
  /**
   * Least time without an answer after which a request on a connection that never answered is
   * taken as stalled (waiting in the upstream's backlog), if another connection answered meanwhile.
   */
  stallMs: number;
}

/** Whose request it is: requests of one key leave in order, keys take turns. */
export type QueueKey = object;

const FIRST_PROBE_MS = 1_000;
const MAX_PROBE_MS = 30_000;
/** The stall time is at least this many times the usual time to an answer, so a slow app is not taken for a stalled one. */
const STALL_LATENCY_FACTOR = 8;

interface Queued {
  request: UpstreamRequest;
  handler: UpstreamHandler;
}

/** Requests waiting for a connection, one FIFO per key, keys served in turn. */
class FairQueue {
  private readonly byKey = new Map<QueueKey, Queued[]>();
  /** Keys with waiting requests, next first. */
  private turns: QueueKey[] = [];
  size = 0;

  push(key: QueueKey, item: Queued): void {
    const fifo = this.byKey.get(key);
    if (fifo) fifo.push(item);
    else {
      this.byKey.set(key, [item]);
      this.turns.push(key);
    }
    this.size++;
  }

  shift(): Queued | undefined {
    const key = this.turns.shift();
    if (key === undefined) return undefined;
    const fifo = this.byKey.get(key) as Queued[];
    const item = fifo.shift() as Queued;
    if (fifo.length) this.turns.push(key);
    else this.byKey.delete(key);
    this.size--;
    return item;
  }

  takeAll(): Queued[] {
    const all: Queued[] = [];
    for (let item = this.shift(); item; item = this.shift()) all.push(item);
    return all;
  }
}

/** A connection of the pool, with what the pool knows of it. */
class PooledConnection {
  readonly http: UpstreamConnection;
  /** It answered a request: the upstream serves it. */
  served = false;
  /** Its request waits in the upstream's backlog (see the file's comment). */
  stalled = false;
  /** Opened beyond the limit to find out whether the upstream serves one more connection. */
  probe = false;
  /** The pool's limit before this connection's stall lowered it (put back if it was a false alarm). */
  limitBeforeStall = 0;
  /** When its current request was handed to it (performance.now()). */
  sentAt = 0;
  /** When it last got an answer's head. */
  answeredAt = 0;
  /** When its last request was over (answered or failed). */
  freedAt = 0;
  stallTimer?: NodeJS.Timeout;

  constructor(pool: UpstreamPool, upstream: Upstream) {
    this.http = new UpstreamConnection(
      upstream.address,
      upstream.port,
      () => pool.answered(this),
      () => pool.freed(this),
    );
  }
}

export class UpstreamPool {
  private readonly connections: PooledConnection[] = [];
  private readonly queue = new FairQueue();
  /** Connections the upstream has been seen to serve at once; lowered by a stall, raised by a probe. */
  private limit: number;
  private stalledCount = 0;
  private probeAt = 0;
  private probeBackoffMs = FIRST_PROBE_MS;
  /** Usual time from sending a request to its answer's head, ms (moving average). */
  private latencyMs = 0;
  private destroyedWith?: Error;
  /** Replaced by a new pool to the same upstream (retire()): connections close once free. */
  private retired = false;

  constructor(
    readonly upstream: Upstream,
    private readonly settings: UpstreamPoolSettings,
  ) {
    this.limit = settings.maxConnections;
  }

  /** Sends the request on a free connection, or queues it in `key`'s turn. */
  dispatch(key: QueueKey, request: UpstreamRequest, handler: UpstreamHandler): void {
    if (this.destroyedWith) {
      handler.onError(this.destroyedWith);
      return;
    }
    const connection = this.queue.size === 0 ? this.freeConnection() : undefined;
    if (connection) this.start(connection, request, handler);
    else this.queue.push(key, { request, handler });
  }

  /** Nothing open, nothing queued: a retired pool in this state is done. */
  get idle(): boolean {
    return this.connections.length === 0 && this.queue.size === 0;
  }

  /** Closes every connection that carries no request (a hold starts: nothing may wait on one). */
  closeIdle(): void {
    for (const connection of [...this.connections]) if (!connection.http.busy) this.close(connection);
  }

  /**
   * Takes no more connections' worth of work: idle connections close now, busy ones once their
   * request is over (a container that ran on through a hold still answers what it carries).
   */
  retire(): void {
    this.retired = true;
    this.closeIdle();
  }

  /** Fails what is queued and in progress with `err` (no byte of a queued request was written), and closes everything. */
  async destroy(err: Error): Promise<void> {
    this.destroyedWith = err;
    for (const { handler } of this.queue.takeAll()) handler.onError(err);
    for (const connection of this.connections.splice(0)) {
      clearTimeout(connection.stallTimer);
      connection.http.destroy(err);
    }
  }

  /** A connection got an answer's head. */
  answered(connection: PooledConnection): void {
    const now = performance.now();
    this.latencyMs += (now - connection.sentAt - this.latencyMs) / 16;
    connection.answeredAt = now;
    if (connection.stalled) {
      connection.stalled = false;
      this.stalledCount--;
    }
    if (!connection.served) {
      connection.served = true;
      clearTimeout(connection.stallTimer);
      if (connection.probe) {
        // The upstream serves one more connection at once: the next probe may follow at once.
        connection.probe = false;
        this.limit = Math.min(this.settings.maxConnections, Math.max(this.limit, this.connections.length));
        this.probeBackoffMs = FIRST_PROBE_MS;
        this.probeAt = 0;
      }
    }
  }

  /** A connection's request is over (answered or failed): the connection takes the next one, or closes. */
  freed(connection: PooledConnection): void {
    connection.freedAt = performance.now();
    clearTimeout(connection.stallTimer);
    if (connection.stalled) {
      connection.stalled = false;
      this.stalledCount--;
    }
    if (this.destroyedWith) return;
    if (this.retired) {
      this.close(connection);
      this.pump();
      return;
    }
    // While requests stall, served connections close as they get free: the upstream moves on to
    // the stalled ones. Beyond the limit (lowered meanwhile) a connection closes too.
    if ((this.stalledCount > 0 && connection.served) || this.connections.length > this.limit) this.close(connection);
    this.pump();
  }

  private pump(): void {
    while (this.queue.size > 0) {
      const connection = this.freeConnection();
      if (!connection) return;
      const next = this.queue.shift() as Queued;
      this.start(connection, next.request, next.handler);
    }
  }

  /** An idle connection (served ones first), or a new one if the limit allows; none while a rotation runs. */
  private freeConnection(): PooledConnection | undefined {
    if (this.stalledCount > 0) return undefined;
    let fresh: PooledConnection | undefined;
    for (const connection of this.connections) {
      if (connection.http.busy) continue;
      if (connection.served) return connection;
      fresh ??= connection;
    }
    if (fresh) return fresh;
    if (this.connections.length < this.limit) return this.open(false);
    if (this.limit < this.settings.maxConnections && performance.now() >= this.probeAt) return this.open(true);
    return undefined;
  }

  private open(probe: boolean): PooledConnection {
    const connection = new PooledConnection(this, this.upstream);
    connection.probe = probe;
    if (probe) this.probeAt = performance.now() + this.probeBackoffMs;
    this.connections.push(connection);
    return connection;
  }

  private start(connection: PooledConnection, request: UpstreamRequest, handler: UpstreamHandler): void {
    connection.sentAt = performance.now();
    if (!connection.served) this.watchForStall(connection, connection.sentAt);
    connection.http.send(request, handler);
  }

  private stallMs(): number {
    return Math.max(this.settings.stallMs, STALL_LATENCY_FACTOR * this.latencyMs);
  }

  /** Checks a connection that never answered, after the stall time, for a stall. */
  private watchForStall(connection: PooledConnection, sentAt: number): void {
    clearTimeout(connection.stallTimer);
    connection.stallTimer = setTimeout(() => {
      if (connection.served || connection.sentAt !== sentAt || !connection.http.busy || this.destroyedWith) return;
      // Answered, or done reading an answer whose head came before: a connection still reading
      // its answer's body when this request was sent is idle now, and the server may sit on it.
      const servedMeanwhile = this.connections.filter((other) => other !== connection && (other.answeredAt > sentAt || other.freedAt > sentAt)).length;
      if (servedMeanwhile === 0) return this.watchForStall(connection, sentAt);
      this.stalled(connection, servedMeanwhile);
    }, this.stallMs());
    connection.stallTimer.unref();
  }

  private stalled(connection: PooledConnection, servedAtOnce: number): void {
    connection.stalled = true;
    this.stalledCount++;
    connection.limitBeforeStall = this.limit;
    this.limit = Math.min(this.limit, servedAtOnce);
    if (connection.probe) this.probeBackoffMs = Math.min(this.probeBackoffMs * 2, MAX_PROBE_MS);
    connection.probe = false;
    this.probeAt = performance.now() + this.probeBackoffMs;
    this.closeIdle();
    // If closing the served connections frees nothing, the request was only slow: the rotation
    // ends, and the limit is what it was.
    connection.stallTimer = setTimeout(() => {
      if (!connection.stalled) return;
      connection.stalled = false;
      connection.served = true;
      this.stalledCount--;
      this.limit = Math.max(this.limit, connection.limitBeforeStall);
      this.pump();
    }, this.stallMs());
    connection.stallTimer.unref();
  }

  private close(connection: PooledConnection): void {
    const index = this.connections.indexOf(connection);
    if (index >= 0) this.connections.splice(index, 1);
    clearTimeout(connection.stallTimer);
    connection.http.destroy(new Error('connection closed by the pool'));
  }
}
