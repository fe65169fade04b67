/**
 * A client's connection to an HTTP route, served without node's HTTP server while its requests
 * are plain (docs/gateway.md, "Performance notes"): node's server costs more CPU per request
 * than all of the proxy's own work, and most requests through a gateway are plain GETs.
 *
 * Plain: HTTP/1.1, origin-form target, a Host header, no body (neither Content-Length nor
 * Transfer-Encoding), no Expect or Upgrade, a head under 16 KiB made of well-formed lines. Such a
 * request gets a LeanRequest and a LeanResponse; anything else (a body, HTTP/1.0, a malformed or
 * huge head, ...) hands the connection to node's HTTP server for the rest of its life, once the
 * answers in progress on it are written: from there node parses, answers 400/431, reads bodies,
 * exactly as for connections that never were lean.
 *
 * Pipelined requests are answered in order: only the oldest unfinished answer writes to the
 * socket, the next ones buffer theirs (and tell the upstream to wait) until their turn. An
 * answer's head and the body bytes of one tick leave in one write. Keep-alive as node's server
 * does it: closed after 5 s idle, after `Connection: close`, or when the client ends its side
 * (once the answers it waits for are written).
 */
import { STATUS_CODES } from 'node:http';
import type { Socket } from 'node:net';
import { headerList, lineEnd } from './http-messages.js';
import type { AnswerHead } from './upstream-answer-head.js';

/** What the proxy reads of a client's request, lean or node's IncomingMessage. */
export interface ClientRequest {
  readonly method?: string;
  readonly url?: string;
  readonly rawHeaders: string[];
  readonly headers: { readonly host?: string; readonly connection?: string; readonly 'content-length'?: string; readonly 'transfer-encoding'?: string };
  /** Also the key that has the client connection's requests take their turn in the upstream pool. */
  readonly socket: { readonly remoteAddress?: string };
}

/** How the proxy answers a client, lean or node's ServerResponse. */
export interface ClientAnswer {
  readonly headersSent: boolean;
  readonly writableFinished: boolean;
  statusCode: number;
  writeHead(statusCode: number, statusText: string, headers: string[]): unknown;
  writeHead(statusCode: number, headers: Record<string, string | number>): unknown;
  /** false: wait for 'drain'. */
  write(chunk: Buffer): boolean;
  end(chunk?: Buffer | string): unknown;
  destroy(err?: Error): unknown;
  /** 'close': the connection went before the answer was finished (or, for node's, after it was). */
  once(event: 'close' | 'drain', listener: () => void): unknown;
}

/** node's defaults: keep-alive time-out, and the largest head it reads. */
const KEEP_ALIVE_MS = 5_000;
const MAX_HEAD_BYTES = 16 * 1024;
const HEADERS_TIMEOUT_MS = 60_000;
/** A client with this many requests unanswered is not read further until one is answered. */
const MAX_PIPELINED = 16;
/** Body chunks up to this size are copied into the answer's text, so head and body leave in one write. */
const COPY_BYTES = 16 * 1024;
/** A request head the lean path takes, checked whole: its request line, then header lines whose names are tokens and whose values hold no CR, LF or NUL. */
const PLAIN_HEAD = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+ \/[!-~\x80-\xff]* HTTP\/1\.1(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\0\r\n]*)*$/;
/** A status line and header lines, each after a CRLF, with no other CR, LF or NUL; names are tokens. */
const WELL_FORMED_HEAD = /^HTTP\/1\.1 \d{3} [^\0\r\n]*(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+: [^\0\r\n]*)*$/;
/** The end of every answer's head: its framing (unless it has a Content-Length) and the connection's own lines. */
const CHUNKED_LINE = '\r\ntransfer-encoding: chunked';
const KEEP_ALIVE_END = `\r\nconnection: keep-alive\r\nkeep-alive: timeout=${KEEP_ALIVE_MS / 1000}\r\n\r\n`;
const CLOSE_END = '\r\nconnection: close\r\n\r\n';
/** Statuses that have no body (RFC 9110 6.4.1). */
const BODYLESS_STATUS = (status: number): boolean => status < 200 || status === 204 || status === 304;

export class LeanRequest implements ClientRequest {
  private list?: string[];

  constructor(
    readonly method: string,
    readonly url: string,
    /** The request line, then each header line after a CRLF, as they came (PLAIN_HEAD checked them). */
    readonly head: string,
    /** Where the header lines begin in `head`. */
    readonly fieldsAt: number,
    readonly headers: { host: string; connection?: string },
    readonly socket: Socket,
  ) {}

