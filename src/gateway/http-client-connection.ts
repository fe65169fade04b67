/**
 * A client's connection to an HTTP route, served without node's HTTP server while its requests
 * are plain (docs/gateway.md, "Performance notes"): node's server costs more CPU per request
 * than all of the proxy's own work, and most requests through a gateway are plain GETs.
 *
 * Plain: HTTP/1.1, origin-form target, a Host header, no body (neither Content-Length nor
 * Transfer-Encoding), no Expect or Upgrade, a head under 16 KiB made of well-formed lines. Such a
 * request gets a LeanRequest and a LeanResponse (lean-response.ts); anything else (a body, HTTP/1.0, a malformed or
 * huge head, ...) hands the connection to node's HTTP server for the rest of its life, once the
 * answers in progress on it are written: from there node parses, answers 400/431, reads bodies,
 * exactly as for connections that never were lean.
 *
 * Pipelined requests are answered in order (lean-response.ts). Keep-alive as node's server
 * does it: closed after 5 s idle, after `Connection: close`, or when the client ends its side
 * (once the answers it waits for are written).
 */
import type { Socket } from 'node:net';
import { headerList, lineEnd } from './http-messages.js';
import { KEEP_ALIVE_MS, LeanResponse } from './lean-response.js';

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

/** node's defaults: the largest head it reads (and KEEP_ALIVE_MS). */
const MAX_HEAD_BYTES = 16 * 1024;
const HEADERS_TIMEOUT_MS = 60_000;
/** A client with this many requests unanswered is not read further until one is answered. */
const MAX_PIPELINED = 16;
/** A request head the lean path takes, checked whole: its request line, then header lines whose names are tokens and whose values hold no CR, LF or NUL. */
const PLAIN_HEAD = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+ \/[!-~\x80-\xff]* HTTP\/1\.1(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\0\r\n]*)*$/;
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
