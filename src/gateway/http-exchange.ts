/**
 * One client request on its way to the upstream (ProxiedExchange), attempt after attempt, and
 * what an attempt that failed tells (FailedSend: whether it may be sent again, its 502). Also the replay's send of a record whose
 * client had its answer already.
 */
import { UpstreamFailedError } from './gate.js';
import type { ClientAnswer, ClientRequest } from './http-client-connection.js';
import { headerList, type RequestBody } from './http-messages.js';
import { LeanResponse } from './lean-response.js';
import type { Route } from './protocol.js';
import type { LogRecord } from './request-log.js';
import { statusText, type AnswerHead } from './upstream-answer-head.js';
import type { AnswerReading, UpstreamHandler } from './upstream-connection.js';
import type { UpstreamPool } from './upstream-pool.js';
import type { UpstreamRequest } from './upstream-request.js';

export interface FailedSend {
  error: Error;
  /** Some of the request was handed to a connection to the upstream: it may have reached the container. */
  written: boolean;
}

/** Sent again even if they may have reached the container: they change nothing there. */
const ALWAYS_RESENDABLE = new Set(['GET', 'HEAD', 'OPTIONS']);

/** What requests still at a container's old location fail with when it has moved. */
export class MovedAwayError extends Error {
  constructor(
    message: string,
    /** Every request sent before the freeze had been answered (the hold drained). */
    readonly drainedBeforeMove: boolean,
  ) {
    super(message);
  }
}

/**
 * Sending the request again after `failure` cannot do harm (its body at hand): the method changes
 * nothing, or the request cannot have reached the container (no byte of it was written, or it
 * went to a container that froze after its hold drained, which never read it).
 */
export function mayResend(method: string | undefined, failure: FailedSend): boolean {
  return ALWAYS_RESENDABLE.has(method ?? '') || !failure.written || (failure.error instanceof MovedAwayError && failure.error.drainedBeforeMove);
}

/** The 502 a failed request is answered with. */
export function upstreamFailure(route: Route, failure: FailedSend): UpstreamFailedError {
  const where = `${route.upstream?.address}:${route.upstream?.port}`;
  const code = (failure.error as { code?: string }).code;
  const detail = code ? `${code}: ${failure.error.message}` : failure.error.message;
  return failure.written
    ? new UpstreamFailedError('upstream-failed', `container '${route.name}' at ${where} failed before answering (${detail})`, { route: route.name, upstream: where, code })
    : new UpstreamFailedError('upstream-unreachable', `container '${route.name}' cannot be reached at ${where} (${detail})`, { route: route.name, upstream: where, code });
}

/** Told when an attempt started with ProxiedExchange.start is over (the proxy's hot path: no promise per request). */
export interface AttemptListener {
  attemptOver(exchange: ProxiedExchange, failure: FailedSend | undefined): void;
}

/**
 * One client request on its way to the upstream, attempt after attempt; also the handler of the
 * current attempt (one object per request: this is the hot path).
 *
 * `written` comes from the upstream connection's onConnect, which it calls on a connected socket
 * right before it writes the request; a connect failure (refused, timed out, reset while connecting) reaches
 * onError without it. So `written: false` means no byte of this request left the gateway.
 */
export class ProxiedExchange implements UpstreamHandler {
  clientGone = false;
  /** Its place in the route's request log, once logged. */
  seq?: number;
  /** A replay answers this client: the live attempts are over. */
  claimed = false;
  /** The route as it was when the attempt in progress started (the proxy's, for its retry decision). */
  route?: Route;
  private abortUpstream?: (err?: Error) => void;
  private upstreamReading?: AnswerReading;
  private waiting?: AbortController;
  private written = false;
  private answering = false;
  /** An attempt is in progress: its end resolves send's promise, or is told to start's listener. */
  private attemptOpen = false;
  private resolveAttempt?: (failure: FailedSend | undefined) => void;
  private listener?: AttemptListener;
  /** The attempt in progress, which a replay waits out before it answers through this exchange. */
  private attempt?: Promise<FailedSend | undefined>;
  private replayDelivered = false;
  private replayWaitExpired = false;
  private parked?: { resolve(): void; reject(err: Error): void; lost: () => Error; timer: NodeJS.Timeout };

