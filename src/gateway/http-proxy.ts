/**
 * An HTTP route: an HTTP/1.1 reverse proxy on the route's port, towards the container's current
 * upstream through an undici Pool (keep-alive, bounded connections). Bodies stream both ways with
 * backpressure; only request bodies up to `replayableBodyBytes` are read whole first, so that
 * they can be sent again (docs/gateway.md, "Which requests are sent again").
 *
 * A logged route (docs/gateway.md, "Request log") reads every body whole, appends the request
 * to the route's RequestLog when it is about to be forwarded and forwards it once that is on
 * disk. A logged request whose upstream is lost before it answers is parked: its client waits
 * for replay(), which sends the log after a checkpoint's position to the restored container
 * and gives each waiting client the answer to its own request.
 *
 * node:http serves the clients: keep-alive, and pipelined requests answered in order (each
 * request gets its own ServerResponse, which node writes out only after the previous one).
 */
import { STATUS_CODES, createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { Pool, type Dispatcher } from 'undici';
import { ChipmunkError, ConflictError, InvalidInputError, toChipmunkError } from '../shared/errors.js';
import { RouteGate, RouteRefusedError, UpstreamFailedError } from './gate.js';
import type { LogPosition, ReplayResult, Route, Upstream } from './protocol.js';
import { listenForRoute, type ProxySettings, type RouteProxy } from './proxy.js';
import { requireSameLog } from './log-identity.js';
import type { LogRecord, RequestLog } from './request-log.js';
import { sameUpstream } from './routes.js';

export interface HttpProxySettings extends ProxySettings {
  /** Request bodies up to this size are read whole before they are sent, so they can be sent again. */
  replayableBodyBytes: number;
  /** Connections to one upstream; a released queue of thousands must not open thousands at once. */
  upstreamConnections: number;
  /** Logged routes: larger request bodies are refused (413 body-too-large-to-log). */
  maxLoggedBodyBytes: number;
  /** Logged routes: how long a request whose upstream was lost waits for a replay (then 503 upstream-lost). */
  maxReplayWaitMs: number;
  /** The route's request log, if it is logged. */
  requestLog?: RequestLog;
}

/** A logged route's request whose body exceeds maxLoggedBodyBytes: it cannot be logged, so it is not forwarded. */
export class BodyTooLargeToLogError extends ChipmunkError {
  readonly reason = 'body-too-large-to-log';

  constructor(route: string, limit: number) {
    super('CHIPMUNK_INVALID_INPUT', `container '${route}' logs its requests, and request bodies over ${limit} bytes are not logged: send a smaller body`, {
      status: 413,
      details: { reason: 'body-too-large-to-log', route, maxLoggedBodyBytes: limit },
    });
  }
}

/** A replay stopped at a record the restored container did not answer. */
export class ReplayFailedError extends ChipmunkError {
  constructor(message: string, details: Record<string, unknown>) {
    super('CHIPMUNK_UNAVAILABLE', message, { status: 502, details });
  }
}

/** Tries per record of a replay while the restored container refuses connections (it may need a moment). */
const REPLAY_ATTEMPTS = 8;

/** Sent again even if they may have reached the container: they change nothing there. */
const ALWAYS_RESENDABLE = new Set(['GET', 'HEAD', 'OPTIONS']);

/** What requests still at a container's old location fail with when it has moved. */
class MovedAwayError extends Error {
  constructor(
    message: string,
    /** Every request sent before the freeze had been answered (the hold drained). */
    readonly drainedBeforeMove: boolean,
  ) {
    super(message);
  }
}

function unprocessedByMovedContainer(err: Error): boolean {
  return err instanceof MovedAwayError && err.drainedBeforeMove;
}

/** Headers of one connection, not of the message (RFC 9110 7.6.1), plus the proxy's own. */
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'te', 'trailer', 'transfer-encoding', 'upgrade']);

/** How long close() lets answers in progress finish before it cuts the connections. */
const CLOSE_GRACE_MS = 1_000;

