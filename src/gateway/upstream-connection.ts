/**
 * One HTTP/1.1 connection to an upstream, one request at a time (the pool in upstream-pool.ts
 * decides which request goes where). Written for the proxy's hot path: the request head leaves
 * in one write, the answer's head is read from latin1 text in one pass (upstream-answer-head.ts),
 * body bytes are passed on as slices of what the socket read, with backpressure. It took about
 * a fifth off the gateway's user CPU per request against undici's Client (docs/gateway.md,
 * "Performance notes").
 *
 * No body for HEAD, 1xx, 204 and 304; else as the head frames it (upstream-answer-head.ts).
 * 1xx answers are skipped. The request's head and body framing: upstream-request.ts.
 */
import { connect, type Socket } from 'node:net';
import { ChunkedFraming } from './chunked-framing.js';
import { readAnswerHead, type AnswerHead } from './upstream-answer-head.js';
import { requestHead, UpstreamSocketError, writeStreamedBody, type RequestHead, type UpstreamRequest } from './upstream-request.js';

/** What becomes of one request. Exactly one of onComplete and onError is called. */
export interface UpstreamHandler {
  /** The connection is up and the request is about to be written: from here on it may reach the upstream. */
  onConnect(abort: (err?: Error) => void): void;
  /** The answer's head (not for 1xx). `reading` restarts reading after onData returned false. */
  onHeaders(head: AnswerHead, reading: AnswerReading): void;
  /** false: stop reading until `resume` is called. */
  onData(chunk: Buffer): boolean;
  onComplete(): void;
  onError(err: Error): void;
}

/** Restarts reading the answer of a handler whose onData returned false (nothing if its request is over). */
export interface AnswerReading {
  resume(handler: UpstreamHandler): void;
}

/** Idle connections are closed after this, before a typical server's own keep-alive time-out (node's: 5 s). */
const IDLE_MS = 4_000;
/** Without a byte from the upstream for this long, a request fails (undici's default, kept). */
const ANSWER_TIMEOUT_MS = 300_000;
const CONNECT_TIMEOUT_MS = 10_000;
const MAX_HEAD_BYTES = 64 * 1024;

/** Where the answer's parse is; `done`: complete, to be reported once the bytes at hand are handled. */
type ParseState = 'head' | 'length' | 'chunked' | 'until-close' | 'done';

export class UpstreamConnection implements AnswerReading {
  private socket?: Socket;
  private connected = false;
  private handler?: UpstreamHandler;
  private headRequest = false;
  private state: ParseState = 'head';
  /** Text of a head not yet complete. */
  private pendingText = '';
  /** Body bytes still to come (framed by length). */
  private remaining = 0;
  private readonly framing: ChunkedFraming;
  private keepAlive = true;
  private idleMs = IDLE_MS;
  private idleTimer?: NodeJS.Timeout;
  private idleTimerMs = 0;
  /** The upstream's last Keep-Alive header, as read into idleMs. */
  private keepAliveHint = '';
  /** Bytes read but not passed on while the handler asked to wait. */
  private stash?: Buffer;
  private paused = false;
  /** The upstream closed its side; acted on once the bytes read before are handled. */
  private ended = false;
  /** Stops writing a streamed request body (the answer came first, or the connection went). */
  private stopBody?: () => void;
  private readonly abort = (err?: Error): void => this.fail(err ?? new UpstreamSocketError('the request was aborted', 'ABORTED'));
  /** host:port, for errors. */
  private readonly where: string;

  constructor(
    private readonly host: string,
    private readonly port: number,
    /** Told when an answer's head came (before its handler). */
    private readonly onAnswer: () => void,
    /** Told when the request on it is over (after its handler), so the next may start. */
    private readonly onDone: () => void,
  ) {
    this.where = `${host}:${port}`;
    this.framing = new ChunkedFraming(this.where);
  }

  get busy(): boolean {
    return this.handler !== undefined;
  }

  /** Sends `request` (the connection must not be busy), connecting first if needed. */
  send(request: UpstreamRequest, handler: UpstreamHandler): void {
    let head: RequestHead;
    try {
      head = requestHead(request, this.host, this.port);
    } catch (err) {
      handler.onError(err as Error);
      this.onDone();
      return;
    }
    this.handler = handler;
    this.headRequest = request.method === 'HEAD';
    this.state = 'head';
    this.pendingText = '';
    if (this.socket && this.connected) return this.write(head, request.body);
    if (!this.socket) this.open();
    const socket = this.socket as Socket;
    socket.once('connect', () => {
      if (this.handler === handler && this.socket === socket) this.write(head, request.body);
    });
  }