  constructor(
    readonly req: ClientRequest,
    readonly res: ClientAnswer,
  ) {
    // A lean answer tells its watcher without a listener made per request.
    if (res instanceof LeanResponse) res.watcher = this;
    else res.once('close', () => this.clientClosed());
  }

  /** The client's connection closed (before its answer was finished, or after). */
  clientClosed(): void {
    if (this.res.writableFinished) return;
    this.clientGone = true;
    this.waiting?.abort();
    this.endParking();
    // A replayed request goes on without its client (the restored container needs it), its answer dropped.
    if (this.claimed) this.upstreamReading?.resume(this);
    else this.abortUpstream?.();
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
  send(pool: UpstreamPool, headers: string[], payload: RequestBody['payload']): Promise<FailedSend | undefined> {
    this.written = false;
    this.attempt = new Promise((resolve) => {
      this.attemptOpen = true;
      this.resolveAttempt = resolve;
      // Queued in its client connection's turn: one client cannot keep the others waiting.
      pool.dispatch(this.req.socket, { path: this.req.url as string, method: this.req.method as string, headers, body: payload }, this);
    });
    return this.attempt;
  }

  /** One attempt, as send() makes, whose end is told to `listener` instead of a promise (the hot path). */
  start(pool: UpstreamPool, headers: UpstreamRequest['headers'], payload: RequestBody['payload'], listener: AttemptListener): void {
    this.written = false;
    this.attemptOpen = true;
    this.listener = listener;
    pool.dispatch(this.req.socket, { path: this.req.url as string, method: this.req.method as string, headers, body: payload }, this);
  }

  private attemptEnded(failure: FailedSend | undefined): void {
    if (!this.attemptOpen) return;
    this.attemptOpen = false;
    const { resolveAttempt, listener } = this;
    this.resolveAttempt = undefined;
    this.listener = undefined;
    this.attempt = undefined;
    if (resolveAttempt) resolveAttempt(failure);
    else listener?.attemptOver(this, failure);
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

  onHeaders(head: AnswerHead, reading: AnswerReading): void {
    this.answering = true;
    // A replayed answer whose client left is read and dropped.
    if (this.clientGone) return;
    // Only stored: the head leaves with the first body bytes, or at the end. A lean client
    // connection writes the head's text on as it came; node's ServerResponse needs a list.
    const res = this.res;
    if (res instanceof LeanResponse) res.writeUpstreamHead(head);
    else res.writeHead(head.statusCode, statusText(head), headerList(head.text, head.fieldsAt));
    this.upstreamReading = reading;
  }

  /** false pauses the upstream connection until 'drain' resumes it: the body never piles up here. */
  onData(chunk: Buffer): boolean {
    if (this.clientGone) return true;
    // Both kinds of answer gather the writes of one tick: a small answer (head, body, end) leaves in one write.
    if (this.res.write(chunk)) return true;
    this.res.once('drain', () => this.upstreamReading?.resume(this));
    return false;
  }

  onComplete(): void {
    this.abortUpstream = undefined;
    this.res.end();
    this.attemptEnded(undefined);
  }

  onError(error: Error): void {
    this.abortUpstream = undefined;
    if (this.answering) {
      this.res.destroy(error);
      this.attemptEnded(undefined);
    } else {
      this.attemptEnded({ error, written: this.written });
    }
  }
}

/** Sends a replayed record whose client had its answer already: the answer is read and dropped. */
export function sendDiscardingAnswer(pool: UpstreamPool, record: LogRecord): Promise<FailedSend | undefined> {
  return new Promise((resolve) => {
    let written = false;
    pool.dispatch(
      record,
      { path: record.url, method: record.method, headers: record.headers, body: record.body },
      {
        onConnect: () => {
          written = true;
        },
        onHeaders: () => undefined,
        onData: () => true,
        onComplete: () => resolve(undefined),
        onError: (error) => resolve({ error, written }),
      },
    );
  });
}