export class HttpRouteProxy implements RouteProxy {
  private readonly gate: RouteGate;
  private readonly server: Server;
  private upstream?: { at: Upstream; pool: Pool };
  /** Requests sent to the upstream and not yet answered. */
  private inFlight = 0;
  /**
   * The current hold found nothing in flight before the container froze: whatever is still
   * at the old location when the container moves was sent to a frozen container, which never
   * read it (its connections come back closed), so it is safe to send again.
   */
  private drainedBeforeMove = false;
  private readonly idleWaiters: Array<() => void> = [];
  private requestLog?: RequestLog;
  /** Logged requests by seq whose clients still wait for an answer (in flight, retrying or parked). */
  private readonly unanswered = new Map<number, ProxiedExchange>();
  private parkedCount = 0;
  private replayRunning = false;
  /**
   * How far the replays under the current hold got: a replay sent again (same hold, position and
   * upstream) goes on after the last record the restored container answered, instead of applying
   * records twice. `uncertainSeq`: a record that may or may not have been applied; no replay can
   * go on from there (the container must be restored again).
   */
  private progress?: { holdId: string; after: LogPosition; upstream: Upstream; through: number; uncertainSeq?: number };

  private constructor(
    route: Route,
    private readonly settings: HttpProxySettings,
  ) {
    this.gate = new RouteGate(route, settings.limits, settings.metrics.held);
    this.requestLog = settings.requestLog;
    this.followUpstream(route);
    this.server = createServer({ noDelay: true }, (req, res) => void this.forward(req, res));
  }

  static async listen(route: Route, settings: HttpProxySettings): Promise<HttpRouteProxy> {
    const proxy = new HttpRouteProxy(route, settings);
    try {
      await listenForRoute(proxy.server, settings.host, route);
    } catch (err) {
      await proxy.upstream?.pool.destroy();
      throw err;
    }
    return proxy;
  }

  get held(): number {
    return this.gate.held;
  }

  /** Logged requests waiting for a replay to answer them. */
  get parked(): number {
    return this.parkedCount;
  }

  get replaying(): boolean {
    return this.replayRunning;
  }

  /** Starts or stops logging; a request keeps the log it started with. */
  useLog(requestLog: RequestLog | undefined): void {
    this.requestLog = requestLog;
  }

  /**
   * The cut at the start of a hold (after idle()): the log position every request up to which
   * was answered, none after it forwarded; or why there is no clean one.
   */
  cut(): { logPosition: LogPosition } | { uncleanCut: string } | undefined {
    const log = this.requestLog;
    if (!log) return undefined;
    if (log.failed) return { uncleanCut: `the request log cannot be written (${log.failed.message})` };
    if (this.inFlight > 0 || this.unanswered.size > 0) {
      return {
        uncleanCut: `${Math.max(this.inFlight, this.unanswered.size)} logged requests are still unanswered (${this.parkedCount} parked): the container may or may not have applied them`,
      };
    }
    return { logPosition: { logId: log.id, seq: log.lastSeq } };
  }

  update(route: Route): void {
    const released = this.gate.route.state === 'holding' && route.state !== 'holding';
    // The pool first: requests the gate releases below go to the new upstream.
    this.followUpstream(route, released);
    this.gate.update(route);
  }

