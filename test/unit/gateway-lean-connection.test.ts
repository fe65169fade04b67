/**
 * Client connections served lean (http-client-connection.ts) and handed to node's HTTP server at
 * their first request that is not plain: what a client sees must not depend on which one serves it.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { connect, createServer, type AddressInfo } from 'node:net';
import { request } from 'undici';
import type { GatewayClient, Upstream } from '../../src/gateway/index.js';
import { LOOPBACK, freePort, httpUpstream, withGateway } from './gateway-env.js';

async function httpRoute(client: GatewayClient, name: string, upstream: Upstream): Promise<number> {
  const listenPort = await freePort();
  await client.putRoute(name, { protocol: 'http', listenPort, upstream });
  return listenPort;
}

/** Writes `writes` on one connection (one after another, `gapMs` apart) and collects what comes back until `done`, or the close. */
function exchange(port: number, writes: string[], done: (received: string) => boolean, gapMs = 0): Promise<{ received: string; closed: boolean }> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, LOOPBACK, async () => {
      for (const w of writes) {
        socket.write(w);
        if (gapMs) await new Promise((r) => setTimeout(r, gapMs));
      }
    });
    let received = '';
    socket.setEncoding('latin1');
    socket.on('data', (data: string) => {
      received += data;
      if (done(received)) {
        socket.destroy();
        resolve({ received, closed: false });
      }
    });
    socket.on('error', reject);
    socket.on('close', () => resolve({ received, closed: true }));
  });
}

/** Splits a stream of HTTP/1.1 answers (Content-Length or chunked bodies) into status, head and body. */
function answers(stream: string): Array<{ status: number; head: string; body: string }> {
  const out: Array<{ status: number; head: string; body: string }> = [];
  let at = 0;
  while (at < stream.length) {
    const end = stream.indexOf('\r\n\r\n', at);
    if (end < 0) break;
    const head = stream.slice(at, end);
    at = end + 4;
    const status = Number(head.slice(9, 12));
    const length = /\r\ncontent-length: *(\d+)/i.exec(head);
    let body = '';
    if (/\r\ntransfer-encoding: *chunked/i.test(head)) {
      for (;;) {
        const lineEnd = stream.indexOf('\r\n', at);
        const size = parseInt(stream.slice(at, lineEnd), 16);
        at = lineEnd + 2;
        if (size === 0) {
          at += 2;
          break;
        }
        body += stream.slice(at, at + size);
        at += size + 2;
      }
    } else if (length && !/^HTTP\/1\.1 (204|304)/.test(head) && !head.includes('x-head-request')) {
      body = stream.slice(at, at + Number(length[1]));
      at += Number(length[1]);
    }
    out.push({ status, head, body });
  }
  return out;
}

