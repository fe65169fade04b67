import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { connect } from 'node:net';
import { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { Client, Pool, request } from 'undici';
import type { GatewayClient, Upstream } from '../../src/gateway/index.js';
import { LOOPBACK, eventually, freePort, httpUpstream, withGateway, type TestUpstream } from './gateway-env.js';

const MiB = 1024 * 1024;

async function httpRoute(client: GatewayClient, name: string, upstream?: Upstream): Promise<string> {
  const listenPort = await freePort();
  await client.putRoute(name, { protocol: 'http', listenPort, ...(upstream ? { upstream } : {}) });
  return `http://${LOOPBACK}:${listenPort}`;
}

/** Answers with who it is, what it got, and the request's headers. */
function echoHandler(who: string) {
  return (req: IncomingMessage, res: ServerResponse): void => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ who, method: req.method, url: req.url, headers: req.headers, body: Buffer.concat(chunks).toString() }));
    });
  };
}

interface Echo {
  who: string;
  method: string;
  url: string;
  headers: Record<string, string>;
  body: string;
}

async function getJson<T>(url: string, opts: Parameters<typeof request>[1] = {}): Promise<{ status: number; body: T; headers: Record<string, unknown> }> {
  const res = await request(url, opts);
  const text = await res.body.text();
  return { status: res.statusCode, headers: res.headers, body: JSON.parse(text) as T };
}

/** A deterministic byte stream of `size` bytes, in 64 KiB chunks. */
function patternChunks(size: number): Buffer[] {
  const chunk = Buffer.alloc(64 * 1024);
  for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 31 + 7) & 0xff;
  const chunks: Buffer[] = [];
  for (let left = size; left > 0; left -= chunk.length) chunks.push(left >= chunk.length ? chunk : chunk.subarray(0, left));
  return chunks;
}

function sha256(chunks: Buffer[]): string {
  const hash = createHash('sha256');
  for (const c of chunks) hash.update(c);
  return hash.digest('hex');
}

/** Writes `chunks` respecting backpressure; resolves when done or when the client went away. */
async function writeAll(res: ServerResponse, chunks: Iterable<Buffer>): Promise<void> {
  for (const chunk of chunks) {
    if (res.destroyed) return;
    if (!res.write(chunk)) await drainedOrClosed(res);
  }
  res.end();
}

function drainedOrClosed(res: ServerResponse): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      res.off('drain', done);
      res.off('close', done);
      resolve();
    };
    res.on('drain', done);
    res.on('close', done);
  });
}

/** Sends raw bytes on one connection and collects what comes back until `done` says so. */
function rawExchange(port: number, bytes: string, done: (received: string) => boolean): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, LOOPBACK, () => socket.write(bytes));
    let received = '';
    socket.setEncoding('latin1');
    socket.on('data', (data: string) => {
      received += data;
      if (done(received)) {
        socket.destroy();
        resolve(received);
      }
    });
    socket.on('error', reject);
    socket.on('close', () => resolve(received));
  });
}

/** A counter service, as a container would run it. */
class CounterService {
  constructor(public count: number) {}

  readonly handle = (req: IncomingMessage, res: ServerResponse): void => {
    req.resume();
    req.on('end', () => {
      if (req.method === 'POST' && req.url === '/increment') this.count++;
      res.end(JSON.stringify({ count: this.count }));
    });
  };
}