  async close(reason: 'route-removed' | 'shutting-down'): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.gate.refuseAll(reason, reason === 'route-removed' ? `the route of container '${this.gate.route.name}' was removed` : 'the gateway is shutting down');
    this.server.closeIdleConnections();
    await Promise.race([closed, sleep(CLOSE_GRACE_MS)]);
    this.server.closeAllConnections();
    await closed;
    await this.upstream?.pool.destroy();
  }

  /**
   * A new upstream gets a new pool; the old one is destroyed with what it still carries. The
   * container moved: requests in progress at its old location will never be answered there (a
   * checkpointed container's connections vanish without even a reset). Destroying them now
   * fails them at once: those safe to resend go to the new location (the route changed since
   * they were sent, see RouteGate.retryDelay), the others get a 502, or a cut answer.
   *
   * A release to the same upstream (`released`) gets a new pool too: the hold may have covered
   * a dump and a restore in place (a migration rolled back), whose copy lost every connection
   * silently; a request written to one would be reset after it left, with no way to know
   * whether it was applied. The old pool is closed gently: a container that ran on (a
   * checkpoint) still answers what it carries.
   */
  private followUpstream(route: Route, released = false): void {
    if (sameUpstream(this.upstream?.at, route.upstream)) {
      if (!released || !this.upstream || !route.upstream) return;
      const kept = this.upstream;
      this.upstream = { at: route.upstream, pool: this.newPool(route.upstream) };
      void kept.pool.close().catch(() => undefined);
      return;
    }
    const old = this.upstream;
    this.upstream = route.upstream ? { at: route.upstream, pool: this.newPool(route.upstream) } : undefined;
    if (old) {
      const moved = route.upstream ? `to ${route.upstream.address}:${route.upstream.port}` : 'away';
      void old.pool.destroy(new MovedAwayError(`the container moved ${moved}: given up at its old location`, this.drainedBeforeMove));
      this.drainedBeforeMove = false;
    }
  }

  private newPool(upstream: Upstream): Pool {
    return new Pool(`http://${hostForUrl(upstream.address)}:${upstream.port}`, { connections: this.settings.upstreamConnections });
  }

  /**
   * Gives the current upstream up (the container is lost there and restored elsewhere): what is
   * in progress there fails now, and logged requests park for the replay. The next route update
   * makes a pool again.
   */
  private abandonUpstream(): void {
    const lost = this.upstream;
    this.upstream = undefined;
    this.drainedBeforeMove = false;
    void lost?.pool.destroy(new MovedAwayError(`container '${this.gate.route.name}' is being restored elsewhere: given up at ${lost.at.address}:${lost.at.port}`, false));
  }

  async idle(timeoutMs: number): Promise<void> {
    this.drainedBeforeMove = await new Promise<boolean>((resolve) => {
      if (this.inFlight === 0) return resolve(true);
      const timer = setTimeout(() => resolve(false), timeoutMs);
      this.idleWaiters.push(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }

  private async forward(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const exchange = new ProxiedExchange(req, res);
    try {
      await this.exchange(exchange);
    } catch (err) {
      if (!exchange.clientGone) this.answerError(res, toChipmunkError(err));
    } finally {
      if (exchange.seq !== undefined) this.unanswered.delete(exchange.seq);
    }
    this.settings.metrics.request(exchange.clientGone && !res.headersSent ? 0 : res.statusCode);
  }

  /** Sends the request until it is answered, or throws the error to answer with. */
  private async exchange(exchange: ProxiedExchange): Promise<void> {
    const { req } = exchange;
    if (req.url?.[0] !== '/') throw new InvalidInputError('the gateway only proxies origin-form request targets (a path starting with /)');
    const requestLog = this.requestLog;
    // Read before the hold queue, so that held requests leave in the order they came (the
    // queue's byte bound keeps what it holds in memory in check). A logged body is read whole:
    // the log keeps it.
    const body = requestLog ? await readLoggedBody(req, this.gate.route.name, this.settings.maxLoggedBodyBytes) : await readBody(req, this.settings.replayableBodyBytes);
    const headers = upstreamHeaders(req);
    for (let attempts = 0; ; attempts++) {
      const route = await this.gate.pass(this.gate.route.state === 'holding' ? exchange.waitSignal() : undefined, body.bytesInMemory);
      if (exchange.claimed) return this.park(exchange);
      this.inFlight++;
      let failure: FailedSend | undefined;
      try {
        // Logged when it is about to be forwarded, not while it was held: so a request is
        // either in the log before a cut, or forwarded after it, never replayed and sent live.
        if (requestLog && exchange.seq === undefined) await this.logRequest(requestLog, exchange, headers, body.payload as Buffer | null);
        // A replay may have taken the request over meanwhile, or given the upstream up.
        if (exchange.claimed) failure = undefined;
        else if (this.upstream) failure = await exchange.send(this.upstream.pool, headers, body.payload);
        else failure = { error: new Error(`container '${route.name}' is being restored elsewhere`), written: false };
      } finally {
        if (--this.inFlight === 0) for (const wake of this.idleWaiters.splice(0)) wake();
      }
      if (exchange.claimed) return this.park(exchange);
      if (!failure || exchange.clientGone) return;
      // Sent again only if that cannot do harm: the body is at hand, and the method changes
      // nothing or the request cannot have reached the container (no byte of it was written).
      const resendable = body.replayable && (ALWAYS_RESENDABLE.has(req.method ?? '') || !failure.written || unprocessedByMovedContainer(failure.error));
      const delay = this.gate.retryDelay({ route, resendable, connectFailed: !failure.written, attempts });
      if (delay === undefined) {
        // A logged request may or may not have reached the container: not a 502, its answer
        // comes from the replay once the container is restored from a checkpoint.
        if (exchange.seq !== undefined) return this.park(exchange, route, failure);
        throw upstreamFailure(route, failure);
      }
      this.settings.metrics.retry();
      this.settings.log.debug({ route: route.name, method: req.method, url: req.url, err: failure.error.message, delay }, 'sending again after the upstream failed');
      if (delay > 0) await sleep(delay);
      if (exchange.clientGone) return;
    }
  }

  private async logRequest(requestLog: RequestLog, exchange: ProxiedExchange, headers: string[], body: Buffer | null): Promise<void> {
    const { req } = exchange;
    let seq: number;
    try {
      seq = await requestLog.append({ method: req.method as string, url: req.url as string, headers, body });
    } catch (err) {
      throw new RouteRefusedError('log-failed', `the request log of container '${this.gate.route.name}' cannot be written, so the request was not forwarded (${(err as Error).message})`, {
        route: this.gate.route.name,
      });
    }
    exchange.seq = seq;
    if (!exchange.clientGone) this.unanswered.set(seq, exchange);
  }

  /** Waits, bounded by maxReplayWaitMs, for a replay to answer a logged request whose upstream was lost. */
  private async park(exchange: ProxiedExchange, route?: Route, failure?: FailedSend): Promise<void> {
    if (failure && route) {
      this.settings.log.warn(
        { route: route.name, seq: exchange.seq, upstream: route.upstream, err: failure.error.message },
        'upstream lost before answering a logged request: it waits for the replay',
      );
    }
    this.settings.metrics.parked(++this.parkedCount);
    try {
      await exchange.awaitReplay(this.settings.maxReplayWaitMs, () => {
        const name = this.gate.route.name;
        return new RouteRefusedError(
          'upstream-lost',
          `container '${name}' stopped answering and was not restored within ${this.settings.maxReplayWaitMs} ms: request ${exchange.seq} is in its log and may or may not have been applied`,
          { route: name, seq: exchange.seq },
        );
      });
    } finally {
      this.settings.metrics.parked(--this.parkedCount);
    }
  }

  /**
   * Sends every logged record after position `after` (seq > after.seq), one at a time in seq
   * order, to `upstream` (the container restored from the checkpoint at that position). A client
   * still waiting for a record's answer gets it; other answers are dropped. The route must be
   * held, so no live request mixes in; the records covered are those on disk when the replay
   * starts. A position of another log than the route's current one is refused.
   */
  async replay(after: LogPosition, upstream: Upstream, resumable: boolean): Promise<ReplayResult> {
    const name = this.gate.route.name;
    const requestLog = this.requestLog;
    if (!requestLog) throw new ConflictError(`the route of container '${name}' is not logged: there is nothing to replay`, { name });
    requireSameLog(name, requestLog.id, after, 'replay');
    const holdId = this.gate.route.migration?.id;
    if (this.gate.route.state !== 'holding' || holdId === undefined) {
      throw new ConflictError(`hold the route of container '${name}' before replaying its log: live requests would mix with the replay`, { name });
    }
    if (this.replayRunning) throw new ConflictError(`a replay of container '${name}''s log is already running`, { name });
    const again = this.progress?.holdId === holdId && this.progress.after.seq === after.seq && sameUpstream(this.progress.upstream, upstream) ? this.progress : undefined;
    if (again?.uncertainSeq !== undefined || (!again && !resumable)) {
      const why = again ? `request ${again.uncertainSeq} was sent and may or may not have been applied` : 'the gateway restarted during it, so what it applied is unknown';
      throw new ConflictError(`the replay of container '${name}''s log into ${upstream.address}:${upstream.port} cannot go on: ${why}; restore the container again from its checkpoint and replay into the new copy`, {
        name,
        // As for a record that failed after it was sent: the copy may have applied it.
        written: true,
        ...(again ? { seq: again.uncertainSeq } : {}),
      });
    }
    const progress = again ?? { holdId, after, upstream, through: after.seq };
    this.progress = progress;
    const afterSeq = progress.through;
    this.replayRunning = true;
    const pool = new Pool(`http://${hostForUrl(upstream.address)}:${upstream.port}`, { connections: 1 });
    try {
      await requestLog.flushed();
      const { firstSeq, lastSeq: through } = requestLog.state();
      if (afterSeq > through) throw new ConflictError(`the log of container '${name}' ends at ${through}, before position ${afterSeq}: it is not the log that position belongs to`, { name, afterSeq, lastSeq: through });
      if (afterSeq < firstSeq - 1) throw new ConflictError(`the log of container '${name}' was trimmed up to ${firstSeq - 1}: the records after ${afterSeq} are gone`, { name, afterSeq, firstSeq });
      this.abandonUpstream();
      const result: ReplayResult = { replayed: 0, delivered: 0, dropped: 0, lastSeq: afterSeq };
      for await (const record of requestLog.read(afterSeq)) {
        if (record.seq > through) break;
        const waiting = this.unanswered.get(record.seq);
        const client = waiting && (await waiting.claimForReplay()) ? waiting : undefined;
        try {
          await this.replayRecord(pool, record, upstream, client);
        } catch (err) {
          client?.replayFinished(false);
          if (!(err instanceof ReplayFailedError) || err.details?.written !== false) progress.uncertainSeq = record.seq;
          throw err;
        }
        client?.replayFinished(true);
        progress.through = record.seq;
        const outcome = client && !client.clientGone ? 'delivered' : 'dropped';
        result.replayed++;
        result.lastSeq = record.seq;
        result[outcome]++;
        this.settings.metrics.replayed(outcome);
      }
      this.settings.log.info({ route: name, afterSeq, ...result, upstream }, 'request log replayed');
      return result;
    } finally {
      this.replayRunning = false;
      await pool.destroy();
    }
  }

  private async replayRecord(pool: Pool, record: LogRecord, upstream: Upstream, client: ProxiedExchange | undefined): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      const failure = client ? await client.send(pool, record.headers, record.body) : await sendDiscardingAnswer(pool, record);
      if (!failure) return;
      // Only a connection that failed is tried again: a request that was written may have been applied.
      if (failure.written || attempt === REPLAY_ATTEMPTS) {
        const where = `${upstream.address}:${upstream.port}`;
        const maybe = failure.written ? ' it may have been applied;' : '';
        throw new ReplayFailedError(
          `replaying request ${record.seq} (${record.method} ${record.url}) to container '${this.gate.route.name}' at ${where} failed after ${attempt} attempts (${failure.error.message}):${maybe} the replay stopped there`,
          { route: this.gate.route.name, seq: record.seq, upstream: where, written: failure.written },
        );
      }
      await sleep(Math.min(50 * 2 ** (attempt - 1), 1_000));
    }
  }

  private answerError(res: ServerResponse, err: ChipmunkError): void {
    if (res.headersSent) {
      res.destroy();
      return;
    }
    const reason = err instanceof RouteRefusedError || err instanceof UpstreamFailedError || err instanceof BodyTooLargeToLogError ? err.reason : undefined;
    if (err instanceof UpstreamFailedError) this.settings.log.warn({ route: this.gate.route.name, err: err.toJSON() }, err.message);
    const text = JSON.stringify(err.toJSON());
    res.writeHead(err.status, {
      'content-type': 'application/json; charset=utf-8',
      'content-length': Buffer.byteLength(text),
      ...(reason ? { 'x-chipmunk-reason': reason } : {}),
      ...(err instanceof RouteRefusedError ? { 'retry-after': '1' } : {}),
    });
    res.end(text);
  }
}

