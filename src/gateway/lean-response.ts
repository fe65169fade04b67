/**
 * The answer to a request of a lean client connection (http-client-connection.ts): its head
 * (the upstream's text as it came, or one made from a list), its framing (chunked unless it has a
 * Content-Length; none for HEAD, 204 and 304), and its turn among the answers pipelined on the
 * connection: only the oldest unfinished answer writes, the next ones buffer theirs (and tell the
 * upstream to wait) until their turn. An answer's head and the body bytes of one tick leave in one
 * write.
 */
import { STATUS_CODES } from 'node:http';
import type { ClientAnswer, ClientConnection } from './http-client-connection.js';
import type { AnswerHead } from './upstream-answer-head.js';

/** node's keep-alive time-out, told to clients. */
export const KEEP_ALIVE_MS = 5_000;
/** Body chunks up to this size are copied into the answer's text, so head and body leave in one write. */
const COPY_BYTES = 16 * 1024;
/** A status line and header lines, each after a CRLF, with no other CR, LF or NUL; names are tokens. */
const WELL_FORMED_HEAD = /^HTTP\/1\.1 \d{3} [^\0\r\n]*(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+: [^\0\r\n]*)*$/;
/** The end of every answer's head: its framing (unless it has a Content-Length) and the connection's own lines. */
const CHUNKED_LINE = '\r\ntransfer-encoding: chunked';
const KEEP_ALIVE_END = `\r\nconnection: keep-alive\r\nkeep-alive: timeout=${KEEP_ALIVE_MS / 1000}\r\n\r\n`;
const CLOSE_END = '\r\nconnection: close\r\n\r\n';
/** Statuses that have no body (RFC 9110 6.4.1). */
const BODYLESS_STATUS = (status: number): boolean => status < 200 || status === 204 || status === 304;

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