  /** Made when asked: the hot path passes the head's text on (upstreamHeadText). */
  get rawHeaders(): string[] {
    return (this.list ??= headerList(this.head, this.fieldsAt));
  }
}

export class LeanResponse implements ClientAnswer {
  statusCode = 200;
  headersSent = false;
  writableFinished = false;
  /** Output not yet handed to the socket (latin1 text). */
  private text = '';
  /** Output waiting for its turn or for the tick's write, in order (text and large buffers). */
  private parts?: Array<string | Buffer>;
  /** once() listeners (an EventEmitter per answer cost more than all of this). */
  private closeListeners?: Array<() => void>;
  private drainListeners?: Array<() => void>;
  /** Told when the connection goes before this answer is finished, as a 'close' listener would be (one object, no closure per answer). */
  watcher?: { clientClosed(): void };
  private chunked = false;
  private noBody: boolean;
  ended = false;
  /** This answer's turn came: it writes to the socket. */
  active = false;
  private needDrain = false;

  constructor(
    private readonly connection: ClientConnection,
    headRequest: boolean,
    /** The client asked to close after this answer. */
    readonly closeAfter: boolean,
  ) {
    this.noBody = headRequest;
  }

  writeHead(statusCode: number, textOrHeaders: string | Record<string, string | number>, list?: string[]): this {
    let statusText: string;
    let headers: string[];
    if (typeof textOrHeaders === 'string') {
      statusText = textOrHeaders;
      headers = list ?? [];
    } else {
      statusText = STATUS_CODES[statusCode] ?? 'Unknown';
      headers = Object.entries(textOrHeaders).flatMap(([name, value]) => [name, String(value)]);
    }
    let head = `HTTP/1.1 ${statusCode} ${statusText}`;
    let hasLength = false;
    for (let i = 0; i < headers.length; i += 2) {
      const name = headers[i];
      if (name.length === 14 && name.toLowerCase() === 'content-length') hasLength = true;
      head += `\r\n${name}: ${headers[i + 1]}`;
    }
    // One check for the whole head: a name that is not a token, or a value holding CR, LF or NUL (header injection), throws as node's writeHead does.
    if (!WELL_FORMED_HEAD.test(head)) throw new TypeError(`invalid character in a header of the answer (status ${statusCode})`);
    return this.startAnswer(statusCode, head, hasLength);
  }

  /** The upstream's answer head, its text written on as it came (readAnswerHead checked it). */
  writeUpstreamHead(head: AnswerHead): this {
    return this.startAnswer(head.statusCode, head.text, head.hasLength);
  }

  /** `head`: the status line and header lines, each after a CRLF; the framing and connection lines are the connection's own. */
  private startAnswer(statusCode: number, head: string, hasLength: boolean): this {
    if (this.headersSent) throw new Error('the answer’s head was written already');
    this.statusCode = statusCode;
    if (BODYLESS_STATUS(statusCode)) this.noBody = true;
    this.chunked = !hasLength && !this.noBody;
    this.headersSent = true;
    this.text = head + (this.chunked ? CHUNKED_LINE : '') + (this.closeAfter ? CLOSE_END : KEEP_ALIVE_END);
    return this;
  }

  write(chunk: Buffer): boolean {
    if (this.ended) throw new Error('write after the end of the answer');
    if (!this.headersSent) this.writeHead(200, 'OK', []);
    this.append(chunk);
    if (!this.active) {
      this.needDrain = true;
      return false;
    }
    this.connection.flushNextTick();
    // What is written at the next tick is at most one read of the upstream's: the socket's own bound holds.
    if (this.connection.socket.writableNeedDrain) {
      this.needDrain = true;
      return false;
    }
    return true;
  }

  end(chunk?: Buffer | string): this {
    if (this.ended) return this;
    if (!this.headersSent) {
      const body = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
      this.writeHead(200, 'OK', ['content-length', String(body?.length ?? 0)]);
      chunk = body;
    }
    if (chunk !== undefined && chunk.length > 0) this.append(typeof chunk === 'string' ? Buffer.from(chunk) : chunk);
    if (this.chunked) this.text += '0\r\n\r\n';
    this.ended = true;
    if (this.active) this.connection.finish(this);
    return this;
  }

  destroy(): this {
    this.connection.socket.destroy();
    return this;
  }

