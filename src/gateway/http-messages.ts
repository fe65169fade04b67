/**
 * HTTP messages on their way through a route's proxy: request bodies read (whole, or up to a
 * limit and then streamed), and request headers rewritten for the other hop (hop-by-hop ones
 * removed, X-Forwarded-* set); an answer's are as its head is read (upstream-answer-head.ts).
 * docs/gateway.md, "HTTP proxying".
 */
import type { IncomingMessage } from 'node:http';
import { Readable } from 'node:stream';
import { ChipmunkError } from '../shared/errors.js';
import type { ClientRequest } from './http-client-connection.js';

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

/** Headers of one connection, not of the message (RFC 9110 7.6.1); also Proxy-*, and any a Connection header names. */
export const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'te', 'trailer', 'transfer-encoding', 'upgrade']);

export interface RequestBody {
  payload: Buffer | Readable | null;
  /** Whole in memory, so it can be sent again. */
  replayable: boolean;
  /** What was read of it so far (all of it, or the read-ahead of a body that streams). */
  bytesInMemory: number;
}

export const NO_BODY: RequestBody = { payload: null, replayable: true, bytesInMemory: 0 };

/** The request has no body at all (most GETs): nothing to read, and no need to wait for it. */
export function hasNoBody(req: ClientRequest): boolean {
  const length = req.headers['content-length'];
  return req.headers['transfer-encoding'] === undefined && (length === undefined || length === '0');
}