  /** Closes the connection; a request on it fails with `err`. */
  destroy(err: Error): void {
    if (this.handler) this.fail(err);
    else this.dropSocket();
  }

  private open(): void {
    const socket = connect({ host: this.host, port: this.port, noDelay: true });
    this.socket = socket;
    this.connected = false;
    socket.setTimeout(CONNECT_TIMEOUT_MS);
    socket.on('connect', () => {
      this.connected = true;
      socket.setTimeout(ANSWER_TIMEOUT_MS);
    });
    socket.on('data', (chunk: Buffer) => {
      if (this.socket === socket) this.read(chunk);
    });
    socket.on('timeout', () => {
      if (this.socket !== socket) return;
      if (!this.connected) this.fail(new UpstreamSocketError(`connecting to ${this.host}:${this.port} timed out`, 'ETIMEDOUT'));
      else if (this.handler) this.fail(new UpstreamSocketError(`no answer from ${this.host}:${this.port} for ${ANSWER_TIMEOUT_MS} ms`, 'ETIMEDOUT'));
    });
    const ended = (): void => {
      if (this.socket !== socket) return;
      this.ended = true;
      if (!this.paused) this.onEnded();
    };
    socket.on('end', ended);
    socket.on('error', (err) => {
      if (this.socket === socket) this.fail(err);
    });
    socket.on('close', ended);
  }

  private write(head: RequestHead, body: UpstreamRequest['body']): void {
    const socket = this.socket as Socket;
    this.handler?.onConnect(this.abort);
    if (!this.handler || this.socket !== socket) return;
    if (body === null) socket.write(head.text, 'latin1');
    else if (Buffer.isBuffer(body)) {
      socket.cork();
      socket.write(head.text, 'latin1');
      socket.write(body);
      socket.uncork();
    } else {
      socket.write(head.text, 'latin1');
      this.stopBody = writeStreamedBody(body, socket, head.chunked, (err) => {
        this.stopBody = undefined;
        if (this.socket === socket) this.fail(err);
      });
    }
  }

  private read(chunk: Buffer): void {
    if (!this.handler) {
      // Bytes nobody asked for: the connection is out of step, it cannot be used again.
      this.dropSocket();
      return;
    }
    if (this.paused) {
      this.stash = this.stash ? Buffer.concat([this.stash, chunk]) : chunk;
      return;
    }
    try {
      this.parse(chunk);
    } catch (err) {
      this.fail(err as Error);
    }
  }

  private parse(chunk: Buffer): void {
    const handler = this.handler;
    const framing = this.framing;
    let at = 0;
    while (at < chunk.length && this.handler === handler && this.state !== 'done' && !this.paused) {
      const state = this.state;
      if (state === 'head') {
        const end = this.headEnd(chunk, at);
        if (end < 0) return;
        at = end;
        continue;
      }
      if (state === 'chunked' && !framing.inData) {
        at = framing.read(chunk, at);
        if (framing.done) this.state = 'done';
        continue;
      }
      const available = chunk.length - at;
      const take = state === 'until-close' ? available : Math.min(state === 'chunked' ? framing.remaining : this.remaining, available);
      const data = at === 0 && take === chunk.length ? chunk : chunk.subarray(at, at + take);
      at += take;
      const more = (handler as UpstreamHandler).onData(data);
      if (this.handler !== handler) return;
      if (state === 'chunked') framing.consumed(take);
      else if (state === 'length' && (this.remaining -= take) === 0) this.state = 'done';
      if (!more && this.state !== 'done') this.pause(chunk.subarray(at));
    }
    if (this.handler !== handler || this.state !== 'done') return;
    // Bytes beyond the answer: the connection is out of step, it is not used again.
    if (at < chunk.length) this.keepAlive = false;
    this.complete();
  }

  /**
   * Collects the answer's head up to its blank line, then acts on it; returns the offset in
   * `chunk` after the blank line, or -1 if it has not come yet.
   */
  private headEnd(chunk: Buffer, at: number): number {
    let text: string | undefined;
    let next = -1;
    const pending = this.pendingText;
    if (pending.length > 0) {
      // The blank line may begin in what came before and end in this chunk.
      const tail = pending.slice(-3);
      const probe = tail + chunk.toString('latin1', at, Math.min(chunk.length, at + 3));
      const k = probe.indexOf('\r\n\r\n');
      if (k >= 0 && k < tail.length) {
        text = pending.slice(0, pending.length - tail.length + k);
        next = at + k + 4 - tail.length;
      }
    }
    if (text === undefined) {
      const found = chunk.indexOf('\r\n\r\n', at, 'latin1');
      if (found < 0) {
        this.pendingText += chunk.toString('latin1', at, chunk.length);
        if (this.pendingText.length > MAX_HEAD_BYTES) throw new UpstreamSocketError(`the answer of ${this.where} has a head larger than ${MAX_HEAD_BYTES} bytes`, 'EPROTO');
        return -1;
      }
      text = pending + chunk.toString('latin1', at, found);
      next = found + 4;
    }
    this.pendingText = '';
    if (text.length > MAX_HEAD_BYTES) throw new UpstreamSocketError(`the answer of ${this.where} has a head larger than ${MAX_HEAD_BYTES} bytes`, 'EPROTO');
    this.onHead(text);
    return next;
  }

