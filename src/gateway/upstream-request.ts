/**
 * A request on its way out of an upstream connection (upstream-connection.ts): its head, with
 * the body's framing set by the gateway (Content-Length of the body actually sent; a stream
 * with the client's Content-Length if it had one, else chunked), and a streamed body written
 * with backpressure.
 */
import type { Socket } from 'node:net';
import type { Readable } from 'node:stream';

export interface UpstreamRequest {
  method: string;
  /** Path and query. */
  path: string;
  /**
   * [name, value, ...] as sent (hop-by-hop ones removed already); or, as text, the whole head
   * but its framing: the request line, then each header line after a CRLF, Host among them,
   * checked already for characters that cannot be sent (a lean client request's, upstreamHeadText).
   */
  headers: string[] | string;
  body: Buffer | Readable | null;
}

/** An upstream connection failure, with a code as node's own errors have. */
export class UpstreamSocketError extends Error {
  constructor(
    message: string,
    readonly code: string,
  ) {
    super(message);
  }
}

/** A header name (RFC 9110 token). */
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
/** CR, LF and NUL end a header line early: never let one into a request head. */
const UNSAFE_IN_HEAD = /[\r\n\0]/;
const BODYLESS_REQUEST_METHODS = new Set(['GET', 'HEAD', 'DELETE', 'OPTIONS', 'TRACE', 'CONNECT']);

export interface RequestHead {
  text: string;
  /** The body goes chunk-encoded. */
  chunked: boolean;
}

/** The request's head: request line, its headers (Host added if missing) and the body's framing. */
export function requestHead(request: UpstreamRequest, host: string, port: number): RequestHead {
  const { headers, body } = request;
  if (typeof headers === 'string') {
    // Only a lean client request comes so, and it has no body.
    if (body !== null) throw new Error('a request head given as text cannot have a body');
    return { text: BODYLESS_REQUEST_METHODS.has(request.method) ? `${headers}\r\n\r\n` : `${headers}\r\ncontent-length: 0\r\n\r\n`, chunked: false };
  }
  if (UNSAFE_IN_HEAD.test(request.path) || !TOKEN.test(request.method)) throw new UpstreamSocketError('the request line holds characters that cannot be sent', 'EINVAL');
  let head = `${request.method} ${request.path} HTTP/1.1\r\n`;
  let hasHost = false;
  let streamLength: string | undefined;
  for (let i = 0; i < headers.length; i += 2) {
    const name = headers[i];
    const value = headers[i + 1];
    if (!TOKEN.test(name) || UNSAFE_IN_HEAD.test(value)) throw new UpstreamSocketError(`header ${JSON.stringify(name)} holds characters that cannot be sent`, 'EINVAL');
    if (name.length === 14 && name.toLowerCase() === 'content-length') {
      // Framing is the proxy's: set below from the body actually sent.
      streamLength = value;
      continue;
    }
    if (name.length === 4 && name.toLowerCase() === 'host') hasHost = true;
    head += `${name}: ${value}\r\n`;
  }
  if (!hasHost) head += `host: ${host.includes(':') ? `[${host}]` : host}:${port}\r\n`;
  let chunked = false;
  if (body === null) {
    if (!BODYLESS_REQUEST_METHODS.has(request.method)) head += 'content-length: 0\r\n';
  } else if (Buffer.isBuffer(body)) head += `content-length: ${body.length}\r\n`;
  else if (streamLength !== undefined && /^\d+$/.test(streamLength)) head += `content-length: ${streamLength}\r\n`;
  else {
    head += 'transfer-encoding: chunked\r\n';
    chunked = true;
  }
  return { text: `${head}\r\n`, chunked };
}

/**
 * Writes a streamed request body to `socket` with backpressure (chunk-encoded if `chunked`);
 * returns what stops it early. `onError`: the body's stream failed.
 */
export function writeStreamedBody(body: Readable, socket: Socket, chunked: boolean, onError: (err: Error) => void): () => void {
  const stop = (): void => {
    body.off('data', onData);
    body.off('end', onEnd);
    body.off('error', onFailed);
    socket.off('drain', onDrain);
    socket.off('close', stop);
  };
  const onData = (chunk: Buffer): void => {
    const ok = chunked ? (socket.write(`${chunk.length.toString(16)}\r\n`, 'latin1'), socket.write(chunk), socket.write('\r\n', 'latin1')) : socket.write(chunk);
    if (!ok) body.pause();
  };
  const onDrain = (): void => {
    body.resume();
  };
  const onEnd = (): void => {
    stop();
    if (chunked) socket.write('0\r\n\r\n', 'latin1');
  };
  const onFailed = (err: Error): void => {
    stop();
    onError(err);
  };
  body.on('data', onData);
  body.once('end', onEnd);
  body.once('error', onFailed);
  socket.on('drain', onDrain);
  socket.once('close', stop);
  return stop;
}
