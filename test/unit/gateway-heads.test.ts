/**
 * The gateway's hot-path readers of HTTP heads and framing, as pure functions: an upstream
 * answer's head read in one pass (upstream-answer-head.ts), chunked framing read from bytes
 * (chunked-framing.ts), and a lean client request's head passed upstream as text
 * (http-messages.ts, upstreamHeadText), which must say what the list-based upstreamHeaders says.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { Socket } from 'node:net';
import { ChunkedFraming } from '../../src/gateway/chunked-framing.js';
import { LeanRequest } from '../../src/gateway/http-client-connection.js';
import { headerList, upstreamHeadText, upstreamHeaders } from '../../src/gateway/http-messages.js';
import { readAnswerHead, statusText } from '../../src/gateway/upstream-answer-head.js';

const FROM = 'upstream:1';

function read(head: string): NonNullable<ReturnType<typeof readAnswerHead>> {
  const answer = readAnswerHead(head, FROM);
  assert.ok(answer, 'not an interim answer');
  return answer;
}

function failsWithEproto(head: string): void {
  assert.throws(() => readAnswerHead(head, FROM), (err: Error & { code?: string }) => err.code === 'EPROTO', JSON.stringify(head));
}

describe('gateway: an upstream answer head', () => {
  it("passes node's answer head on without its hop-by-hop lines, and reads its framing and keep-alive", () => {
    const head = read('HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nDate: Wed, 02 Dec 2026 02:45:09 GMT\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked');
    assert.equal(head.text, 'HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nDate: Wed, 02 Dec 2026 02:45:09 GMT');
    assert.deepEqual([head.statusCode, statusText(head), head.chunked, head.length, head.hasLength, head.keepAlive, head.keepAliveHeader], [200, 'OK', true, -1, false, true, 'timeout=5']);
    assert.deepEqual(headerList(head.text, head.fieldsAt), ['content-type', 'text/plain', 'Date', 'Wed, 02 Dec 2026 02:45:09 GMT']);
  });

  it('cuts hop-by-hop lines wherever they are, those a Connection header names too, in any case', () => {
    const head = read(
      'HTTP/1.1 200 OK\r\nA: 1\r\nCONNECTION: close, X-Secret\r\nX-SECRET: s\r\nProxy-Authenticate: Basic\r\nTE: x\r\ntrailer: y\r\nUpgrade: h2c\r\nB:2 \r\nkeep-alive: timeout=9\r\nC: 3',
    );
    assert.equal(head.text, 'HTTP/1.1 200 OK\r\nA: 1\r\nB:2 \r\nC: 3');
    assert.equal(head.keepAlive, false);
    assert.deepEqual(headerList(head.text, head.fieldsAt), ['A', '1', 'B', '2', 'C', '3']);
  });

  it('reads names and values in any case and with blanks around values', () => {
    const length = read('HTTP/1.1 200 OK\r\ncontent-LENGTH:   7 \t');
    assert.deepEqual([length.length, length.hasLength, length.text], [7, true, 'HTTP/1.1 200 OK\r\ncontent-LENGTH:   7 \t']);
    assert.equal(read('HTTP/1.1 200 OK\r\nConnection:  Keep-Alive\r\nContent-Length: 0').keepAlive, true);
    assert.equal(read('HTTP/1.1 200 OK\r\nconnection: Close').keepAlive, false);
    const coded = read('HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, CHUNKED');
    assert.deepEqual([coded.chunked, coded.otherCoding], [true, false]);
    const other = read('HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip');
    assert.deepEqual([other.chunked, other.otherCoding], [false, true]);
    assert.equal(read('HTTP/1.1 200 OK\r\nContent-Length: 5, 5').length, 5);
  });

  it('makes an HTTP/1.1 status line for an HTTP/1.0 answer or one without a reason phrase', () => {
    const old = read('HTTP/1.0 404 Not Found\r\nContent-Length: 3');
    assert.deepEqual([old.text, old.keepAlive, old.length], ['HTTP/1.1 404 Not Found\r\nContent-Length: 3', false, 3]);
    assert.equal(read('HTTP/1.0 200 OK\r\nConnection: keep-alive').keepAlive, true);
    const bare = read('HTTP/1.1 204');
    assert.deepEqual([bare.text, statusText(bare), bare.fieldsAt], ['HTTP/1.1 204 No Content', 'No Content', 'HTTP/1.1 204 No Content'.length]);
    assert.equal(read('HTTP/1.1 299 \r\nX: y').text, 'HTTP/1.1 299 Unknown\r\nX: y');
  });

  it('does not pass on the Content-Length of an answer framed by Transfer-Encoding, and closes its connection', () => {
    const head = read('HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: y\r\nTransfer-Encoding: chunked');
    assert.deepEqual([head.chunked, head.length, head.hasLength, head.keepAlive, head.text], [true, -1, false, false, 'HTTP/1.1 200 OK\r\nX: y']);
  });

  it('skips interim answers and refuses a 101 and malformed heads', () => {
    assert.equal(readAnswerHead('HTTP/1.1 103 Early Hints\r\nLink: </a>', FROM), undefined);
    assert.equal(readAnswerHead('HTTP/1.1 100 Continue', FROM), undefined);
    for (const bad of [
      'HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c',
      'HTTP/2 200 OK',
      'HTTP/1.1 20 OK',
      'SMTP ready',
      'HTTP/1.1 200 O\0K',
      'HTTP/1.1 200 OK\r\nA: x\ny',
      'HTTP/1.1 200 OK\r\nA: x\0y',
      'HTTP/1.1 200 OK\r\nBad Name: x',
      'HTTP/1.1 200 OK\r\n folded: x',
      'HTTP/1.1 200 OK\r\nContent-Length: 5, 6',
      'HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6',
      'HTTP/1.1 200 OK\r\nContent-Length: -1',
      'HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456',
    ]) {
      failsWithEproto(bad);
    }
  });

  it('passes a large head on whole', () => {
    const lines = Array.from({ length: 500 }, (_, i) => `X-Field-${i}: ${'v'.repeat(i % 50)}`);
    const head = read(`HTTP/1.1 200 OK\r\n${lines.join('\r\n')}\r\nConnection: keep-alive\r\nContent-Length: 2`);
    assert.equal(head.text, `HTTP/1.1 200 OK\r\n${lines.join('\r\n')}\r\nContent-Length: 2`);
    assert.equal(headerList(head.text, head.fieldsAt).length, 1002);
  });
});

/** Feeds `body` to a framing `split` bytes at a time; the data it passes, and where the body ended in `body`. */
function frame(body: string, split: number): { data: string; end: number } {
  const framing = new ChunkedFraming(FROM);
  const bytes = Buffer.from(body, 'latin1');
  let data = '';
  for (let from = 0; from < bytes.length; from += split) {
    const chunk = bytes.subarray(from, Math.min(bytes.length, from + split));
    let at = 0;
    while (at < chunk.length && !framing.done) {
      if (framing.inData) {
        const take = Math.min(framing.remaining, chunk.length - at);
        data += chunk.toString('latin1', at, at + take);
        at += take;
        framing.consumed(take);
      } else at = framing.read(chunk, at);
    }
    if (framing.done) return { data, end: from + at };
  }
  return { data, end: -1 };
}

