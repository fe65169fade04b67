/**
 * An upstream answer's head (RFC 9112), read in one pass on the proxy's hot path: its status,
 * its body's framing, whether the connection stays open after it, and its end-to-end header
 * lines as they came, hop-by-hop ones (RFC 9110 7.6.1) cut out. A lean client connection writes
 * that text on as it is (http-client-connection.ts); node's ServerResponse gets it as a list
 * (http-messages.ts, headerList). Splitting the head into one string per line and per name and value cost more
 * than all the rest of reading an answer.
 *
 * Framing follows RFC 9112 6.3: chunked if the last transfer coding is chunked; else
 * Content-Length (a list of equal values allowed, anything else an error); else until the
 * upstream closes. An answer with both Transfer-Encoding and Content-Length is read by the
 * former, its Content-Length is not passed on, and its connection is closed after it.
 */
import { STATUS_CODES } from 'node:http';
import { HOP_BY_HOP, lineEnd } from './http-messages.js';
import { UpstreamSocketError } from './upstream-request.js';

export interface AnswerHead {
  statusCode: number;
  /** The reason phrase as sent ('' if none). */
  statusText: string;
  /**
   * What the client gets of the head: an HTTP/1.1 status line, then each end-to-end header line
   * after a CRLF, as received ("HTTP/1.1 200 OK\r\nA: 1\r\nB: 2"); no CRLF at its end.
   */
  text: string;
  /** Where the header lines begin in `text` (the status line's length). */
  fieldsAt: number;
  /** A Content-Length is among the header lines passed on. */
  hasLength: boolean;
  /** The body's length by Content-Length, or -1. */
  length: number;
  chunked: boolean;
  /** A transfer coding other than chunked last: the body lasts until the upstream closes. */
  otherCoding: boolean;
  /** The connection may carry another request after this answer, as far as the head says. */
  keepAlive: boolean;
  /** The Keep-Alive header's value, if any. */
  keepAliveHeader: string | undefined;
}

const HTTP_1X = /^HTTP\/1\.[01] \d{3}(?: [^\0\r\n]*)?$/;
/** The header lines of a head, after its status line: a token, a colon, no stray CR, LF or NUL. */
const HEADER_LINES = /^(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\0\r\n]*)*$/;
const PLAIN_LENGTH = /^\d{1,15}$/;

/**
 * Lengths of the names the reader acts on (hop-by-hop ones, Content-Length; Proxy-* are told by
 * their first letter): the others are passed on without being sliced or lowered.
 */
const WATCHED_LENGTH = [2, 7, 10, 14, 17].reduce((watched, n) => ((watched[n] = true), watched), [] as boolean[]);

/**
 * Reads `head` (the status line and header lines, without the blank line that ends them);
 * undefined for an interim (1xx) answer, which another head follows. `from`: the upstream, for errors.
 */
export function readAnswerHead(head: string, from: string): AnswerHead | undefined {
  const statusEnd = lineEnd(head, 0);
  if (!HTTP_1X.test(statusEnd === head.length ? head : head.slice(0, statusEnd))) throw new UpstreamSocketError(`${from} did not answer with HTTP/1.x`, 'EPROTO');
  if (statusEnd < head.length && !HEADER_LINES.test(head.slice(statusEnd))) throw new UpstreamSocketError(`${from} sent a malformed header line`, 'EPROTO');
  const statusCode = Number(head.slice(9, 12));
  if (statusCode >= 100 && statusCode < 200 && statusCode !== 101) return undefined;
  if (statusCode < 200) throw new UpstreamSocketError(`${from} answered ${statusCode}, which the gateway did not ask for`, 'EPROTO');
  const http10 = head.charCodeAt(7) === 0x30;
  const statusText = statusEnd > 13 ? head.slice(13, statusEnd) : '';
  // The status line goes on as it came if it can: HTTP/1.1 with a reason phrase.
  let text = http10 || statusText === '' ? `HTTP/1.1 ${statusCode} ${statusText || STATUS_CODES[statusCode] || 'Unknown'}` : '';
  /** Where the run of lines passed on unchanged, not yet in `text`, began. */
  let runStart = text === '' ? 0 : statusEnd;
  const fieldsAt = text === '' ? statusEnd : text.length;
  let length = -1;
  let hasLength = false;
  let chunked = false;
  let otherCoding = false;
  let connection = '';
  let keepAliveHeader: string | undefined;
  for (let at = statusEnd; at < head.length; ) {
    const start = at + 2;
    const colon = head.indexOf(':', start);
    const end = lineEnd(head, colon);
    at = end;
    const nameLength = colon - start;
    if (WATCHED_LENGTH[nameLength] !== true && (head.charCodeAt(start) | 0x20) !== 0x70) continue;
    const name = head.slice(start, colon).toLowerCase();
    if (name === 'content-length') {
      length = contentLength(head.slice(colon + 1, end).trim(), length, from);
      hasLength = true;
      continue;
    }
    if (!HOP_BY_HOP.has(name) && !name.startsWith('proxy-')) continue;
    const value = head.slice(colon + 1, end).trim();
    if (name === 'transfer-encoding') {
      // The common value is read without splitting it.
      const lowered = value.toLowerCase();
      chunked = lowered === 'chunked' || lowered.split(',').at(-1)?.trim() === 'chunked';
      otherCoding = !chunked;
    } else if (name === 'connection') connection += `,${value.toLowerCase()}`;
    else if (name === 'keep-alive') keepAliveHeader = value;
    // Cut out: what came before it goes into the text.
    text += head.slice(runStart, start - 2);
    runStart = end;
  }
  text += head.slice(runStart);
  let keepAlive: boolean;
  let named: Set<string> | undefined;
  if (connection === '') keepAlive = !http10;
  else if (connection === ',keep-alive') keepAlive = true;
  else {
    const tokens = connection.split(',').map((t) => t.trim());
    keepAlive = http10 ? tokens.includes('keep-alive') : !tokens.includes('close');
    const others = tokens.filter((t) => t !== '' && t !== 'close' && t !== 'keep-alive');
    if (others.length) named = new Set(others);
  }
  if ((chunked || otherCoding) && length >= 0) {
    // Framed by its transfer coding: its Content-Length is wrong for the client, and for the connection.
    keepAlive = false;
    length = -1;
    hasLength = false;
    (named ??= new Set()).add('content-length');
  }
  if (named) text = withoutFields(text, fieldsAt, named);
  return { statusCode, statusText, text, fieldsAt, hasLength, length, chunked, otherCoding, keepAlive, keepAliveHeader };
}

/** The body length `value` gives, checked against what an earlier Content-Length gave (-1: none). */
function contentLength(value: string, earlier: number, from: string): number {
  if (PLAIN_LENGTH.test(value) && (earlier < 0 || earlier === Number(value))) return Number(value);
  const values = value.split(',').map((v) => v.trim());
  if (!values.every((v) => PLAIN_LENGTH.test(v) && v === values[0]) || (earlier >= 0 && earlier !== Number(values[0]))) {
    throw new UpstreamSocketError(`${from} sent a bad Content-Length`, 'EPROTO');
  }
  return Number(values[0]);
}

/** `text` without the header lines whose (lowered) names are in `names`. */
function withoutFields(text: string, fieldsAt: number, names: Set<string>): string {
  let out = text.slice(0, fieldsAt);
  for (let at = fieldsAt; at < text.length; ) {
    const colon = text.indexOf(':', at + 2);
    const end = lineEnd(text, colon);
    if (!names.has(text.slice(at + 2, colon).toLowerCase())) out += text.slice(at, end);
    at = end;
  }
  return out;
}