describe('gateway: HTTP routes', () => {
  it('passes GET and POST through, with the path, query, headers and Host', () =>
    withGateway(async ({ client }) => {
      const a = await httpUpstream(echoHandler('a'));
      const url = await httpRoute(client, 'web', a.upstream);

      const got = await getJson<Echo>(`${url}/items/7?full=1`, { headers: { 'x-custom': 'yes', host: 'app.example' } });
      assert.equal(got.status, 200);
      assert.equal(got.body.method, 'GET');
      assert.equal(got.body.url, '/items/7?full=1');
      assert.equal(got.body.headers['x-custom'], 'yes');
      assert.equal(got.body.headers.host, 'app.example');

      const posted = await getJson<Echo>(`${url}/items`, { method: 'POST', body: '{"n":1}', headers: { 'content-type': 'application/json' } });
      assert.equal(posted.status, 200);
      assert.equal(posted.body.method, 'POST');
      assert.equal(posted.body.body, '{"n":1}');
      assert.equal(posted.body.headers['content-type'], 'application/json');
      await a.kill();
    }));

  it('streams a 5 MB request body and a chunked request body of unknown length', () =>
    withGateway(async ({ client }) => {
      const a = await httpUpstream((req, res) => {
        const hash = createHash('sha256');
        let bytes = 0;
        req.on('data', (c: Buffer) => {
          hash.update(c);
          bytes += c.length;
        });
        req.on('end', () => res.end(JSON.stringify({ bytes, sha256: hash.digest('hex'), chunked: req.headers['transfer-encoding'] === 'chunked' })));
      });
      const url = await httpRoute(client, 'upload', a.upstream);

      const big = patternChunks(5 * MiB);
      const sent = await getJson<{ bytes: number; sha256: string }>(`${url}/upload`, {
        method: 'PUT',
        body: Buffer.concat(big),
        headers: { 'content-length': String(5 * MiB) },
      });
      assert.equal(sent.body.bytes, 5 * MiB);
      assert.equal(sent.body.sha256, sha256(big));

      // Larger than what the gateway reads ahead (1 MiB): the rest streams after the read-ahead.
      const unknownLength = patternChunks(3 * MiB);
      const streamed = await getJson<{ bytes: number; sha256: string; chunked: boolean }>(`${url}/upload`, {
        method: 'POST',
        body: Readable.from(unknownLength),
      });
      assert.equal(streamed.body.bytes, 3 * MiB);
      assert.equal(streamed.body.sha256, sha256(unknownLength));
      assert.equal(streamed.body.chunked, true);
      await a.kill();
    }));

  it('streams a 20 MB chunked response intact', () =>
    withGateway(async ({ client }) => {
      const body = patternChunks(20 * MiB);
      const a = await httpUpstream((_req, res) => void writeAll(res, body));
      const url = await httpRoute(client, 'download', a.upstream);

      const res = await request(`${url}/big`);
      assert.equal(res.statusCode, 200);
      assert.equal(res.headers['transfer-encoding'], 'chunked');
      const hash = createHash('sha256');
      let bytes = 0;
      for await (const chunk of res.body) {
        hash.update(chunk as Buffer);
        bytes += (chunk as Buffer).length;
      }
      assert.equal(bytes, 20 * MiB);
      assert.equal(hash.digest('hex'), sha256(body));
      await a.kill();
    }));

  it('never buffers a response whole: a client that stops reading stops the upstream', () =>
    withGateway(async ({ client }) => {
      let written = 0;
      const chunk = Buffer.alloc(64 * 1024, 1);
      const endless = (function* () {
        for (;;) {
          written += chunk.length;
          yield chunk;
        }
      })();
      const a = await httpUpstream((_req, res) => void writeAll(res, endless));
      const url = await httpRoute(client, 'endless', a.upstream);

      const res = await request(`${url}/endless`);
      let read = 0;
      for await (const c of res.body) {
        read += (c as Buffer).length;
        if (read >= MiB) break; // and then stop reading (the loop's exit leaves the body unread)
      }
      // Socket buffers fill up, then the upstream's writes stall: what it wrote stops growing.
      await eventually(
        async () => {
          const before = written;
          await sleep(200);
          return written === before;
        },
        'the upstream to stall',
      );
      assert.ok(written < 64 * MiB, `the upstream wrote ${written} bytes for a client that read ${read}`);
      await a.kill();
    }));

  it('removes hop-by-hop headers both ways and sets X-Forwarded-*', () =>
    withGateway(async ({ client }) => {
      let seen: IncomingMessage['headers'] = {};
      const a = await httpUpstream((req, res) => {
        seen = req.headers;
        res.setHeader('connection', 'x-upstream-secret');
        res.setHeader('x-upstream-secret', 'hidden');
        res.setHeader('keep-alive', 'timeout=99');
        res.setHeader('proxy-authenticate', 'Basic');
        res.setHeader('trailer', 'x-checksum');
        res.setHeader('upgrade', 'h2c');
        res.setHeader('x-kept', 'yes');
        res.end('ok');
      });
      const url = await httpRoute(client, 'headers', a.upstream);
      const port = Number(new URL(url).port);

      const answer = await rawExchange(
        port,
        'GET /h HTTP/1.1\r\nHost: app.example\r\nConnection: keep-alive, X-Client-Secret\r\nX-Client-Secret: hidden\r\n' +
          'Keep-Alive: timeout=99\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\nUpgrade: websocket\r\n' +
          'X-Forwarded-For: 203.0.113.9\r\nX-Kept: yes\r\n\r\n',
        (received) => received.endsWith('ok\r\n0\r\n\r\n'),
      );
      for (const name of ['x-client-secret', 'keep-alive', 'te', 'proxy-authorization', 'upgrade']) assert.equal(seen[name], undefined, `${name} reached the upstream`);
      assert.ok(!String(seen.connection ?? '').includes('x-client-secret'));
      assert.equal(seen['x-kept'], 'yes');
      assert.equal(seen['x-forwarded-for'], '203.0.113.9, 127.0.0.1');
      assert.equal(seen['x-forwarded-proto'], 'http');
      assert.equal(seen['x-forwarded-host'], 'app.example');

      const head = answer.slice(0, answer.indexOf('\r\n\r\n')).toLowerCase();
      assert.match(head, /^http\/1\.1 200 ok/);
      for (const gone of ['x-upstream-secret', 'timeout=99', 'proxy-authenticate', 'trailer:', 'upgrade:', 'connection: x-upstream-secret']) {
        assert.ok(!head.includes(gone), `${gone} reached the client:\n${head}`);
      }
      assert.ok(head.includes('x-kept: yes'));
      await a.kill();
    }));

  it('keeps the client connection and the upstream connection alive across many requests', () =>
    withGateway(async ({ client }) => {
      const a = await httpUpstream(echoHandler('a'));
      const url = await httpRoute(client, 'keepalive', a.upstream);
      const conn = new Client(url);
      let connects = 0;
      conn.on('connect', () => connects++);
      for (let i = 0; i < 200; i++) {
        const res = await conn.request({ path: `/n/${i}`, method: i % 2 ? 'POST' : 'GET', body: i % 2 ? `body ${i}` : undefined });
        const echo = (await res.body.json()) as Echo;
        assert.equal(echo.url, `/n/${i}`);
      }
      assert.equal(connects, 1, 'one client connection for every request');
      assert.equal(a.connections, 1, 'one upstream connection for every request');
      await conn.close();
      await a.kill();
    }));

  it('answers pipelined requests in order', () =>
    withGateway(async ({ client }) => {
      // The first request is answered last by the upstream; the client must still get it first.
      const a = await httpUpstream((req, res) => {
        const delay = req.url === '/1' ? 150 : 0;
        setTimeout(() => res.end(`answer ${req.url}`), delay);
      });
      const url = await httpRoute(client, 'pipelined', a.upstream);
      const request3 = [1, 2, 3].map((n) => `GET /${n} HTTP/1.1\r\nHost: x\r\n\r\n`).join('');
      const answer = await rawExchange(Number(new URL(url).port), request3, (received) => received.includes('answer /3'));
      const order = [...answer.matchAll(/answer \/(\d)/g)].map((m) => m[1]);
      assert.deepEqual(order, ['1', '2', '3']);
      await a.kill();
    }));

  it('answers 502 when the upstream fails and the route is not held, and 503 when there is no upstream', () =>
    withGateway(async ({ client }) => {
      const dead: Upstream = { address: LOOPBACK, port: await freePort() };
      const url = await httpRoute(client, 'dead', dead);
      const res = await request(`${url}/`, { method: 'POST', body: 'x' });
      assert.equal(res.statusCode, 502);
      assert.equal(res.headers['x-chipmunk-reason'], 'upstream-unreachable');
      const body = (await res.body.json()) as { code: string; message: string };
      assert.equal(body.code, 'CHIPMUNK_UNAVAILABLE');
      assert.match(body.message, /cannot be reached/);

      const nowhere = await httpRoute(client, 'nowhere');
      const none = await request(`${nowhere}/`);
      assert.equal(none.statusCode, 503);
      assert.equal(none.headers['x-chipmunk-reason'], 'no-upstream');
      await none.body.dump();
    }));

  it('holds requests and releases them, in arrival order, to the new upstream', () =>
    withGateway(
      async ({ client }) => {
        const order: string[] = [];
        const a = await httpUpstream(echoHandler('a'));
        const b = await httpUpstream((req, res) => {
          order.push(req.url ?? '');
          echoHandler('b')(req, res);
        });
        const url = await httpRoute(client, 'moving', a.upstream);
        assert.equal((await getJson<Echo>(`${url}/before`)).body.who, 'a');

        await client.hold('moving', 'm1');
        const answers: Promise<{ status: number; body: Echo }>[] = [];
        for (let i = 0; i < 20; i++) {
          answers.push(getJson<Echo>(`${url}/held/${i}`, { method: i % 3 ? 'GET' : 'POST', body: i % 3 ? undefined : `n=${i}` }));
          await eventually(async () => (await client.getRoute('moving')).held === i + 1, `request ${i} to be held`);
        }
        await sleep(100);
        assert.equal(b.connections, 0);
        const released = await client.release('moving', 'm1', b.upstream);
        assert.equal(released.state, 'open');
        for (const answer of await Promise.all(answers)) {
          assert.equal(answer.status, 200);
          assert.equal(answer.body.who, 'b');
        }
        assert.deepEqual(
          order,
          answers.map((_, i) => `/held/${i}`),
        );
        assert.equal((await getJson<Echo>(`${url}/after`)).body.who, 'b');
        await a.kill();
        await b.kill();
      },
      // One upstream connection: the upstream sees the requests in the order the gateway sends them.
      { upstreamConnections: 1 },
    ));

  it('answers 503 queue-full beyond the queue limit', () =>
    withGateway(
      async ({ client }) => {
        const a = await httpUpstream(echoHandler('a'));
        const url = await httpRoute(client, 'full', a.upstream);
        await client.hold('full', 'm1');
        const held = [getJson<Echo>(`${url}/1`), getJson<Echo>(`${url}/2`)];
        await eventually(async () => (await client.getRoute('full')).held === 2, 'two held requests');
        const refused = await request(`${url}/3`);
        assert.equal(refused.statusCode, 503);
        assert.equal(refused.headers['x-chipmunk-reason'], 'queue-full');
        assert.equal(refused.headers['retry-after'], '1');
        const body = (await refused.body.json()) as { code: string; message: string };
        assert.equal(body.code, 'CHIPMUNK_UNAVAILABLE');
        assert.match(body.message, /hold queue is full \(2 waiting\)/);
        await client.release('full', 'm1', a.upstream);
        for (const answer of await Promise.all(held)) assert.equal(answer.status, 200);
        await a.kill();
      },
      { holdLimits: { maxQueued: 2 } },
    ));

  it('answers 503 queue-full when held request bodies would take too much memory', () =>
    withGateway(
      async ({ client }) => {
        const a = await httpUpstream(echoHandler('a'));
        const url = await httpRoute(client, 'heavy', a.upstream);
        await client.hold('heavy', 'm1');
        const held = getJson<Echo>(`${url}/1`, { method: 'POST', body: 'x'.repeat(600) });
        await eventually(async () => (await client.getRoute('heavy')).held === 1, 'one held request');
        const refused = await request(`${url}/2`, { method: 'POST', body: 'y'.repeat(600) });
        assert.equal(refused.statusCode, 503);
        assert.equal(refused.headers['x-chipmunk-reason'], 'queue-full');
        assert.match(((await refused.body.json()) as { message: string }).message, /1200 bytes of request bodies, more than 1000/);
        // A GET holds no body: still room for it.
        const get = getJson<Echo>(`${url}/3`);
        await eventually(async () => (await client.getRoute('heavy')).held === 2, 'the GET to be held');
        await client.release('heavy', 'm1', a.upstream);
        assert.equal((await held).body.body.length, 600);
        assert.equal((await get).status, 200);
        await a.kill();
      },
      { holdLimits: { maxQueuedBytes: 1000 } },
    ));

  it('a hold past its time bound turns its waiting requests away with 503 hold-timeout but stays held until released', () =>
    withGateway(async ({ client }) => {
      let reachedOld = 0;
      const a = await httpUpstream((req, res) => {
        reachedOld++;
        echoHandler('a')(req, res);
      });
      const b = await httpUpstream(echoHandler('b'));
      const url = await httpRoute(client, 'stuck', a.upstream);
      // Long enough that a loaded machine still releases the last request while it waits.
      await client.hold('stuck', 'm1', { timeoutMs: 3_000 });
      const started = Date.now();
      const waited = await request(`${url}/x`);
      assert.equal(waited.statusCode, 503);
      assert.equal(waited.headers['x-chipmunk-reason'], 'hold-timeout');
      await waited.body.dump();
      assert.ok(Date.now() - started >= 2_900, 'the request waited for the hold first');
      const route = await client.getRoute('stuck');
      assert.equal(route.state, 'holding', 'the route is still held: the move may still be replaying');
      assert.ok(route.migration?.lapsedAt !== undefined);
      assert.equal(route.migration?.outcome, undefined);

      // A request arriving after the bound still never reaches the old upstream: it waits, bounded.
      const late = await request(`${url}/late`);
      assert.equal(late.statusCode, 503);
      assert.equal(late.headers['x-chipmunk-reason'], 'hold-timeout');
      await late.body.dump();
      const released = getJson<Echo>(`${url}/after`);
      await eventually(async () => (await client.getRoute('stuck')).held === 1, 'a request waiting on the lapsed hold');
      await client.release('stuck', 'm1', b.upstream);
      assert.equal((await released).body.who, 'b', 'the release lets it through, to the new upstream');
      assert.equal(reachedOld, 0, 'nothing went back to the old upstream');
      assert.equal((await client.getRoute('stuck')).migration?.outcome, 'released');
      await a.kill();
      await b.kill();
    }));

  it('answers 503 hold-timeout when a hold on a route without upstream times out', () =>
    withGateway(async ({ client }) => {
      const url = await httpRoute(client, 'unplaced');
      await client.hold('unplaced', 'm1', { timeoutMs: 200 });
      const res = await request(`${url}/`);
      assert.equal(res.statusCode, 503);
      assert.equal(res.headers['x-chipmunk-reason'], 'hold-timeout');
      await res.body.dump();
      assert.equal((await client.getRoute('unplaced')).state, 'holding');
    }));

  it('sends an in-flight GET again after the release when the old upstream dies under it', () =>
    withGateway(async ({ client }) => {
      let arrived = 0;
      const a = await httpUpstream(() => void arrived++); // never answers: frozen
      const b = await httpUpstream(echoHandler('b'));
      const url = await httpRoute(client, 'frozen', a.upstream);
      const answer = getJson<Echo>(`${url}/slow`);
      await eventually(() => arrived === 1, 'the GET to reach the old upstream');
      await client.hold('frozen', 'm1');
      await a.kill(); // the container is dumped and gone: its connections are reset
      await sleep(50);
      await client.release('frozen', 'm1', b.upstream);
      const got = await answer;
      assert.equal(got.status, 200);
      assert.equal(got.body.who, 'b');
      assert.equal(got.body.url, '/slow');
      await b.kill();
    }));

  it('gives up requests in progress at the old location once the container moved: GET sent again, POST 502', () =>
    withGateway(async ({ client }) => {
      // Frozen for good, as a checkpointed container: no answer, and no reset either.
      const arrived: string[] = [];
      const a = await httpUpstream((req) => {
        req.resume();
        arrived.push(`${req.method} ${req.url}`);
      });
      const b = await httpUpstream(echoHandler('b'));
      const url = await httpRoute(client, 'checkpointed', a.upstream);
      const get = getJson<Echo>(`${url}/read`);
      const post = request(`${url}/write`, { method: 'POST', body: 'x=1' });
      await eventually(() => arrived.length === 2, 'both requests to reach the old location');
      await client.hold('checkpointed', 'm1');
      await client.release('checkpointed', 'm1', b.upstream);

      const got = await get;
      assert.equal(got.body.who, 'b');
      assert.equal(got.body.url, '/read');
      const failed = await post;
      assert.equal(failed.statusCode, 502);
      assert.equal(failed.headers['x-chipmunk-reason'], 'upstream-failed');
      assert.match(((await failed.body.json()) as { message: string }).message, /moved to 127\.0\.0\.1/);
      await a.kill();
      await b.kill();
    }));

  it('does not send again a POST that reached the upstream (502), but does one that could not connect', () =>
    withGateway(async ({ client }) => {
      let arrived = 0;
      const a = await httpUpstream((req) => {
        req.resume();
        arrived++;
      });
      let bPosts = 0;
      const url = await httpRoute(client, 'posts', a.upstream);
      const answer = request(`${url}/pay`, { method: 'POST', body: 'amount=5' });
      await eventually(() => arrived === 1, 'the POST to reach the old upstream');
      await client.hold('posts', 'm1');
      await a.kill();
      const failed = await answer;
      assert.equal(failed.statusCode, 502);
      assert.equal(failed.headers['x-chipmunk-reason'], 'upstream-failed');
      await failed.body.dump();

      // Released to where the container is not answering yet: the connection is refused, which
      // proves nothing was sent, so the POST is sent again until the container answers.
      const bPort = await freePort();
      await client.release('posts', 'm1', { address: LOOPBACK, port: bPort });
      const retried = getJson<Echo>(`${url}/pay`, { method: 'POST', body: 'amount=6' });
      await sleep(300);
      const b = await httpUpstream((req, res) => {
        bPosts++;
        echoHandler('b')(req, res);
      }, bPort);
      const got = await retried;
      assert.equal(got.status, 200);
      assert.equal(got.body.who, 'b');
      assert.equal(got.body.body, 'amount=6');
      assert.equal(bPosts, 1, 'the refused POST reached the container once');
      await b.kill();
    }));

  it('loses no request while a stateful container moves (migration simulation)', () =>
    withGateway(async ({ client }) => {
      const stateA = new CounterService(0);
      const a: TestUpstream = await httpUpstream(stateA.handle);
      const url = await httpRoute(client, 'counter', a.upstream);

      const users = new Pool(url, { connections: 4 });
      let acknowledged = 0;
      const failures: string[] = [];
      const until = Date.now() + 3_000;
      const user = async (): Promise<void> => {
        while (Date.now() < until) {
          try {
            const res = await users.request({ path: '/increment', method: 'POST', body: '' });
            const text = await res.body.text();
            if (res.statusCode === 200) acknowledged++;
            else failures.push(`${res.statusCode} ${text}`);
          } catch (err) {
            failures.push((err as Error).message);
          }
        }
      };
      const running = Promise.all([user(), user(), user(), user()]);

      await sleep(1_000);
      await client.hold('counter', 'move-1');
      // Every user now waits at the gateway: nothing is in flight to A any more.
      await eventually(async () => (await client.getRoute('counter')).held === 4, 'the four users to be held');
      const stateB = new CounterService(stateA.count); // the checkpoint carries the state over
      await a.kill();
      const b = await httpUpstream(stateB.handle);
      await client.release('counter', 'move-1', b.upstream);
      await running;

      assert.deepEqual(failures, []);
      assert.ok(stateB.count > stateA.count, 'B served increments');
      assert.equal(stateB.count, acknowledged);
      await users.close();
      await b.kill();
    }));
});
