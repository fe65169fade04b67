/**
 * An HTTP route: an HTTP/1.1 reverse proxy on the route's port, towards the container's current
 * upstream through an undici Pool (keep-alive, bounded connections). Bodies stream both ways with
 * backpressure; only request bodies up to `replayableBodyBytes` are read whole first, so that
 * they can be sent again (docs/gateway.md, "Which requests are sent again").
 *
 * node:http serves the clients: keep-alive, and pipelined requests answered in order (each
 * request gets its own ServerResponse, which node writes out only after the previous one).
 */
import { STATUS_CODES, createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { Pool, type Dispatcher } from 'undici';
import { InvalidInputError, toChipmunkError, type ChipmunkError } from '../shared/errors.js';
import { RouteGate, RouteRefusedError, UpstreamFailedError } from './gate.js';
import type { Route, Upstream } from './protocol.js';
import { listenForRoute, type ProxySettings, type RouteProxy } from './proxy.js';
import { sameUpstream } from './routes.js';

export interface HttpProxySettings extends ProxySettings {
  /** Request bodies up to this size are read whole before they are sent, so they can be sent again. */
  replayableBodyBytes: number;
  /** Connections to one upstream; a released queue of thousands must not open thousands at once. */
  upstreamConnections: number;
}

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

  private constructor(
    route: Route,
    private readonly settings: HttpProxySettings,
  ) {
    this.gate = new RouteGate(route, settings.limits, settings.metrics.held);
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

  update(route: Route, expired = false): void {
    // The pool first: requests the gate releases below go to the new upstream.
    this.followUpstream(route);
    this.gate.update(route, expired);
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
   */
  private followUpstream(route: Route): void {
    if (sameUpstream(this.upstream?.at, route.upstream)) return;
    const old = this.upstream;
    this.upstream = route.upstream
      ? {
          at: route.upstream,
          pool: new Pool(`http://${hostForUrl(route.upstream.address)}:${route.upstream.port}`, { connections: this.settings.upstreamConnections }),
        }
      : undefined;
    if (old) {
      const moved = route.upstream ? `to ${route.upstream.address}:${route.upstream.port}` : 'away';
      void old.pool.destroy(new MovedAwayError(`the container moved ${moved}: given up at its old location`, this.drainedBeforeMove));
      this.drainedBeforeMove = false;
    }
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
    }
    this.settings.metrics.request(exchange.clientGone && !res.headersSent ? 0 : res.statusCode);
  }

  /** Sends the request until it is answered, or throws the error to answer with. */
  private async exchange(exchange: ProxiedExchange): Promise<void> {
    const { req } = exchange;
    if (req.url?.[0] !== '/') throw new InvalidInputError('the gateway only proxies origin-form request targets (a path starting with /)');
    // Read before the hold queue, so that held requests leave in the order they came (the
    // queue's byte bound keeps what it holds in memory in check).
    const body = await readBody(req, this.settings.replayableBodyBytes);
    const headers = upstreamHeaders(req);
    for (let attempts = 0; ; attempts++) {
      const route = await this.gate.pass(this.gate.route.state === 'holding' ? exchange.waitSignal() : undefined, body.bytesInMemory);
      // pass() resolved, so the route has an upstream, and followUpstream made its pool.
      const pool = (this.upstream as { pool: Pool }).pool;
      this.inFlight++;
      let failure: Awaited<ReturnType<ProxiedExchange['send']>>;
      try {
        failure = await exchange.send(pool, headers, body.payload);
      } finally {
        if (--this.inFlight === 0) for (const wake of this.idleWaiters.splice(0)) wake();
      }
      if (!failure || exchange.clientGone) return;
      // Sent again only if that cannot do harm: the body is at hand, and the method changes
      // nothing or the request cannot have reached the container (no byte of it was written).
      const resendable = body.replayable && (ALWAYS_RESENDABLE.has(req.method ?? '') || !failure.written || unprocessedByMovedContainer(failure.error));
      const delay = this.gate.retryDelay({ route, resendable, connectFailed: !failure.written, attempts });
      if (delay === undefined) throw upstreamFailure(route, failure);
      this.settings.metrics.retry();
      this.settings.log.debug({ route: route.name, method: req.method, url: req.url, err: failure.error.message, delay }, 'sending again after the upstream failed');
      if (delay > 0) await sleep(delay);
      if (exchange.clientGone) return;
    }
  }

  private answerError(res: ServerResponse, err: ChipmunkError): void {
    if (res.headersSent) {
      res.destroy();
      return;
    }
    const reason = err instanceof RouteRefusedError || err instanceof UpstreamFailedError ? err.reason : undefined;
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
  private abortUpstream?: (err?: Error) => void;
  private waiting?: AbortController;
  private written = false;
  private answering = false;
  private settle?: (failure: FailedSend | undefined) => void;

  constructor(
    readonly req: IncomingMessage,
    private readonly res: ServerResponse,
  ) {
    res.once('close', () => {
      if (res.writableFinished) return;
      this.clientGone = true;
      this.abortUpstream?.();
      this.waiting?.abort();
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
    return new Promise((resolve) => {
      this.settle = resolve;
      pool.dispatch({ path: this.req.url as string, method: this.req.method as Dispatcher.HttpMethod, headers, body: payload }, this);
    });
  }

  onConnect(abort: (err?: Error) => void): void {
    this.written = true;
    this.abortUpstream = abort;
    if (this.clientGone) abort();
  }

  onHeaders(statusCode: number, rawHeaders: Buffer[], resume: () => void, statusText: string): boolean {
    // Informational answers (103) are not passed on: node's ServerResponse has no way to.
    if (statusCode < 200) return true;
    this.answering = true;
    const res = this.res;
    // Head, body and end of a small answer usually arrive in one read: corked until the next
    // tick, they leave in one write instead of three.
    res.cork();
    process.nextTick(uncork, res);
    res.writeHead(statusCode, statusText || (STATUS_CODES[statusCode] ?? 'Unknown'), clientHeaders(rawHeaders));
    res.on('drain', resume);
    return true;
  }

  /** false pauses undici until 'drain' resumes it: the body never piles up here. */
  onData(chunk: Buffer): boolean {
    return this.res.write(chunk);
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
