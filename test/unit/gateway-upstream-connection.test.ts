/**
 * The gateway's HTTP/1.1 upstream connection (src/gateway/upstream-connection.ts, upstream-request.ts) against real
 * servers on loopback: answers written one byte at a time (every split a parser can meet),
 * framing by length, chunks (extensions, trailers), close; bodiless answers; interim answers;
 * keep-alive and its end; malformed answers; the request's own framing; backpressure.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createServer as createHttpServer, type IncomingMessage } from 'node:http';
import { createServer, type Server, type Socket } from 'node:net';
import { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { headerList } from '../../src/gateway/http-messages.js';
import { UpstreamConnection, type UpstreamHandler } from '../../src/gateway/upstream-connection.js';
import type { UpstreamRequest } from '../../src/gateway/upstream-request.js';
import { freePort } from './gateway-env.js';

interface Outcome {
  connected: boolean;
  status?: number;
  headers?: string[];
  body: Buffer;
  error?: Error & { code?: string };
}

/** Sends one request and collects what the handler is told. `pauseEvery`: onData returns false after that many chunks, resumed 10 ms later. */
function exchange(conn: UpstreamConnection, request: Partial<UpstreamRequest>, pauseEvery = 0): Promise<Outcome> {
  return new Promise((resolve) => {
    const outcome: Outcome = { connected: false, body: Buffer.alloc(0) };
    const chunks: Buffer[] = [];
    let resumeFn: (() => void) | undefined;
    let paused = false;
    const handler: UpstreamHandler = {
      onConnect: () => (outcome.connected = true),
      onHeaders: (head, reading) => {
        outcome.status = head.statusCode;
        outcome.headers = headerList(head.text, head.fieldsAt);
        resumeFn = () => reading.resume(handler);
      },
      onData: (chunk) => {
        assert.equal(paused, false, 'onData while paused');
        chunks.push(Buffer.from(chunk));
        if (pauseEvery && chunks.length % pauseEvery === 0) {
          paused = true;
          setTimeout(() => {
            paused = false;
            resumeFn?.();
          }, 10);
          return false;
        }
        return true;
      },
      onComplete: () => resolve({ ...outcome, body: Buffer.concat(chunks) }),
      onError: (error) => resolve({ ...outcome, body: Buffer.concat(chunks), error }),
    };
    conn.send({ method: 'GET', path: '/', headers: ['host', 'test'], body: null, ...request }, handler);
  });
}

/** A server that answers each request (read up to its blank line) with the next of `answers`, one byte per write. */
async function scriptedServer(answers: string[], opts: { closeAfter?: boolean } = {}): Promise<{ server: Server; port: number; connections: () => number; close(): Promise<void> }> {
  let connections = 0;
  let next = 0;
  const sockets = new Set<Socket>();
  const server = createServer((socket: Socket) => {
    connections++;
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
    let buffered = '';
    socket.on('error', () => undefined);
    socket.on('data', async (data) => {
      buffered += data.toString('latin1');
      while (buffered.includes('\r\n\r\n')) {
        const end = buffered.indexOf('\r\n\r\n') + 4;
        buffered = buffered.slice(end);
        const answer = answers[next++] ?? '';
        for (const byte of Buffer.from(answer, 'latin1')) {
          socket.write(Buffer.from([byte]));
          await sleep(0);
        }
        if (opts.closeAfter) socket.end();
      }
    });
  });
  const port = await freePort();
  await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve));
  // A test that fails half-way must not keep the test process alive.
  server.unref();
  return { server, port, connections: () => connections, close: () => close(server, sockets) };
}

function close(server: Server, sockets: Set<Socket>): Promise<void> {
  for (const socket of sockets) socket.destroy();
  return new Promise((resolve) => server.close(() => resolve()));
}

const noop = (): void => undefined;

