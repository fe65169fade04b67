import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { access, mkdtemp, rm } from 'node:fs/promises';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { connect, createServer as createNetServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { Readable } from 'node:stream';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import { Agent, request } from 'undici';
import { ConflictError, InvalidInputError, LogMismatchError } from '../../src/shared/errors.js';
import { GatewayClient, startGateway, type Upstream } from '../../src/gateway/index.js';
import { RequestLog, type LogRecord } from '../../src/gateway/request-log.js';
import { guardTestRange } from '../../src/cluster/routes.js';
import { LOOPBACK, TOKEN, eventually, freePort, httpUpstream, withGateway } from './gateway-env.js';

async function loggedRoute(client: GatewayClient, name: string, upstream?: Upstream): Promise<string> {
  const listenPort = await freePort();
  await client.putRoute(name, { protocol: 'http', listenPort, log: true, ...(upstream ? { upstream } : {}) });
  return `http://${LOOPBACK}:${listenPort}`;
}

/** A counter as a container would run it: applies an increment when it reads it, answers after `delayMs`. */
class CounterService {
  /** The x-n header of every increment, in the order applied. */
  readonly applied: string[] = [];

  constructor(
    public count: number,
    private readonly delayMs = 0,
  ) {}

  readonly handle = (req: IncomingMessage, res: ServerResponse): void => {
    req.resume();
    req.on('end', () => {
      if (req.method === 'POST' && req.url === '/increment') {
        this.count++;
        this.applied.push(String(req.headers['x-n']));
      }
      const count = this.count;
      const answer = (): void => void res.end(JSON.stringify({ count }));
      if (this.delayMs) setTimeout(answer, this.delayMs);
      else answer();
    });
  };
}

/**
 * The increments' client closes a connection idle for 1 s, well before the gateway does (5 s).
 * undici's own idle time-out (the gateway's Keep-Alive hint less 2 s) runs on timers that fall
 * behind real time when the event loop lags: under full-suite load the gateway could close an
 * idle connection just as a POST went out on it ('other side closed'), a race of HTTP/1.1
 * keep-alive, not a lost request.
 */
const incrementAgent = new Agent({ keepAliveTimeout: 1_000, keepAliveMaxTimeout: 1_000 });
after(() => incrementAgent.close());

/** An increment's answer; a transport failure is an answer too (status 0), never a rejection left unhandled by a test that awaits it later. */
async function increment(url: string, n: number): Promise<{ status: number; reason?: string }> {
  try {
    const res = await request(`${url}/increment`, { method: 'POST', headers: { 'x-n': String(n) }, body: `increment ${n}`, dispatcher: incrementAgent });
    await res.body.text();
    return { status: res.statusCode, reason: res.headers['x-chipmunk-reason'] as string | undefined };
  } catch (err) {
    return { status: 0, reason: `no answer: ${(err as Error).message}` };
  }
}

async function readLog(dir: string): Promise<LogRecord[]> {
  const log = await RequestLog.open(dir);
  const records: LogRecord[] = [];
  for await (const record of log.read(0)) records.push(record);
  await log.close();
  return records;
}

function header(record: LogRecord, name: string): string | undefined {
  const i = record.headers.findIndex((h, index) => index % 2 === 0 && h.toLowerCase() === name);
  return i < 0 ? undefined : record.headers[i + 1];
}

async function withLogDir(run: (logDir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'chipmunk-gateway-log-'));
  try {
    await run(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

describe('gateway: logged HTTP routes', () => {
  it('forwards a request only once it is in the log on disk, and shows the log', () =>
    withGateway(async ({ client, gateway }) => {
      let seen = 0;
      const lastSeqOnArrival: number[] = [];
      const upstream = await httpUpstream((req, res) => {
        req.resume();
        seen++;
        void client.getRoute('web').then((view) => {
          lastSeqOnArrival.push((view.requestLog?.lastSeq ?? 0) - seen);
          res.end('ok');
        });
      });
      const url = await loggedRoute(client, 'web', upstream.upstream);
      const answers = await Promise.all(Array.from({ length: 20 }, (_, n) => increment(url, n)));
      assert.deepEqual(new Set(answers.map((a) => a.status)), new Set([200]));
      assert.ok(lastSeqOnArrival.every((ahead) => ahead >= 0), `every request was on disk before the upstream saw it: ${lastSeqOnArrival}`);

      const view = await client.getRoute('web');
      assert.equal(view.log, true);
      assert.deepEqual({ ...view.requestLog, bytes: undefined, logId: undefined }, { firstSeq: 1, lastSeq: 20, bytes: undefined, logId: undefined, parked: 0 });
      const metrics = await (await request(`${gateway.url}/metrics`)).body.text();
      assert.match(metrics, /chipmunk_gateway_log_appends_total\{route="web"\} 20/);
      assert.match(metrics, /chipmunk_gateway_log_batch_records_count\{route="web"\} \d+/);
      await upstream.kill();
    }));

  it('reports the cut on hold (the number forwarded), and trims the log up to it', () =>
    withGateway(async ({ client }) => {
      const counter = new CounterService(0);
      const upstream = await httpUpstream(counter.handle);
      const url = await loggedRoute(client, 'web', upstream.upstream);
      for (let n = 1; n <= 5; n++) assert.equal((await increment(url, n)).status, 200);

      const held = await client.hold('web', 'checkpoint-1');
      const logId = (await client.getRoute('web')).requestLog?.logId;
      assert.match(logId ?? '', /^[0-9a-f]{16}$/);
      assert.deepEqual(held.logPosition, { logId, seq: 5 });
      assert.equal(held.uncleanCut, undefined);
      assert.equal(counter.count, 5, 'the container applied exactly the requests up to the cut');
      // Held requests are logged when the hold lets them go, after the cut.
      const late = increment(url, 6);
      await eventually(async () => (await client.getRoute('web')).held === 1, 'the request held');
      assert.equal((await client.getRoute('web')).requestLog?.lastSeq, 5);
      await client.release('web', 'checkpoint-1', upstream.upstream);
      assert.equal((await late).status, 200);

      const trimmed = await client.trimLog('web', { logId: logId!, seq: 5 });
      assert.deepEqual({ firstSeq: trimmed.requestLog?.firstSeq, lastSeq: trimmed.requestLog?.lastSeq }, { firstSeq: 6, lastSeq: 6 });
      await upstream.kill();
    }));

  it('loses no increment and fails no client when the container dies: parked requests get their answers from the replay', () =>
    withLogDir(async (logDir) => {
      const total = 60;
      let cut = { logId: '', seq: 0 };
      let checkpointed = 0;
      const acked = new Set<number>();
      const failed: string[] = [];
      let b: CounterService | undefined;
      let replay: Awaited<ReturnType<GatewayClient['replay']>> | undefined;
      await withGateway(
        async ({ client }) => {
          const a = new CounterService(0, 20);
          const nodeA = await httpUpstream(a.handle);
          const url = await loggedRoute(client, 'counter', nodeA.upstream);

          let next = 0;
          const worker = async (): Promise<void> => {
            while (next < total) {
              const n = ++next;
              const answer = await increment(url, n);
              if (answer.status === 200) acked.add(n);
              else failed.push(`${n}: ${answer.status} ${answer.reason}`);
            }
          };
          const workers = Promise.all(Array.from({ length: 4 }, worker));

          // A checkpoint: hold, dump the container (here: its count), release, trim.
          await eventually(() => acked.size >= 15, '15 increments answered');
          const held = await client.hold('counter', 'checkpoint-1');
          assert.ok(held.logPosition !== undefined, `a clean cut: ${held.uncleanCut}`);
          cut = held.logPosition;
          checkpointed = a.count;
          await client.release('counter', 'checkpoint-1', nodeA.upstream);
          await client.trimLog('counter', cut);

          // The node dies with requests in flight (the container answers after 20 ms).
          await eventually(() => acked.size >= 30, '30 increments answered');
          await nodeA.kill();
          await eventually(async () => ((await client.getRoute('counter')).requestLog?.parked ?? 0) > 0, 'requests parked');

          // Failover: hold, restore from the checkpoint elsewhere, replay after the cut, release.
          const failover = await client.hold('counter', 'failover-1');
          assert.equal(failover.logPosition, undefined);
          assert.match(failover.uncleanCut ?? '', /unanswered/);
          b = new CounterService(checkpointed);
          const nodeB = await httpUpstream(b.handle);
          replay = await client.replay('counter', cut, nodeB.upstream);
          await client.release('counter', 'failover-1', nodeB.upstream);

          await workers;
          assert.equal((await client.getRoute('counter')).requestLog?.parked, 0);
          await nodeB.kill();
        },
        { logDir },
      );

      assert.deepEqual(failed, [], 'no client request failed');
      assert.equal(acked.size, total);
      assert.equal(checkpointed, cut.seq, 'the checkpoint holds exactly the requests up to the cut');
      assert.equal(b?.count, total, 'the restored counter equals the acknowledged increments');

      const records = await readLog(join(logDir, 'counter'));
      const afterCut = records.filter((r) => r.seq > cut.seq);
      assert.ok(replay && replay.replayed > 0 && replay.delivered > 0, `some answers came from the replay: ${JSON.stringify(replay)}`);
      assert.equal(replay?.replayed, (replay?.lastSeq ?? 0) - cut.seq);
      assert.equal((replay?.delivered ?? 0) + (replay?.dropped ?? 0), replay?.replayed);
      assert.deepEqual(
        b?.applied,
        afterCut.map((r) => header(r, 'x-n')),
        'the restored container got every request after the cut once, in log order (the replay, then live traffic)',
      );
    }));

  it('answers 503 upstream-lost when no replay comes within maxReplayWaitMs', () =>
    withGateway(
      async ({ client }) => {
        const dying = await httpUpstream((req) => req.socket.destroy());
        const url = await loggedRoute(client, 'web', dying.upstream);
        const started = Date.now();
        const answer = await increment(url, 1);
        assert.deepEqual(answer, { status: 503, reason: 'upstream-lost' });
        assert.ok(Date.now() - started >= 250, 'it waited for a replay first');
        await dying.kill();
      },
      { maxReplayWaitMs: 300 },
    ));

  it('refuses a body too large to log with 413 body-too-large-to-log', () =>
    withGateway(
      async ({ client }) => {
        const counter = new CounterService(0);
        const upstream = await httpUpstream(counter.handle);
        const url = await loggedRoute(client, 'web', upstream.upstream);
        const sized = await request(`${url}/increment`, { method: 'POST', body: Buffer.alloc(2000) });
        assert.equal(sized.statusCode, 413);
        assert.equal(sized.headers['x-chipmunk-reason'], 'body-too-large-to-log');
        assert.match(((await sized.body.json()) as { message: string }).message, /over 1000 bytes/);
        const chunked = await request(`${url}/increment`, { method: 'POST', body: Readable.from([Buffer.alloc(500), Buffer.alloc(500), Buffer.alloc(500)]) });
        assert.equal(chunked.statusCode, 413);
        await chunked.body.text();
        assert.equal(counter.count, 0, 'neither was forwarded');
        assert.equal((await client.getRoute('web')).requestLog?.lastSeq, 0, 'nor logged');
        await upstream.kill();
      },
      { maxLoggedBodyBytes: 1000 },
    ));

  it('refuses a replay on a route that is not held or not logged, a log on a TCP route, and deletes the log with the route', () =>
    withLogDir(async (logDir) =>
      withGateway(
        async ({ client }) => {
          const upstream = { address: LOOPBACK, port: 9 };
          await loggedRoute(client, 'web', upstream);
          const logId = (await client.getRoute('web')).requestLog!.logId;
          await assert.rejects(client.replay('web', { logId, seq: 0 }, upstream), (err) => err instanceof ConflictError && /hold the route/.test(err.message));
          await client.putRoute('plain', { protocol: 'http', listenPort: await freePort(), upstream });
          await client.hold('plain', 'm1');
          await assert.rejects(client.replay('plain', { logId, seq: 0 }, upstream), (err) => err instanceof ConflictError && /not logged/.test(err.message));
          await assert.rejects(
            client.putRoute('tcp', { protocol: 'tcp', listenPort: await freePort(), upstream, log: true }),
            (err) => err instanceof InvalidInputError && /only http routes/.test(err.message),
          );
          await client.hold('web', 'm2');
          await assert.rejects(client.replay('web', { logId, seq: 7 }, upstream), (err) => err instanceof ConflictError && /ends at 0/.test(err.message));

          await access(join(logDir, 'web'));
          await client.removeRoute('web');
          await assert.rejects(access(join(logDir, 'web')), /ENOENT/);
        },
        { logDir },
      ),
    ));

  it('keeps the log across a gateway restart and continues its seq', () =>
    withLogDir(async (dir) => {
      const counter = new CounterService(0);
      const upstream = await httpUpstream(counter.handle);
      const options = { apiListen: { host: LOOPBACK, port: 0 }, routeHost: LOOPBACK, token: TOKEN, stateFile: join(dir, 'routes.json'), logger: pino({ level: 'silent' }) };
      const first = await startGateway(options);
      const url = await loggedRoute(new GatewayClient({ url: first.url, token: TOKEN }), 'web', upstream.upstream);
      for (let n = 1; n <= 3; n++) assert.equal((await increment(url, n)).status, 200);
      const logId = (await new GatewayClient({ url: first.url, token: TOKEN }).getRoute('web')).requestLog?.logId;
      await first.close();

      const second = await startGateway(options);
      try {
        const client = new GatewayClient({ url: second.url, token: TOKEN });
        assert.equal((await client.getRoute('web')).requestLog?.lastSeq, 3);
        assert.equal((await client.getRoute('web')).requestLog?.logId, logId, 'the log keeps its identity');
        assert.equal((await increment(url, 4)).status, 200);
        assert.equal((await client.hold('web', 'm1')).logPosition?.seq, 4);
      } finally {
        await second.close();
        await upstream.kill();
      }
      assert.deepEqual((await readLog(join(dir, 'request-log', 'web'))).map((r) => header(r, 'x-n')), ['1', '2', '3', '4']);
    }));

  it("refuses to replay or trim with a position of the route's earlier log (unlogged and logged again, or removed and put again)", () =>
    withGateway(async ({ client }) => {
      const counter = new CounterService(0);
      const upstream = await httpUpstream(counter.handle);
      const url = await loggedRoute(client, 'web', upstream.upstream);
      for (let n = 1; n <= 2; n++) assert.equal((await increment(url, n)).status, 200);
      const old = (await client.hold('web', 'checkpoint-1')).logPosition!;
      await client.release('web', 'checkpoint-1', upstream.upstream);
      const listenPort = (await client.getRoute('web')).listenPort;

      // Unprotected, then protected again: the log is deleted and a new one starts at seq 1.
      await client.putRoute('web', { protocol: 'http', listenPort, upstream: upstream.upstream });
      await client.putRoute('web', { protocol: 'http', listenPort, upstream: upstream.upstream, log: true });
      for (let n = 3; n <= 6; n++) assert.equal((await increment(url, n)).status, 200);
      const relogged = (await client.getRoute('web')).requestLog!;
      assert.notEqual(relogged.logId, old.logId);
      assert.equal(relogged.lastSeq, 4);
      await client.hold('web', 'failover-1', { drain: false });
      const applied = counter.applied.length;
      await assert.rejects(client.replay('web', old, upstream.upstream), (err) => err instanceof LogMismatchError && err.code === 'CHIPMUNK_LOG_MISMATCH' && /not in container 'web''s current log/.test(err.message));
      assert.equal(counter.applied.length, applied, 'nothing was replayed');
      await assert.rejects(client.trimLog('web', old), LogMismatchError);
      assert.equal((await client.getRoute('web')).requestLog?.firstSeq, 1, 'nothing was trimmed');
      await client.release('web', 'failover-1', upstream.upstream);

      // Removed and put again: a new log too.
      await client.removeRoute('web');
      await loggedRoute(client, 'web', upstream.upstream);
      const recreated = (await client.getRoute('web')).requestLog!;
      assert.notEqual(recreated.logId, relogged.logId);
      await client.hold('web', 'failover-2', { drain: false });
      await assert.rejects(client.replay('web', { logId: relogged.logId, seq: 0 }, upstream.upstream), LogMismatchError);
      assert.deepEqual(await client.replay('web', { logId: recreated.logId, seq: 0 }, upstream.upstream), { replayed: 0, delivered: 0, dropped: 0, lastSeq: 0 });
      await upstream.kill();
    }));

  it('a replay that stopped at an unreachable container goes on after the last record it answered when sent again; one cut after a possibly applied record is refused', () =>
    withGateway(async ({ client }) => {
      const counter = new CounterService(0);
      const first = await httpUpstream(counter.handle);
      const url = await loggedRoute(client, 'web', first.upstream);
      for (let n = 1; n <= 2; n++) assert.equal((await increment(url, n)).status, 200);
      const cut = (await client.hold('web', 'checkpoint-1')).logPosition!;
      await client.release('web', 'checkpoint-1', first.upstream);
      for (let n = 3; n <= 6; n++) assert.equal((await increment(url, n)).status, 200);
      await first.kill();

      // Restored from the cut (count 2); it becomes unreachable after answering two replayed records.
      const restored = new CounterService(2);
      let answered = 0;
      const flaky = await httpUpstream((req, res) => {
        restored.handle(req, res);
        if (++answered === 2) {
          res.setHeader('connection', 'close');
          flaky.server.close();
        }
      });
      const port = flaky.upstream.port;
      await client.hold('web', 'failover-1', { drain: false });
      await assert.rejects(client.replay('web', cut, flaky.upstream), (err) => err instanceof Error && (err as { details?: { seq?: number; written?: boolean } }).details?.seq === 5 && (err as { details?: { written?: boolean } }).details?.written === false);
      assert.deepEqual(restored.applied, ['3', '4']);

      // Back on the same address: the replay sent again applies 5 and 6 only, once each.
      const back = await httpUpstream(restored.handle, port);
      const again = await client.replay('web', cut, back.upstream);
      assert.equal(again.lastSeq, 6);
      assert.deepEqual(restored.applied, ['3', '4', '5', '6']);
      assert.equal(restored.count, 6);
      await client.release('web', 'failover-1', back.upstream);
      await back.kill();

      // A record that was sent but not answered may have been applied: going on is refused.
      const dropping = await httpUpstream((req) => req.socket.destroy());
      await client.hold('web', 'failover-2', { drain: false });
      await assert.rejects(client.replay('web', cut, dropping.upstream), (err) => (err as { details?: { written?: boolean } }).details?.written === true);
      await assert.rejects(client.replay('web', cut, dropping.upstream), (err) => err instanceof ConflictError && /may or may not have been applied/.test(err.message) && err.details.written === true);
      await dropping.kill();
    }));

  it("a replay to a host that is gone stops at its first failed connect (the controller restores elsewhere; retrying would wait out ARP each time)", () =>
    withGateway(async ({ client }) => {
      // The project's guard: every test address without a route is unreachable at once.
      await guardTestRange();
      const counter = new CounterService(0);
      const first = await httpUpstream(counter.handle);
      const url = await loggedRoute(client, 'web', first.upstream);
      const cut = (await client.hold('web', 'checkpoint-1')).logPosition!;
      await client.release('web', 'checkpoint-1', first.upstream);
      assert.equal((await increment(url, 1)).status, 200);
      await first.kill();
      await client.hold('web', 'failover-1', { drain: false });
      const gone: Upstream = { address: '198.19.254.254', port: 80 };
      await assert.rejects(client.replay('web', cut, gone), (err: Error & { details?: { written?: boolean } }) => {
        assert.match(err.message, /failed after 1 attempts \(connect EHOSTUNREACH/);
        assert.equal(err.details?.written, false);
        return true;
      });
    }));

  it('refuses to go on with a replay the gateway restarted during: what the copy applied is unknown', () =>
    withLogDir(async (dir) => {
      const counter = new CounterService(0);
      const upstream = await httpUpstream(counter.handle);
      const options = { apiListen: { host: LOOPBACK, port: 0 }, routeHost: LOOPBACK, token: TOKEN, stateFile: join(dir, 'routes.json'), logger: pino({ level: 'silent' }) };
      const first = await startGateway(options);
      let cut: { logId: string; seq: number };
      try {
        const client = new GatewayClient({ url: first.url, token: TOKEN });
        const url = await loggedRoute(client, 'web', upstream.upstream);
        cut = (await client.hold('web', 'checkpoint-1')).logPosition!;
        await client.release('web', 'checkpoint-1', upstream.upstream);
        for (let n = 1; n <= 3; n++) assert.equal((await increment(url, n)).status, 200);
        await client.hold('web', 'failover-1', { drain: false });
        assert.equal((await client.replay('web', cut, upstream.upstream)).replayed, 3);
      } finally {
        await first.close();
      }
      const second = await startGateway(options);
      try {
        const client = new GatewayClient({ url: second.url, token: TOKEN });
        assert.deepEqual((await client.getRoute('web')).migration?.replay, { after: cut, upstream: upstream.upstream });
        const applied = counter.applied.length;
        await assert.rejects(client.replay('web', cut, upstream.upstream), (err) => err instanceof ConflictError && /gateway restarted during it/.test(err.message) && err.details.written === true);
        assert.equal(counter.applied.length, applied, 'nothing applied twice');
        await client.release('web', 'failover-1', upstream.upstream);
      } finally {
        await second.close();
        await upstream.kill();
      }
    }));
  // The restored copy's kernel resets a connection it does not know, or (CRIU's per-connection
  // network lock left in place) drops what arrives on it: a logged POST would be parked, or in
  // flight for good, and every checkpoint after it would find no clean cut.
  for (const lost of ['reset', 'dropped'] as const) {
    it(`sends what a rollback released on new connections: the copy restored at the same address lost the old ones (${lost})`, () =>
      withGateway(
        async ({ client }) => {
          const counter = new CounterService(0);
          const backend = await httpUpstream(counter.handle);
          const container = await restorableInPlace(backend.upstream.port);
          try {
            const url = await loggedRoute(client, 'web', container.upstream);
            assert.equal((await increment(url, 1)).status, 200, 'a kept-alive connection to the container now exists');

            await client.hold('web', 'migration-1');
            const held = increment(url, 2);
            await eventually(async () => (await client.getRoute('web')).held === 1, 'the request held');
            // The migration froze and dumped the container, failed, and restored it where it was
            // (same address): its connections came back closed, without a word to the gateway.
            container.dumpAndRestore(lost);
            await client.release('web', 'migration-1', container.upstream);

            const answer = await Promise.race([held, sleep(3_000).then(() => 'no answer in 3 s')]);
            assert.deepEqual(answer, { status: 200, reason: undefined }, 'answered by the restored container, not parked or stuck on a dead connection');
            assert.deepEqual(counter.applied, ['1', '2']);
            assert.equal((await client.hold('web', 'checkpoint-1')).uncleanCut, undefined, 'the next checkpoint has a clean cut');
            await client.release('web', 'checkpoint-1', container.upstream);
          } finally {
            await container.close();
            await backend.kill();
          }
        },
        { maxReplayWaitMs: 1_000 },
      ));
  }
});

/**
 * A container in front of `backendPort` whose dump and restore in place (CRIU's tcp-close) can be
 * played: connections open at the dump are dead afterwards; what a peer writes to one gets a
 * reset, or is dropped.
 */
async function restorableInPlace(backendPort: number): Promise<{ upstream: Upstream; dumpAndRestore(lost: 'reset' | 'dropped'): void; close(): Promise<void> }> {
  const connections = new Set<{ client: Socket; dead?: 'reset' | 'dropped' }>();
  const server = createNetServer((clientSocket) => {
    const backend = connect(backendPort, LOOPBACK);
    const entry: { client: Socket; dead?: 'reset' | 'dropped' } = { client: clientSocket };
    connections.add(entry);
    clientSocket.on('data', (chunk) => {
      if (entry.dead === 'reset') clientSocket.resetAndDestroy();
      else if (!entry.dead) backend.write(chunk);
    });
    backend.on('data', (chunk) => entry.dead || clientSocket.write(chunk));
    const end = (): void => {
      connections.delete(entry);
      clientSocket.destroy();
      backend.destroy();
    };
    clientSocket.on('close', end).on('error', end);
    backend.on('close', end).on('error', end);
  });
  await new Promise<void>((resolve) => server.listen(0, LOOPBACK, resolve));
  return {
    upstream: { address: LOOPBACK, port: (server.address() as { port: number }).port },
    dumpAndRestore: (lost) => {
      for (const entry of connections) entry.dead = lost;
    },
    close: async () => {
      for (const entry of connections) entry.client.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