describe('gateway: lean client connections', () => {
  it('answers pipelined plain and body-carrying requests in order, handing the connection to node at the first body', () =>
    withGateway(async ({ client }) => {
      // The first request is answered last by the upstream.
      const a = await httpUpstream((req, res) => {
        const chunks: Buffer[] = [];
        req.on('data', (c: Buffer) => chunks.push(c));
        req.on('end', () => setTimeout(() => res.end(`${req.method} ${req.url} [${Buffer.concat(chunks).toString()}]`), req.url === '/1' ? 150 : 0));
      });
      const port = await httpRoute(client, 'mixed', a.upstream);
      const writes = [
        'GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\nPOST /3 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello',
        'GET /4 HTTP/1.1\r\nHost: x\r\n\r\n',
      ];
      const { received } = await exchange(port, writes, (r) => r.includes('GET /4 []'), 50);
      assert.deepEqual(
        answers(received).map((x) => [x.status, x.body]),
        [
          [200, 'GET /1 []'],
          [200, 'GET /2 []'],
          [200, 'POST /3 [hello]'],
          [200, 'GET /4 []'],
        ],
      );
      await a.kill();
    }));

  it('answers 40 pipelined requests in order', () =>
    withGateway(async ({ client }) => {
      const a = await httpUpstream((req, res) => setTimeout(() => res.end(`answer ${req.url}`), Math.random() * 5));
      const port = await httpRoute(client, 'many', a.upstream);
      const n = 40;
      const all = Array.from({ length: n }, (_, i) => `GET /${i} HTTP/1.1\r\nHost: x\r\n\r\n`).join('');
      const { received } = await exchange(port, [all], (r) => r.includes(`answer /${n - 1}`));
      assert.deepEqual(
        answers(received).map((x) => x.body),
        Array.from({ length: n }, (_, i) => `answer /${i}`),
      );
      await a.kill();
    }));

  it('frames answers as node would: HEAD and 204 without a body, a chunked upstream answer chunked, Connection: close honoured', () =>
    withGateway(async ({ client }) => {
      const a = await httpUpstream((req, res) => {
        if (req.url === '/empty') {
          res.writeHead(204).end();
        } else if (req.url === '/chunked') {
          res.write('part one, ');
          setTimeout(() => res.end('part two'), 10);
        } else {
          res.setHeader('content-length', 5);
          if (req.method === 'HEAD') res.setHeader('x-head-request', 'yes');
          res.end(req.method === 'HEAD' ? undefined : 'fixed');
        }
      });
      const port = await httpRoute(client, 'framing', a.upstream);
      const writes = ['HEAD /fixed HTTP/1.1\r\nHost: x\r\n\r\nGET /empty HTTP/1.1\r\nHost: x\r\n\r\nGET /chunked HTTP/1.1\r\nHost: x\r\n\r\nGET /fixed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'];
      const { received, closed } = await exchange(port, writes, () => false);
      assert.ok(closed, 'the gateway closed the connection after the Connection: close request');
      const got = answers(received);
      assert.deepEqual(
        got.map((x) => [x.status, x.body]),
        [
          [200, ''],
          [204, ''],
          [200, 'part one, part two'],
          [200, 'fixed'],
        ],
      );
      assert.match(got[0].head, /content-length: 5/i);
      assert.match(got[2].head, /transfer-encoding: chunked/i);
      assert.match(got[1].head, /connection: keep-alive/i);
      assert.match(got[3].head, /connection: close/i);
      await a.kill();
    }));

  it('leaves requests it does not take to node: 400 for a bad head, 431 for a huge one, HTTP/1.0 served', () =>
    withGateway(async ({ client }) => {
      const a = await httpUpstream((req, res) => res.end(`answer ${req.url} ${req.httpVersion}`));
      const port = await httpRoute(client, 'odd', a.upstream);
      const noHost = await exchange(port, ['GET /a HTTP/1.1\r\n\r\n'], (r) => r.includes('\r\n\r\n'));
      assert.match(noHost.received, /^HTTP\/1\.1 400/);
      const bad = await exchange(port, ['GET /a HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n'], (r) => r.includes('\r\n\r\n'));
      assert.match(bad.received, /^HTTP\/1\.1 400/);
      const huge = await exchange(port, [`GET /a HTTP/1.1\r\nHost: x\r\nX-Big: ${'y'.repeat(20_000)}\r\n\r\n`], (r) => r.includes('\r\n\r\n'));
      assert.match(huge.received, /^HTTP\/1\.1 431/);
      const old = await exchange(port, ['GET /old HTTP/1.0\r\nHost: x\r\n\r\n'], (r) => r.includes('answer /old'));
      assert.match(old.received, /answer \/old 1\.1/);
      // And a plain request still gets through after all that.
      const res = await request(`http://${LOOPBACK}:${port}/fine`);
      assert.equal(await res.body.text(), 'answer /fine 1.1');
      await a.kill();
    }));

  it('passes upstream heads on as text both ways: hop-by-hop lines cut, chunk framing and a large head intact, a malformed answer a 502', () =>
    withGateway(async ({ client }) => {
      // Answers written as bytes, to have chunk extensions, trailers and malformed heads.
      const big = Array.from({ length: 300 }, (_, i) => `X-Big-${i}: ${'b'.repeat(i % 40)}`).join('\r\n');
      const scripted: Record<string, string> = {
        '/chunked': 'HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=9\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Trailer: t\r\n\r\n',
        '/big': `HTTP/1.1 200 OK\r\n${big}\r\nContent-Length: 2\r\n\r\nok`,
        '/both': 'HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n',
        '/malformed': 'HTTP/1.1 200 OK\r\nX-A: one\ntwo\r\nContent-Length: 0\r\n\r\n',
      };
      const seen: string[] = [];
      const server = createServer((socket) => {
        let buffered = '';
        socket.on('error', () => undefined);
        socket.on('data', (data) => {
          buffered += data.toString('latin1');
          for (let end = buffered.indexOf('\r\n\r\n'); end >= 0; end = buffered.indexOf('\r\n\r\n')) {
            const head = buffered.slice(0, end);
            buffered = buffered.slice(end + 4);
            seen.push(head);
            socket.write(scripted[head.split(' ')[1]], 'latin1');
          }
        });
      });
      await new Promise<void>((resolve) => server.listen(0, LOOPBACK, resolve));
      const port = await httpRoute(client, 'text-heads', { address: LOOPBACK, port: (server.address() as AddressInfo).port });
      const writes = ['GET /chunked HTTP/1.1\r\nHost: x\r\nConnection: X-Hidden\r\nX-Hidden: h\r\nX-Forwarded-For: 203.0.113.9\r\n\r\nGET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /both HTTP/1.1\r\nhost:y\r\n\r\n'];
      const { received } = await exchange(port, writes, (r) => r.endsWith('hi\r\n0\r\n\r\n'));
      const got = answers(received);
      assert.deepEqual(
        got.map((x) => [x.status, x.body]),
        [
          [200, 'abcdefg'],
          [200, 'ok'],
          [200, 'hi'],
        ],
      );
      assert.equal(got[0].head, 'HTTP/1.1 200 OK\r\nX-A: 1\r\ntransfer-encoding: chunked\r\nconnection: keep-alive\r\nkeep-alive: timeout=5');
      assert.ok(!received.includes('X-Trailer'), 'trailers are not passed on');
      assert.ok(got[1].head.startsWith(`HTTP/1.1 200 OK\r\n${big}\r\nContent-Length: 2\r\n`));
      assert.ok(!/content-length/i.test(got[2].head), 'the Content-Length of a chunked answer is not passed on');
      assert.equal(seen[0], 'GET /chunked HTTP/1.1\r\nHost: x\r\nx-forwarded-for: 203.0.113.9, 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: x');
      assert.equal(seen[2], 'GET /both HTTP/1.1\r\nhost:y\r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: y');
      const malformed = await exchange(port, ['GET /malformed HTTP/1.1\r\nHost: x\r\n\r\n'], (r) => r.includes('\r\n\r\n') && r.includes('}'));
      assert.match(malformed.received, /^HTTP\/1\.1 502 /);
      server.close();
    }));

  it('gives a client that leaves mid-answer no answer and the others theirs', () =>
    withGateway(async ({ client }) => {
      const a = await httpUpstream((req, res) => setTimeout(() => res.end(`answer ${req.url}`), req.url === '/slow' ? 200 : 0));
      const port = await httpRoute(client, 'leaving', a.upstream);
      const leaving = connect(port, LOOPBACK, () => leaving.write('GET /slow HTTP/1.1\r\nHost: x\r\n\r\n'));
      await new Promise((r) => setTimeout(r, 50));
      leaving.destroy();
      const others = await Promise.all(Array.from({ length: 5 }, async (_, i) => (await request(`http://${LOOPBACK}:${port}/n${i}`)).body.text()));
      assert.deepEqual(others, [0, 1, 2, 3, 4].map((i) => `answer /n${i}`));
      await a.kill();
    }));
});
