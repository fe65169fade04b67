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
import { lineEnd } from './http-messages.js';
import { UpstreamSocketError } from './upstream-request.js';

export interface AnswerHead {
  statusCode: number;
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

/** A status line, up to its CRLF (or the end of the head). */
const STATUS_LINE = /^HTTP\/1\.[01] \d{3}(?: [^\0\r\n]*)?(?:\r\n|$)/;
/** The header lines of a head, from its status line's end (sticky): a token, a colon, no stray CR, LF or NUL. */
const HEADER_LINES = /(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\0\r\n]*)*$/y;
const PLAIN_LENGTH = /^\d{1,15}$/;

/**
 * Reads `head` (the status line and header lines, without the blank line that ends them);
 * undefined for an interim (1xx) answer, which another head follows. `from`: the upstream, for
 * errors. `knownKeepAlive`: the Keep-Alive value the upstream sent last, not made again if it is
 * the same. The common names and values (Content-Length: digits, Connection: keep-alive,
 * Transfer-Encoding: chunked) are read in place, without a string made of them.
 */
export function readAnswerHead(head: string, from: string, knownKeepAlive = ''): AnswerHead | undefined {
  const statusEnd = lineEnd(head, 0);
  if (!STATUS_LINE.test(head)) throw new UpstreamSocketError(`${from} did not answer with HTTP/1.x`, 'EPROTO');
  HEADER_LINES.lastIndex = statusEnd;
  if (!HEADER_LINES.test(head)) throw new UpstreamSocketError(`${from} sent a malformed header line`, 'EPROTO');
  const statusCode = (head.charCodeAt(9) - 0x30) * 100 + (head.charCodeAt(10) - 0x30) * 10 + head.charCodeAt(11) - 0x30;
  if (statusCode >= 100 && statusCode < 200 && statusCode !== 101) return undefined;
  if (statusCode < 200) throw new UpstreamSocketError(`${from} answered ${statusCode}, which the gateway did not ask for`, 'EPROTO');
  const http10 = head.charCodeAt(7) === 0x30;
  // The status line goes on as it came if it can: HTTP/1.1 with a reason phrase.
  let text = http10 || statusEnd <= 13 ? `HTTP/1.1 ${statusCode} ${head.slice(13, statusEnd) || STATUS_CODES[statusCode] || 'Unknown'}` : '';
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
    const n = colon - start;
    // The value without the whitespace around it (SP and HTAB; anything else is read the slow way, with trim()).
    let vs = colon + 1;
    let ve = end;
    if (n === 14 && isAt(head, start, colon, 'content-length')) {
      while (vs < ve && isBlank(head.charCodeAt(vs))) vs++;
      while (ve > vs && isBlank(head.charCodeAt(ve - 1))) ve--;
      const digits = ve - vs <= 15 ? digitsAt(head, vs, ve) : -1;
      length = digits >= 0 && (length < 0 || length === digits) ? digits : contentLength(head.slice(colon + 1, end).trim(), length, from);
      hasLength = true;
      continue;
    }
    if (n === 10 || n === 17) {
      while (vs < ve && isBlank(head.charCodeAt(vs))) vs++;
      while (ve > vs && isBlank(head.charCodeAt(ve - 1))) ve--;
    }
    if (n === 10 && isAt(head, start, colon, 'connection')) {
      connection += isAt(head, vs, ve, 'keep-alive') ? ',keep-alive' : `,${head.slice(colon + 1, end).trim().toLowerCase()}`;
    } else if (n === 10 && isAt(head, start, colon, 'keep-alive')) {
      keepAliveHeader = ve - vs === knownKeepAlive.length && head.startsWith(knownKeepAlive, vs) ? knownKeepAlive : head.slice(colon + 1, end).trim();
    } else if (n === 17 && isAt(head, start, colon, 'transfer-encoding')) {
      // The common value is read without splitting it.
      chunked = isAt(head, vs, ve, 'chunked') || head.slice(colon + 1, end).toLowerCase().split(',').at(-1)?.trim() === 'chunked';
      otherCoding = !chunked;
    } else if (!isOtherHopByHop(head, start, colon)) continue;
    // Hop by hop: cut out, what came before it goes into the text.
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
  return { statusCode, text, fieldsAt, hasLength, length, chunked, otherCoding, keepAlive, keepAliveHeader };
}

/** The reason phrase of an answer head's status line (`text` always has one). */
export function statusText(head: Pick<AnswerHead, 'text' | 'fieldsAt'>): string {
  return head.text.slice(13, head.fieldsAt);
}

/** The name from `start` to `colon` is another of HOP_BY_HOP's (http-messages.ts), or Proxy-*: compared in place. */
function isOtherHopByHop(head: string, start: number, colon: number): boolean {
  const n = colon - start;
  return (n === 2 && isAt(head, start, colon, 'te')) || (n === 7 && (isAt(head, start, colon, 'trailer') || isAt(head, start, colon, 'upgrade'))) || (n > 6 && isAt(head, start, start + 6, 'proxy-'));
}

/** `text` from `start` to `end` is `lower` (lower case letters and -), whatever the case of its letters. */
function isAt(text: string, start: number, end: number, lower: string): boolean {
  if (end - start !== lower.length) return false;
  // Setting bit 5 lowers a letter, leaves - as it is, and makes a letter of no other character a head may hold here (CR is not).
  for (let i = 0; i < lower.length; i++) if ((text.charCodeAt(start + i) | 0x20) !== lower.charCodeAt(i)) return false;
  return true;
}

function isBlank(c: number): boolean {
  return c === 0x20 || c === 0x09;
}

/** The number the decimal digits from `start` to `end` make (at least one, all digits), else -1. */
function digitsAt(text: string, start: number, end: number): number {
  if (start === end) return -1;
  let value = 0;
  for (let i = start; i < end; i++) {
    const d = text.charCodeAt(i) - 0x30;
    if (d < 0 || d > 9) return -1;
    value = value * 10 + d;
  }
  return value;
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