interface RequestBody {
  payload: Buffer | Readable | null;
  /** Whole in memory, so it can be sent again. */
  replayable: boolean;
  /** What was read of it so far (all of it, or the read-ahead of a body that streams). */
  bytesInMemory: number;
}

const NO_BODY: RequestBody = { payload: null, replayable: true, bytesInMemory: 0 };

/** The request body: read whole if it is at most `limit` bytes, else streamed (and never sent twice). */
async function readBody(req: IncomingMessage, limit: number): Promise<RequestBody> {
  const length = req.headers['content-length'];
  if (req.headers['transfer-encoding'] === undefined) {
    if (length === undefined || length === '0') return NO_BODY;
    if (Number(length) > limit) return { payload: req, replayable: false, bytesInMemory: 0 };
  }
  // Chunked (length unknown) or small: read up to the limit, and stream the rest if there is more.
  const chunks: Buffer[] = [];
  let size = 0;
  const reader = req[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  while (size <= limit) {
    const next = await reader.next();
    if (next.done) return { payload: Buffer.concat(chunks, size), replayable: true, bytesInMemory: size };
    chunks.push(next.value);
    size += next.value.length;
  }
  return { payload: Readable.from(readAheadThenRest(chunks, reader), { objectMode: false }), replayable: false, bytesInMemory: size };
}

/** A logged request's body, read whole; over `limit` bytes it cannot be logged. */
async function readLoggedBody(req: IncomingMessage, route: string, limit: number): Promise<RequestBody> {
  const length = req.headers['content-length'];
  if (req.headers['transfer-encoding'] === undefined) {
    if (length === undefined || length === '0') return NO_BODY;
    if (Number(length) > limit) throw new BodyTooLargeToLogError(route, limit);
  }
  const chunks: Buffer[] = [];
  let size = 0;
  // Not for-await: leaving that loop early would destroy the connection before the 413 is sent.
  const reader = req[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  for (let next = await reader.next(); !next.done; next = await reader.next()) {
    size += next.value.length;
    if (size > limit) throw new BodyTooLargeToLogError(route, limit);
    chunks.push(next.value);
  }
  return { payload: size ? Buffer.concat(chunks, size) : null, replayable: true, bytesInMemory: size };
}

async function* readAheadThenRest(first: Buffer[], rest: AsyncIterator<Buffer>): AsyncIterable<Buffer> {
  yield* first;
  for (let next = await rest.next(); !next.done; next = await rest.next()) yield next.value;
}

interface FailedSend {
  error: Error;
  /** Some of the request was handed to a connection to the upstream: it may have reached the container. */
  written: boolean;
}

/**
 * One client request on its way to the upstream, attempt after attempt; also the undici
 * handler of the current attempt (one object per request: this is the hot path).
 *
 * `written` comes from undici's onConnect, which it calls on a connected socket right before it
 * writes the request; a connect failure (refused, timed out, reset while connecting) reaches
 * onError without it. So `written: false` means no byte of this request left the gateway.
 */
class ProxiedExchange implements Dispatcher.DispatchHandlers {
  clientGone = false;
  /** Its place in the route's request log, once logged. */
  seq?: number;
  /** A replay answers this client: the live attempts are over. */
  claimed = false;
  private abortUpstream?: (err?: Error) => void;
  private resumeUpstream?: () => void;
  private waiting?: AbortController;
  private written = false;
  private answering = false;
  private settle?: (failure: FailedSend | undefined) => void;
  /** The attempt in progress, which a replay waits out before it answers through this exchange. */
  private attempt?: Promise<FailedSend | undefined>;
  private replayDelivered = false;
  private replayWaitExpired = false;
  private parked?: { resolve(): void; reject(err: Error): void; lost: () => Error; timer: NodeJS.Timeout };

  constructor(
    readonly req: IncomingMessage,
    private readonly res: ServerResponse,
  ) {
    res.once('close', () => {
      if (res.writableFinished) return;
      this.clientGone = true;
      this.waiting?.abort();
      this.endParking();
      // A replayed request goes on without its client (the restored container needs it), its answer dropped.
      if (this.claimed) this.resumeUpstream?.();
      else this.abortUpstream?.();
    });
  }

  /** Withdraws the request from a hold queue when the client goes away. */
  waitSignal(): AbortSignal {
    this.waiting ??= new AbortController();
    return this.waiting.signal;
  }

  /**
   * One attempt: resolves undefined once the answer went to the client (even if cut short after
   * its headers: then the client sees the connection drop), or the failure if nothing was answered.
   */
  send(pool: Pool, headers: string[], payload: RequestBody['payload']): Promise<FailedSend | undefined> {
    this.written = false;
    this.attempt = new Promise((resolve) => {
      this.settle = (failure) => {
        this.settle = undefined;
        this.attempt = undefined;
        resolve(failure);
      };
      pool.dispatch({ path: this.req.url as string, method: this.req.method as Dispatcher.HttpMethod, headers, body: payload }, this);
    });
    return this.attempt;
  }

  /**
   * A replay takes over answering this client, unless an answer already started (or the client
   * left). A live attempt still in progress is given up first (its upstream was abandoned).
   */
  async claimForReplay(): Promise<boolean> {
    if (this.clientGone || this.answering || this.claimed) return false;
    this.claimed = true;
    if (this.attempt) {
      this.abortUpstream?.(new Error('answered by the replay instead'));
      await this.attempt;
    }
    if (this.answering || this.clientGone) {
      this.replayFinished(true);
      return false;
    }
    return true;
  }

  /** The replay is done with this client: answered (`true`), or it failed before (the client waits on, bounded). */
  replayFinished(answered: boolean): void {
    if (answered) {
      this.replayDelivered = true;
      this.endParking();
      return;
    }
    this.claimed = false;
    if (this.replayWaitExpired) this.endParking(this.parked?.lost());
  }

  /** Resolves once a replay answered this client (or it left); rejects with `lost()` after `timeoutMs` without one. */
  awaitReplay(timeoutMs: number, lost: () => Error): Promise<void> {
    if (this.replayDelivered || this.clientGone) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.replayWaitExpired = true;
        // A replay answering right now is let finish.
        if (!this.claimed) this.endParking(lost());
      }, timeoutMs);
      this.parked = { resolve, reject, lost, timer };
    });
  }

  private endParking(err?: Error): void {
    const parked = this.parked;
    if (!parked) return;
    this.parked = undefined;
    clearTimeout(parked.timer);
    if (err) parked.reject(err);
    else parked.resolve();
  }

  onConnect(abort: (err?: Error) => void): void {
    this.written = true;
    this.abortUpstream = abort;
    if (this.clientGone && !this.claimed) abort();
  }

  onHeaders(statusCode: number, rawHeaders: Buffer[], resume: () => void, statusText: string): boolean {
    // Informational answers (103) are not passed on: node's ServerResponse has no way to.
    if (statusCode < 200) return true;
    this.answering = true;
    // A replayed answer whose client left is read and dropped.
    if (this.clientGone) return true;
    const res = this.res;
    // Head, body and end of a small answer usually arrive in one read: corked until the next
    // tick, they leave in one write instead of three.
    res.cork();
    process.nextTick(uncork, res);
    res.writeHead(statusCode, statusText || (STATUS_CODES[statusCode] ?? 'Unknown'), clientHeaders(rawHeaders));
    this.resumeUpstream = resume;
    res.on('drain', resume);
    return true;
  }

  /** false pauses undici until 'drain' resumes it: the body never piles up here. */
  onData(chunk: Buffer): boolean {
    return this.clientGone || this.res.write(chunk);
  }

  onComplete(): void {
    this.abortUpstream = undefined;
    this.res.end();
    this.settle?.(undefined);
  }

  onError(error: Error): void {
    this.abortUpstream = undefined;
    if (this.answering) {
      this.res.destroy(error);
      this.settle?.(undefined);
    } else {
      this.settle?.({ error, written: this.written });
    }
  }
}