describe('gateway: chunked framing read from bytes', () => {
  it('reads sizes, extensions, blanks and trailers, split anywhere, and stops at the end of the body', () => {
    const body = '3;ext=1\r\nabc\r\nA \t\r\n0123456789\r\nff\r\n' + 'z'.repeat(255) + '\r\n0\r\nX-Trailer: t\r\nY: u\r\n\r\nGET /next';
    for (const split of [1, 2, 3, 7, body.length]) {
      const { data, end } = frame(body, split);
      assert.equal(data, `abc0123456789${'z'.repeat(255)}`, `split ${split}`);
      assert.equal(body.slice(end), 'GET /next', `split ${split}`);
    }
    assert.deepEqual(frame('0\r\n\r\n', 1), { data: '', end: 5 });
    // A trailer line ending in CR CR LF is not the blank line.
    assert.deepEqual(frame('0\r\nA: b\r\r\n\r\n', 1), { data: '', end: 12 });
  });

  it('refuses bad framing', () => {
    for (const bad of ['\r\n', ' 5\r\nhello\r\n', 'x\r\n', '5 x\r\n', '5;a\nb\r\n', '5\rx', '3\r\nabcX\r\n', '3\r\nabc\rX', '1234567890abc\r\n', `1;${'e'.repeat(70_000)}\r\n`, `0\r\n${'t'.repeat(70_000)}`]) {
      assert.throws(() => frame(bad, 1), (err: Error & { code?: string }) => err.code === 'EPROTO', JSON.stringify(bad.slice(0, 20)));
    }
  });
});

function leanRequest(head: string, remoteAddress = '::ffff:127.0.0.1'): LeanRequest {
  const methodEnd = head.indexOf(' ');
  const urlEnd = head.indexOf(' ', methodEnd + 1);
  const fieldsAt = head.indexOf('\r\n') < 0 ? head.length : head.indexOf('\r\n');
  const list = headerList(head, fieldsAt);
  const header = (name: string): string | undefined => {
    const values: string[] = [];
    for (let i = 0; i < list.length; i += 2) if (list[i].toLowerCase() === name) values.push(list[i + 1]);
    return values.length ? values.join(', ') : undefined;
  };
  const connection = header('connection');
  return new LeanRequest(head.slice(0, methodEnd), head.slice(methodEnd + 1, urlEnd), head, fieldsAt, { host: header('host') ?? '', ...(connection ? { connection } : {}) }, {
    remoteAddress,
  } as Socket);
}

describe('gateway: a lean request head passed upstream as text', () => {
  it('says what the list-based upstreamHeaders says, lines as they came', () => {
    const heads = [
      'GET /health HTTP/1.1\r\nHost: 127.0.0.1:38182',
      'GET / HTTP/1.1\r\nhost:x\r\nAccept: */*\r\nUser-Agent: curl/8',
      'GET /a?b=c HTTP/1.1\r\nHost: app.example\r\nConnection: keep-alive, X-Client-Secret\r\nX-Client-Secret: hidden\r\nKeep-Alive: timeout=99\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\nX-Kept: yes',
      'DELETE /x HTTP/1.1\r\nX-Forwarded-For: 203.0.113.9\r\nHost: h\r\nx-forwarded-for: 198.51.100.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: front.example\r\nTrailer: t',
      'OPTIONS /o HTTP/1.1\r\nHost: h\r\nconnection: close',
    ];
    for (const head of heads) {
      const req = leanRequest(head);
      const text = upstreamHeadText(req);
      const fieldsAt = text.indexOf('\r\n');
      assert.equal(text.slice(0, fieldsAt), head.slice(0, head.indexOf('\r\n')), 'the request line goes on as it came');
      assert.deepEqual(headerList(text, fieldsAt), upstreamHeaders(req), head);
    }
    const text = upstreamHeadText(leanRequest('GET /h HTTP/1.1\r\nHost: h\r\nX-Odd:  spaced  \r\nTE: trailers'));
    assert.equal(text, 'GET /h HTTP/1.1\r\nHost: h\r\nX-Odd:  spaced  \r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: h');
  });
});