/** The request body: read whole if it is at most `limit` bytes, else streamed (and never sent twice). */
export async function readBody(req: IncomingMessage, limit: number): Promise<RequestBody> {
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
export async function readLoggedBody(req: IncomingMessage, route: string, limit: number): Promise<RequestBody> {
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

/**
 * The client's headers as the upstream gets them: hop-by-hop ones removed (also any named in
 * Connection, and Expect: node answered 100-continue already, and the upstream's interim answers are not passed on), the
 * X-Forwarded-* set. X-Forwarded-For is appended to; Proto and Host are kept if a proxy in
 * front of the gateway set them.
 */
export function upstreamHeaders(req: ClientRequest): string[] {
  const raw = req.rawHeaders;
  const named = connectionOptions(req.headers.connection);
  const out: string[] = [];
  const seen: ForwardedSeen = { forwardedFor: undefined, proto: false, host: false };
  for (let i = 0; i < raw.length; i += 2) if (keptUpstream(raw[i], raw[i + 1], named, seen)) out.push(raw[i], raw[i + 1]);
  out.push('x-forwarded-for', forwardedFor(req, seen));
  if (!seen.proto) out.push('x-forwarded-proto', 'http');
  if (!seen.host && req.headers.host !== undefined) out.push('x-forwarded-host', req.headers.host);
  return out;
}

/**
 * upstreamHeaders' rules on the text of a lean client request's head (its request line, then
 * each header line after a CRLF): the head the upstream gets, lines passed on as they came,
 * without the CRLFs that end it. Slicing the head into a list and joining it again cost more
 * than all the rest of sending a request.
 */
export function upstreamHeadText(req: ClientRequest & { readonly head: string; readonly fieldsAt: number }): string {
  const { head } = req;
  const named = connectionOptions(req.headers.connection);
  const seen: ForwardedSeen = { forwardedFor: undefined, proto: false, host: false };
  let out = '';
  /** Where the run of lines passed on unchanged, not yet in `out`, began. */
  let runStart = 0;
  for (let at = req.fieldsAt; at < head.length; ) {
    const start = at + 2;
    const colon = head.indexOf(':', start);
    const end = lineEnd(head, colon);
    at = end;
    // Most names are passed on without a string made of them (keptUpstream's first test, on the text).
    if (named === undefined && WATCHED_LENGTH[colon - start] !== true && (head.charCodeAt(start) | 0x20) !== 0x70) continue;
    if (keptUpstream(head.slice(start, colon), head.slice(colon + 1, end).trim(), named, seen)) continue;
    out += head.slice(runStart, start - 2);
    runStart = end;
  }
  out += head.slice(runStart);
  out += `\r\nx-forwarded-for: ${forwardedFor(req, seen)}`;
  if (!seen.proto) out += '\r\nx-forwarded-proto: http';
  if (!seen.host && req.headers.host !== undefined) out += `\r\nx-forwarded-host: ${req.headers.host}`;
  return out;
}

/** The X-Forwarded-* headers a client's request came with. */
interface ForwardedSeen {
  /** Its X-Forwarded-For values, joined. */
  forwardedFor: string | undefined;
  proto: boolean;
  host: boolean;
}

/** Whether a client's header goes upstream as it is (upstreamHeaders' rules); notes the X-Forwarded-* ones in `seen`. */
function keptUpstream(name: string, value: string, named: Set<string> | undefined, seen: ForwardedSeen): boolean {
  const lower = watchedName(name, named);
  if (lower === '') return true;
  if (isHopByHop(lower, named) || lower === 'expect') return false;
  if (lower === 'x-forwarded-for') {
    seen.forwardedFor = seen.forwardedFor === undefined ? value : `${seen.forwardedFor}, ${value}`;
    return false;
  }
  if (lower === 'x-forwarded-proto') seen.proto = true;
  else if (lower === 'x-forwarded-host') seen.host = true;
  return true;
}

function forwardedFor(req: ClientRequest, seen: ForwardedSeen): string {
  const client = clientAddress(req);
  return seen.forwardedFor === undefined ? client : `${seen.forwardedFor}, ${client}`;
}

/** Where the line around `from` in a head's text ends (its CRLF), or the end of the text. */
export function lineEnd(text: string, from: number): number {
  const end = text.indexOf('\r\n', from);
  return end < 0 ? text.length : end;
}

/** The header lines of a head's text (each after a CRLF, from `fieldsAt` on) as [name, value, ...], values trimmed. */
export function headerList(text: string, fieldsAt: number): string[] {
  const out: string[] = [];
  for (let at = fieldsAt; at < text.length; ) {
    const colon = text.indexOf(':', at + 2);
    const end = lineEnd(text, colon);
    out.push(text.slice(at + 2, colon), text.slice(colon + 1, end).trim());
    at = end;
  }
  return out;
}

/**
 * Lengths of the header names the proxy acts on (hop-by-hop ones, Expect, X-Forwarded-*; Proxy-*
 * are told by their first letter): the others are passed on without being lowered, on the hot path.
 */
const WATCHED_LENGTH = [2, 6, 7, 10, 15, 16, 17].reduce((watched, n) => ((watched[n] = true), watched), [] as boolean[]);

/** The name lowered if the proxy may act on it (any name if a Connection header named others), else ''. */
function watchedName(name: string, named: Set<string> | undefined): string {
  if (named === undefined && WATCHED_LENGTH[name.length] !== true && (name.charCodeAt(0) | 0x20) !== 0x70) return '';
  return name.toLowerCase();
}

function isHopByHop(lowerName: string, named: Set<string> | undefined): boolean {
  return HOP_BY_HOP.has(lowerName) || lowerName.startsWith('proxy-') || (named !== undefined && named.has(lowerName));
}

/** Header names listed in a Connection header (besides keep-alive/close, which are hop-by-hop anyway). */
function connectionOptions(value: string | undefined): Set<string> | undefined {
  if (!value) return undefined;
  // Many requests carry one of these alone: nothing to split.
  if ((value.length === 10 || value.length === 5) && (value === 'keep-alive' || value === 'close' || /^(?:keep-alive|close)$/i.test(value))) return undefined;
  const names = value.split(',').map((token) => token.trim().toLowerCase()).filter((token) => token && token !== 'close' && token !== 'keep-alive');
  return names.length ? new Set(names) : undefined;
}

function clientAddress(req: ClientRequest): string {
  const address = req.socket.remoteAddress ?? 'unknown';
  // An IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d; upstreams expect a.b.c.d.
  return address.startsWith('::ffff:') ? address.slice(7) : address;
}