/** Sends a replayed record whose client had its answer already: the answer is read and dropped. */
function sendDiscardingAnswer(pool: Pool, record: LogRecord): Promise<FailedSend | undefined> {
  return new Promise((resolve) => {
    let written = false;
    pool.dispatch(
      { path: record.url, method: record.method as Dispatcher.HttpMethod, headers: record.headers, body: record.body },
      {
        onConnect: () => {
          written = true;
        },
        onHeaders: () => true,
        onData: () => true,
        onComplete: () => resolve(undefined),
        onError: (error) => resolve({ error, written }),
      },
    );
  });
}

function uncork(res: ServerResponse): void {
  res.uncork();
}

function upstreamFailure(route: Route, failure: FailedSend): UpstreamFailedError {
  const where = `${route.upstream?.address}:${route.upstream?.port}`;
  const code = (failure.error as { code?: string }).code;
  const detail = code ? `${code}: ${failure.error.message}` : failure.error.message;
  return failure.written
    ? new UpstreamFailedError('upstream-failed', `container '${route.name}' at ${where} failed before answering (${detail})`, { route: route.name, upstream: where, code })
    : new UpstreamFailedError('upstream-unreachable', `container '${route.name}' cannot be reached at ${where} (${detail})`, { route: route.name, upstream: where, code });
}