  /** Its turn came: what it buffered goes out now; 'drain' if it told the upstream to wait. */
  activate(): void {
    this.active = true;
    if (this.ended) return this.connection.finish(this);
    this.flush();
    // Else the socket's 'drain' tells it.
    if (this.needDrain && !this.connection.socket.writableNeedDrain) this.drained();
  }

  drained(): void {
    if (!this.needDrain) return;
    this.needDrain = false;
    const listeners = this.drainListeners;
    this.drainListeners = undefined;
    if (listeners) for (const listener of listeners) listener();
  }

  /** Hands everything buffered to the socket. */
  flush(): void {
    const socket = this.connection.socket;
    if (this.parts) for (const part of this.parts) socket.write(part, 'latin1');
    this.parts = undefined;
    if (this.text) socket.write(this.text, 'latin1');
    this.text = '';
  }

  private append(chunk: Buffer): void {
    if (this.noBody || chunk.length === 0) return;
    if (this.chunked) this.text += `${chunk.length.toString(16)}\r\n`;
    if (chunk.length <= COPY_BYTES) this.text += chunk.toString('latin1');
    else {
      (this.parts ??= []).push(this.text, chunk);
      this.text = '';
    }
    if (this.chunked) this.text += '\r\n';
  }

  once(event: 'close' | 'drain', listener: () => void): this {
    if (event === 'close') (this.closeListeners ??= []).push(listener);
    else (this.drainListeners ??= []).push(listener);
    return this;
  }

  /** The connection went before this answer was finished. */
  closed(): void {
    this.watcher?.clientClosed();
    const listeners = this.closeListeners;
    this.closeListeners = undefined;
    if (listeners) for (const listener of listeners) listener();
  }

  /** The tick's writes go out (unless end() took them along already). */
  flushOpen(): void {
    if (this.active && !this.ended && !this.connection.socket.destroyed) this.flush();
  }
}

/** One client connection, lean until a request needs node's HTTP server. */
export class ClientConnection {
  private partial = '';
  /** When the head in `partial` began (performance.now()). */
  private partialSince = 0;
  /** Unfinished answers, oldest (the one writing) first. */
  private readonly answers: LeanResponse[] = [];
  private idleTimer?: NodeJS.Timeout;
  /** Bytes from the first request node's server must read, once the answers before it are written. */
  private handoff?: Buffer;
  private clientEnded = false;
  private closing = false;
  private readonly onData = (chunk: Buffer): void => this.read(chunk);
  private readonly onEnd = (): void => {
    this.clientEnded = true;
    if (this.answers.length === 0) this.socket.end();
  };
  private readonly onClose = (): void => {
    clearTimeout(this.idleTimer);
    for (const answer of this.answers.splice(0)) answer.closed();
  };
  private readonly onError = (): void => {
    this.socket.destroy();
  };
  private readonly onDrain = (): void => this.answers[0]?.drained();
  private flushScheduled = false;
  private readonly flushTick = (): void => {
    this.flushScheduled = false;
    this.answers[0]?.flushOpen();
  };