  private onHead(text: string): void {
    const head = readAnswerHead(text, this.where, this.keepAliveHint);
    if (!head) return; // interim: the real answer follows
    this.keepAlive = head.keepAlive;
    if (head.keepAliveHeader !== undefined && head.keepAliveHeader !== this.keepAliveHint) {
      // The same hint comes with every answer: read once.
      this.keepAliveHint = head.keepAliveHeader;
      const timeout = /timeout=(\d+)/i.exec(head.keepAliveHeader);
      if (timeout) this.idleMs = Math.min(IDLE_MS, Math.max(0, Number(timeout[1]) * 1000 - 1000));
    }
    const handler = this.handler as UpstreamHandler;
    this.onAnswer();
    handler.onHeaders(head, this);
    if (this.handler !== handler) return;
    const { statusCode, length } = head;
    if (this.headRequest || statusCode === 204 || statusCode === 304) this.state = 'done';
    else if (head.chunked) {
      this.state = 'chunked';
      this.framing.reset();
    }
    else if (head.otherCoding || length < 0) {
      this.state = 'until-close';
      this.keepAlive = false;
    } else if (length === 0) this.state = 'done';
    else {
      this.state = 'length';
      this.remaining = length;
    }
  }

  /** The upstream's side is closed and every byte it sent was handled. */
  private onEnded(): void {
    if (this.handler && this.state === 'until-close') {
      this.keepAlive = false;
      this.complete();
    } else if (this.handler) this.fail(new UpstreamSocketError(`${this.host}:${this.port} closed the connection before the answer was complete`, 'ECONNRESET'));
    else this.dropSocket();
  }

  private pause(rest: Buffer): void {
    this.paused = true;
    if (rest.length) this.stash = rest;
    this.socket?.pause();
  }

  resume(handler: UpstreamHandler): void {
    if (handler === this.handler) this.resumeReading();
  }

  private resumeReading(): void {
    if (!this.paused) return;
    this.paused = false;
    const stash = this.stash;
    this.stash = undefined;
    if (stash) this.read(stash);
    if (this.paused) return;
    if (this.ended) return this.onEnded();
    this.socket?.resume();
  }

  private complete(): void {
    const handler = this.handler;
    if (!handler) return;
    this.handler = undefined;
    this.state = 'head';
    this.paused = false;
    this.stash = undefined;
    // An answer that came before the whole request body was sent leaves the connection mid-request.
    if (this.stopBody) {
      this.stopBody();
      this.stopBody = undefined;
      this.keepAlive = false;
    }
    if (!this.keepAlive || this.ended) this.dropSocket();
    else this.armIdle();
    handler.onComplete();
    this.onDone();
  }

  private fail(err: Error): void {
    const handler = this.handler;
    this.handler = undefined;
    this.dropSocket();
    if (!handler) return;
    handler.onError(err);
    this.onDone();
  }

  /** One timer while the socket lasts, refreshed at each answer (no new timer per request); it acts only on an idle connection. */
  private armIdle(): void {
    if (this.idleTimer && this.idleTimerMs === this.idleMs) {
      this.idleTimer.refresh();
      return;
    }
    clearTimeout(this.idleTimer);
    this.idleTimerMs = this.idleMs;
    this.idleTimer = setTimeout(() => {
      if (!this.handler) this.dropSocket();
    }, this.idleMs).unref();
  }

  private dropSocket(): void {
    clearTimeout(this.idleTimer);
    this.idleTimer = undefined;
    this.stopBody?.();
    this.stopBody = undefined;
    const socket = this.socket;
    this.socket = undefined;
    this.connected = false;
    this.ended = false;
    this.keepAlive = true;
    this.idleMs = IDLE_MS;
    this.keepAliveHint = '';
    this.paused = false;
    this.stash = undefined;
    socket?.destroy();
  }
}