/**
 * The client's headers as the upstream gets them: hop-by-hop ones removed (also any named in
 * Connection, and Expect: node answered 100-continue already and undici cannot send it), the
 * X-Forwarded-* set. X-Forwarded-For is appended to; Proto and Host are kept if a proxy in
 * front of the gateway set them.
 */
function upstreamHeaders(req: IncomingMessage): string[] {
  const raw = req.rawHeaders;
  const named = connectionOptions(req.headers.connection);
  const out: string[] = [];
  let forwardedFor: string | undefined;
  let hasProto = false;
  let hasForwardedHost = false;
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i];
    const lower = name.toLowerCase();
    if (isHopByHop(lower, named) || lower === 'expect') continue;
    if (lower === 'x-forwarded-for') {
      forwardedFor = forwardedFor === undefined ? raw[i + 1] : `${forwardedFor}, ${raw[i + 1]}`;
      continue;
    }
    if (lower === 'x-forwarded-proto') hasProto = true;
    else if (lower === 'x-forwarded-host') hasForwardedHost = true;
    out.push(name, raw[i + 1]);
  }
  const client = clientAddress(req);
  out.push('x-forwarded-for', forwardedFor === undefined ? client : `${forwardedFor}, ${client}`);
  if (!hasProto) out.push('x-forwarded-proto', 'http');
  if (!hasForwardedHost && req.headers.host !== undefined) out.push('x-forwarded-host', req.headers.host);
  return out;
}