  constructor(
    readonly socket: Socket,
    private readonly onRequest: (req: LeanRequest, res: LeanResponse) => void,
    /** Gives the connection to node's HTTP server (its 'connection' listener). */
    private readonly toNode: (socket: Socket) => void,
  ) {
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onClose);
    socket.on('error', this.onError);
    socket.on('drain', this.onDrain);
    this.armIdle();
  }

  /** Nothing in progress on it: a hold, a shutdown may close it. */
  get idle(): boolean {
    return this.answers.length === 0 && this.handoff === undefined;
  }

  /** Closes the connection once the answers in progress are written (now if there are none). */
  closeWhenDone(): void {
    this.closing = true;
    if (this.answers.length === 0 && this.handoff === undefined) this.socket.destroy();
  }

  /** The writing answer's writes of this tick leave together at its end. */
  flushNextTick(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    process.nextTick(this.flushTick);
  }

  /** The answer at the head of the queue is complete: written, and the next one's turn comes. */
  finish(answer: LeanResponse): void {
    answer.flush();
    answer.writableFinished = true;
    this.answers.shift();
    if (answer.closeAfter) {
      this.socket.end();
      for (const later of this.answers.splice(0)) later.closed();
      return;
    }
    const next = this.answers[0];
    if (next) return next.activate();
    if (this.handoff) return this.handOff();
    if (this.closing || this.clientEnded) return void this.socket.end();
    if (this.socket.isPaused()) this.socket.resume();
    this.armIdle();
  }

  private read(chunk: Buffer): void {
    const continued = this.partial !== '';
    const text = continued ? this.partial + chunk.toString('latin1') : chunk.toString('latin1');
    this.partial = '';
    let at = 0;
    while (at < text.length) {
      const end = text.indexOf('\r\n\r\n', at);
      if (end < 0) {
        if (text.length - at > MAX_HEAD_BYTES) return this.startHandoff(text.slice(at));
        if (!continued || at > 0) this.partialSince = performance.now();
        this.partial = at === 0 ? text : text.slice(at);
        break;
      }
      const request = end - at <= MAX_HEAD_BYTES ? this.parseHead(text.slice(at, end)) : undefined;
      if (!request) return this.startHandoff(text.slice(at));
      at = end + 4;
      const answer = new LeanResponse(this, request.req.method === 'HEAD', request.closeAfter);
      this.answers.push(answer);
      if (this.answers.length === 1) answer.active = true;
      this.onRequest(request.req, answer);
      if (request.closeAfter) {
        // Nothing after a request that closes the connection is read.
        this.socket.off('data', this.onData);
        return;
      }
      if (this.socket.destroyed) return;
    }
    if (this.answers.length >= MAX_PIPELINED) this.socket.pause();
    else if (this.answers.length === 0) this.armIdle();
  }

  /** A plain request's head (see the file's comment), or undefined if node's server must read it. */
  private parseHead(head: string): { req: LeanRequest; closeAfter: boolean } | undefined {
    if (!PLAIN_HEAD.test(head)) return undefined;
    // The request line is `method SP path SP HTTP/1.1` (PLAIN_HEAD): no regex needed to take it apart.
    const methodEnd = head.indexOf(' ');
    const urlEnd = head.indexOf(' ', methodEnd + 1);
    const fieldsAt = lineEnd(head, urlEnd);
    let host: string | undefined;
    let connection: string | undefined;
    for (let at = fieldsAt; at < head.length; ) {
      const start = at + 2;
      const colon = head.indexOf(':', start);
      const end = lineEnd(head, colon);
      at = end;
      const n = colon - start;
      if (n !== 4 && n !== 6 && n !== 7 && n !== 10 && n !== 14 && n !== 17) continue;
      const lower = head.slice(start, colon).toLowerCase();
      if (lower === 'host') {
        if (host !== undefined) return undefined;
        host = head.slice(colon + 1, end).trim();
      } else if (lower === 'connection') {
        const value = head.slice(colon + 1, end).trim();
        connection = connection === undefined ? value : `${connection}, ${value}`;
      } else if (lower === 'content-length' || lower === 'transfer-encoding' || lower === 'expect' || lower === 'upgrade') return undefined;
    }
    if (host === undefined) return undefined;
    const closeAfter = connection !== undefined && /(?:^|,)\s*close\s*(?:,|$)/i.test(connection);
    const headers = connection === undefined ? { host } : { host, connection };
    const method = methodEnd === 3 && head.startsWith('GET') ? 'GET' : head.slice(0, methodEnd);
    return { req: new LeanRequest(method, head.slice(methodEnd + 1, urlEnd), head, fieldsAt, headers, this.socket), closeAfter };
  }

  private startHandoff(rest: string): void {
    this.handoff = Buffer.from(rest, 'latin1');
    this.socket.pause();
    if (this.answers.length === 0) this.handOff();
  }

  private handOff(): void {
    const rest = this.handoff as Buffer;
    this.handoff = undefined;
    clearTimeout(this.idleTimer);
    const socket = this.socket;
    socket.off('data', this.onData);
    socket.off('end', this.onEnd);
    socket.off('close', this.onClose);
    socket.off('error', this.onError);
    socket.off('drain', this.onDrain);
    if (rest.length) socket.unshift(rest);
    this.toNode(socket);
    // node's server reads the connection on from here.
    socket.resume();
  }

  /** One timer per connection, refreshed (no new timer per request): it acts only if the connection is idle when it fires. */
  private armIdle(): void {
    if (this.idleTimer) this.idleTimer.refresh();
    else this.idleTimer = setTimeout(() => this.idleTimeout(), KEEP_ALIVE_MS).unref();
  }

  private idleTimeout(): void {
    if (this.answers.length > 0 || this.handoff !== undefined || this.socket.destroyed) return;
    // A head begun and not finished gets node's headers time-out.
    if (this.partial && performance.now() - this.partialSince < HEADERS_TIMEOUT_MS) return this.armIdle();
    this.socket.destroy();
  }
}