describe('gateway: upstream connection', () => {
  it('reads answers split at every byte: by length, chunked (extensions, trailers), and keeps the connection', { timeout: 10_000 }, async () => {
    const s = await scriptedServer([
      'HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello',
      'HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n',
      'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n',
    ]);
    const conn = new UpstreamConnection('127.0.0.1', s.port, noop, noop);
    const first = await exchange(conn, {});
    assert.equal(first.status, 200);
    assert.deepEqual(first.headers, ['Content-Length', '5', 'X-A', '1']);
    assert.equal(first.body.toString(), 'hello');
    const second = await exchange(conn, {});
    assert.equal(second.error, undefined);
    assert.equal(second.status, 201);
    assert.equal(second.body.toString(), 'abc0123456789');
    const third = await exchange(conn, {});
    assert.equal(third.status, 200);
    assert.equal(third.body.length, 0);
    assert.equal(s.connections(), 1);
    conn.destroy(new Error('done'));
    await s.close();
  });

  it('reads no body after HEAD, 204 and 304; skips interim answers', { timeout: 10_000 }, async () => {
    const s = await scriptedServer([
      'HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n',
      'HTTP/1.1 204 No Content\r\n\r\n',
      'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n',
      'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok',
    ]);
    const conn = new UpstreamConnection('127.0.0.1', s.port, noop, noop);
    const head = await exchange(conn, { method: 'HEAD' });
    assert.deepEqual([head.status, head.body.length, head.error], [200, 0, undefined]);
    const noContent = await exchange(conn, {});
    assert.deepEqual([noContent.status, noContent.body.length], [204, 0]);
    const notModified = await exchange(conn, {});
    assert.deepEqual([notModified.status, notModified.body.length], [304, 0]);
    const last = await exchange(conn, {});
    assert.equal(last.body.toString(), 'ok');
    assert.equal(s.connections(), 1);
    conn.destroy(new Error('done'));
    await s.close();
  });

  it('reads a body without length until the close, and opens a new connection after it or after Connection: close', { timeout: 10_000 }, async () => {
    const s = await scriptedServer(['HTTP/1.1 200 OK\r\n\r\nuntil the end', 'HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye', 'HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok'], {
      closeAfter: true,
    });
    const conn = new UpstreamConnection('127.0.0.1', s.port, noop, noop);
    assert.equal((await exchange(conn, {})).body.toString(), 'until the end');
    assert.equal((await exchange(conn, {})).body.toString(), 'bye');
    assert.equal((await exchange(conn, {})).body.toString(), 'ok');
    assert.equal(s.connections(), 3);
    await s.close();
  });

  it('fails malformed answers and answers cut short; a refused connection was never written to', { timeout: 10_000 }, async () => {
    const s = await scriptedServer(['HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello', 'HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort', 'SMTP ready\r\n\r\n'], { closeAfter: true });
    const conn = new UpstreamConnection('127.0.0.1', s.port, noop, noop);
    const badLength = await exchange(conn, {});
    assert.equal(badLength.error?.code, 'EPROTO');
    const cut = await exchange(conn, {});
    assert.deepEqual([cut.connected, cut.status, cut.error?.code], [true, 200, 'ECONNRESET']);
    const notHttp = await exchange(conn, {});
    assert.equal(notHttp.error?.code, 'EPROTO');
    await s.close();
    const refused = await exchange(new UpstreamConnection('127.0.0.1', s.port, noop, noop), {});
    assert.deepEqual([refused.connected, refused.error?.code], [false, 'ECONNREFUSED']);
  });

  it('fails an answer whose header lines hold a stray LF or NUL, or a name that is not a token, before its head is passed on', { timeout: 10_000 }, async () => {
    const s = await scriptedServer(
      ['HTTP/1.1 200 OK\r\nX-A: one\ntwo\r\nContent-Length: 0\r\n\r\n', 'HTTP/1.1 200 OK\r\nX-B: a\0b\r\nContent-Length: 0\r\n\r\n', 'HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n'],
      { closeAfter: true },
    );
    for (let i = 0; i < 3; i++) {
      const outcome = await exchange(new UpstreamConnection('127.0.0.1', s.port, noop, noop), {});
      // No head reached the handler: the client gets a 502, not an answer cut after its head.
      assert.deepEqual([outcome.error?.code, outcome.status], ['EPROTO', undefined], `answer ${i + 1}`);
    }
    await s.close();
  });

  it('frames request bodies itself (length of the body sent, chunked for a stream of unknown length) and refuses header injection', { timeout: 10_000 }, async () => {
    const seen: Array<{ headers: IncomingMessage['headers']; body: string }> = [];
    const server = createHttpServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        seen.push({ headers: req.headers, body: Buffer.concat(chunks).toString() });
        res.end('ok');
      });
    });
    const port = await freePort();
    await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve));
  // A test that fails half-way must not keep the test process alive.
  server.unref();
    const conn = new UpstreamConnection('127.0.0.1', port, noop, noop);
    await exchange(conn, { method: 'POST', headers: ['Content-Length', '999'], body: Buffer.from('twelve bytes') });
    await exchange(conn, { method: 'PUT', headers: [], body: Readable.from([Buffer.from('a'), Buffer.from('bc')]) });
    await exchange(conn, { method: 'POST', headers: [], body: null });
    await exchange(conn, { method: 'PUT', headers: ['x-transfer-encoding', 'chunked', 'content-length', '3'], body: Readable.from([Buffer.from('xyz')]) });
    assert.deepEqual(
      seen.map((s) => [s.headers['content-length'], s.headers['transfer-encoding'], s.body, s.headers.host]),
      [
        ['12', undefined, 'twelve bytes', `127.0.0.1:${port}`],
        [undefined, 'chunked', 'abc', `127.0.0.1:${port}`],
        ['0', undefined, '', `127.0.0.1:${port}`],
        ['3', undefined, 'xyz', `127.0.0.1:${port}`],
      ],
    );
    const injected = await exchange(conn, { headers: ['x-a', 'b\r\nx-injected: 1'] });
    assert.deepEqual([injected.connected, injected.error?.code], [false, 'EINVAL']);
    assert.equal(seen.length, 4);
    conn.destroy(new Error('done'));
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });

  it('stops reading while the handler asks it to, and loses nothing, also when the upstream closes meanwhile', { timeout: 10_000 }, async () => {
    const body = Buffer.alloc(3 * 1024 * 1024);
    for (let i = 0; i < body.length; i++) body[i] = (i * 7) & 0xff;
    const server = createHttpServer((req, res) => {
      res.setHeader('content-length', body.length);
      if (req.url === '/close') res.setHeader('connection', 'close');
      res.end(body);
    });
    const port = await freePort();
    await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve));
  // A test that fails half-way must not keep the test process alive.
  server.unref();
    const conn = new UpstreamConnection('127.0.0.1', port, noop, noop);
    for (const path of ['/', '/close', '/']) {
      const outcome = await exchange(conn, { path }, 3);
      assert.equal(outcome.error, undefined, path);
      assert.ok(outcome.body.equals(body), path);
    }
    conn.destroy(new Error('done'));
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
});