/** The upstream's headers as the client gets them (latin1 both ways: bytes pass unchanged). */
function clientHeaders(raw: Buffer[]): string[] {
  const out: string[] = [];
  let named: Set<string> | undefined;
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i].toString('latin1');
    const lower = name.toLowerCase();
    if (lower === 'connection') named = connectionOptions(raw[i + 1].toString('latin1'));
    if (isHopByHop(lower, undefined)) continue;
    out.push(name, raw[i + 1].toString('latin1'));
  }
  if (!named) return out;
  const filtered: string[] = [];
  for (let i = 0; i < out.length; i += 2) if (!named.has(out[i].toLowerCase())) filtered.push(out[i], out[i + 1]);
  return filtered;
}

function isHopByHop(lowerName: string, named: Set<string> | undefined): boolean {
  return HOP_BY_HOP.has(lowerName) || lowerName.startsWith('proxy-') || (named !== undefined && named.has(lowerName));
}

/** Header names listed in a Connection header (besides keep-alive/close, which are hop-by-hop anyway). */
function connectionOptions(value: string | undefined): Set<string> | undefined {
  if (!value) return undefined;
  const names = value.split(',').map((token) => token.trim().toLowerCase()).filter((token) => token && token !== 'close' && token !== 'keep-alive');
  return names.length ? new Set(names) : undefined;
}

function clientAddress(req: IncomingMessage): string {
  const address = req.socket.remoteAddress ?? 'unknown';
  // An IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d; upstreams expect a.b.c.d.
  return address.startsWith('::ffff:') ? address.slice(7) : address;
}

function hostForUrl(address: string): string {
  return address.includes(':') ? `[${address}]` : address;
}
