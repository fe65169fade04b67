// The CLI against a fake controller on loopback: what it sends, what it prints for people and
// for scripts (--json), and how it reports the controller's errors.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

import type { ContainerView, ControllerView, MigrationEvent, MigrationSummary, NodeView, RunRequest } from '../../src/shared/protocol.js';
import { runCli } from './run-cli.js';

const TOKEN = 'test-token';

const nodes: NodeView[] = [
  { name: 'node1', address: '198.18.0.11', url: 'http://198.18.0.11:7401', status: 'ready', lastSeen: '2025-01-01T00:00:00Z' },
  { name: 'node2', address: '198.18.0.12', url: 'http://198.18.0.12:7401', status: 'unreachable' },
];
/** Two controllers on the nodes, the one on node2 leading (as an HA cluster lists them). */
const controllers: ControllerView[] = [
  { id: 'controller-b', url: 'http://198.18.0.12:7400', node: 'node2', leader: true, term: 42 },
  { id: 'controller-a', url: 'http://198.18.0.11:7400', node: 'node1', leader: false },
];
const web: ContainerView = {
  name: 'web',
  node: 'node1',
  status: 'running',
  image: 'statefulapp',
  ports: ['198.18.0.11:8080->80/tcp'],
  endpoints: [],
  ip: '198.19.1.2',
  createdAt: '2025-01-01T00:00:00Z',
};
const summary: MigrationSummary = {
  id: 'm1',
  name: 'web',
  from: 'node1',
  to: 'node2',
  mode: 'lazy',
  downtimeMs: 321,
  totalMs: 1234,
  bytesTransferred: 5 * 1024 * 1024,
  phases: [
    { phase: 'dump', ms: 250, steps: [{ step: 'freeze', ms: 100 }, { step: 'criu-dump', ms: 140 }] },
    { phase: 'transfer', ms: 600 },
  ],
};
const events: MigrationEvent[] = [
  { migrationId: 'm1', phase: 'prepare', at: 1 },
  { migrationId: 'm1', phase: 'dump', at: 2 },
  { migrationId: 'm1', phase: 'transfer', at: 3, bytes: 1024 * 1024, totalBytes: 5 * 1024 * 1024 },
  { migrationId: 'm1', phase: 'transfer', at: 4, bytes: 5 * 1024 * 1024, totalBytes: 5 * 1024 * 1024 },
  { migrationId: 'm1', phase: 'restore', at: 5 },
];

/** The URL of a port nothing listens on (it was just closed). */
async function closedPortUrl(): Promise<string> {
  const closed = createServer();
  await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
  const port = (closed.address() as AddressInfo).port;
  await new Promise((resolve) => closed.close(resolve));
  return `http://127.0.0.1:${port}`;
}

async function bodyOf(req: IncomingMessage): Promise<unknown> {
  let text = '';
  for await (const chunk of req) text += chunk;
  return text ? JSON.parse(text) : undefined;
}

function json(res: ServerResponse, status: number, value: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(value));
}

/** Writes the NDJSON lines one by one, as the controller does while a migration runs. */
async function ndjson(res: ServerResponse, lines: unknown[]): Promise<void> {
  res.writeHead(200, { 'content-type': 'application/x-ndjson' });
  for (const line of lines) {
    res.write(`${JSON.stringify(line)}\n`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  res.end();
}

describe('chipmunk against a controller', () => {
  let server: Server;
  let env: Record<string, string>;
  const received: { method: string; url: string; body: unknown }[] = [];

  before(async () => {
    server = createServer(async (req, res) => {
      if (req.headers.authorization !== `Bearer ${TOKEN}`) {
        json(res, 401, { code: 'CHIPMUNK_UNAUTHORIZED', message: 'missing or wrong cluster token' });
        return;
      }
      const body = await bodyOf(req);
      received.push({ method: req.method!, url: req.url!, body });
      const route = `${req.method} ${req.url}`;
      if (route === 'GET /v1/nodes') return json(res, 200, nodes);
      if (route === 'GET /v1/controllers') return json(res, 200, controllers);
      if (route === 'GET /v1/containers') return json(res, 200, [web]);
      if (route === 'POST /v1/containers') return json(res, 201, { ...web, name: (body as RunRequest).spec.name });
      if (route === 'GET /v1/containers/web/logs') return void res.writeHead(200, { 'content-type': 'text/plain' }).end('line 1\nline 2\n');
      if (route === 'POST /v1/containers/web/stop') return json(res, 200, { ...web, status: 'stopped' });
      if (route === 'DELETE /v1/containers/web') return void res.writeHead(204).end();
      if (route === 'POST /v1/containers/web/migrate') return ndjson(res, [...events, { summary }]);
      if (route === 'POST /v1/containers/broken/migrate') {
        return ndjson(res, [
          events[0],
          { error: { code: 'CHIPMUNK_MIGRATION_FAILED', message: 'restore on node2 failed', details: { phase: 'restore', node: 'node2', rolledBack: true } } },
        ]);
      }
      if (route === 'POST /v1/containers/cut/migrate') return ndjson(res, events.slice(0, 2));
      if (route === 'POST /v1/containers/dropped/migrate') {
        // The controller dies mid-stream: the connection ends without a proper end of the response.
        res.writeHead(200, { 'content-type': 'application/x-ndjson' });
        res.write(`${JSON.stringify(events[0])}\n`);
        setTimeout(() => res.socket?.destroy(), 20);
        return;
      }
      json(res, 404, { code: 'CHIPMUNK_NOT_FOUND', message: `no route ${route}` });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    env = { CHIPMUNK_CONTROLLER: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, CHIPMUNK_TOKEN: TOKEN };
  });

  after(() => {
    server.close();
  });

  function lastBodySentTo(method: string, url: string): unknown {
    return received.filter((r) => r.method === method && r.url === url).at(-1)?.body;
  }

  it('node ls --json prints name, address and status of each node, and the controller on it', async () => {
    const result = await runCli(['node', 'ls', '--json'], env);
    assert.equal(result.code, 0, result.stderr);
    assert.deepEqual(JSON.parse(result.stdout), [
      { name: 'node1', address: '198.18.0.11', status: 'ready', controller: { role: 'follower' } },
      { name: 'node2', address: '198.18.0.12', status: 'unreachable', controller: { role: 'leader', term: 42 } },
    ]);
    const table = await runCli(['node', 'ls'], env);
    assert.match(table.stdout, /^NAME\s+ADDRESS\s+STATUS\s+CONTROLLER\n/);
    assert.match(table.stdout, /node2\s+198\.18\.0\.12\s+unreachable\s+leader \(term 42\)/);
  });

  it('ps prints a table, and ps --json the documented fields only', async () => {
    const table = await runCli(['ps'], env);
    assert.equal(table.code, 0, table.stderr);
    assert.match(table.stdout, /^NAME\s+NODE\s+STATUS\s+IMAGE\s+PORTS\s+ENDPOINTS\s+CHECKPOINTS\nweb\s+node1\s+running\s+statefulapp\s+198\.18\.0\.11:8080->80\/tcp\s+-\s*\n$/);
    const result = await runCli(['ps', '--json'], env);
    assert.deepEqual(JSON.parse(result.stdout), [
      { name: 'web', node: 'node1', status: 'running', image: 'statefulapp', ports: ['198.18.0.11:8080->80/tcp'], endpoints: [] },
    ]);
  });

  it('run sends the parsed spec; words after IMAGE are the command, dashes included', async () => {
    const args = ['run', '--name', 'cache', '--node', 'node2', '-p', '6379:6379', '-p', '5353:53/udp', '-e', 'A=1', '-e', 'B=x=y', '--memory', '256m'];
    const result = await runCli([...args, '--json', 'redis', 'redis-server', '--port', '6379'], env);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(JSON.parse(result.stdout).name, 'cache');
    const request = lastBodySentTo('POST', '/v1/containers');
    assert.deepEqual(request, {
      node: 'node2',
      spec: {
        name: 'cache',
        image: 'redis',
        command: ['redis-server', '--port', '6379'],
        env: { A: '1', B: 'x=y' },
        ports: [
          { hostPort: 6379, containerPort: 6379, protocol: 'tcp' },
          { hostPort: 5353, containerPort: 53, protocol: 'udp' },
        ],
        memoryBytes: 256 * 1024 * 1024,
      },
    });
  });

  it('logs, stop and rm', async () => {
    const logs = await runCli(['logs', 'web'], env);
    assert.equal(logs.stdout, 'line 1\nline 2\n');
    assert.deepEqual(JSON.parse((await runCli(['logs', 'web', '--json'], env)).stdout), { name: 'web', logs: 'line 1\nline 2\n' });
    const stop = await runCli(['stop', 'web'], env);
    assert.equal(stop.stdout, 'web stopped on node1 (198.18.0.11:8080->80/tcp)\n');
    const rm = await runCli(['rm', 'web', '--json'], env);
    assert.deepEqual(JSON.parse(rm.stdout), { name: 'web', removed: true });
  });

  it('migrate --json prints only the final summary object', async () => {
    const result = await runCli(['migrate', 'web', '--to', 'node2', '--mode', 'lazy', '--json'], env);
    assert.equal(result.code, 0, result.stderr);
    assert.deepEqual(JSON.parse(result.stdout), { name: 'web', from: 'node1', to: 'node2', mode: 'lazy', downtimeMs: 321, totalMs: 1234, bytesTransferred: 5 * 1024 * 1024 });
    assert.deepEqual(lastBodySentTo('POST', '/v1/containers/web/migrate'), { to: 'node2', mode: 'lazy' });
  });

  it('migrate without a terminal prints one line per phase, then the summary table', async () => {
    const result = await runCli(['migrate', 'web', '--to', 'node2'], env);
    assert.equal(result.code, 0, result.stderr);
    const [progress] = result.stdout.split('migrated');
    const phases = progress!.split('\n').filter(Boolean);
    assert.deepEqual(phases.map((line) => line.split(/\s+/)[0]), ['prepare', 'dump', 'transfer', 'restore']);
    assert.match(result.stdout, /transfer\s+1\.0 MiB \/ 5\.0 MiB/);
    assert.match(result.stdout, /migrated web from node1 to node2 \(lazy\)/);
    assert.match(result.stdout, /downtime\s+321 ms\ntotal\s+1\.23 s\ntransferred\s+5\.0 MiB/);
    assert.match(result.stdout, /dump\s+250 ms\n  freeze\s+100 ms\n  criu-dump\s+140 ms\ntransfer\s+600 ms/, "a phase's steps, indented below it");
    assert.deepEqual(lastBodySentTo('POST', '/v1/containers/web/migrate'), { to: 'node2' });
  });

  it('migrate reports a failed migration with its code, on stderr and (with --json) on stdout', async () => {
    const result = await runCli(['migrate', 'broken', '--to', 'node2', '--json'], env);
    assert.equal(result.code, 1);
    assert.match(result.stderr, /^error: restore on node2 failed \(CHIPMUNK_MIGRATION_FAILED\)/);
    assert.deepEqual(JSON.parse(result.stdout), {
      error: { code: 'CHIPMUNK_MIGRATION_FAILED', message: 'restore on node2 failed', details: { phase: 'restore', node: 'node2', rolledBack: true } },
    });
  });

  it('migrate fails clearly when the stream ends without a summary', async () => {
    const result = await runCli(['migrate', 'cut', '--to', 'node2'], env);
    assert.equal(result.code, 1);
    assert.match(result.stderr, /lost the progress stream of the migration of cut to node2 before it finished \(the controller closed it\)/);
    assert.match(result.stderr, /chipmunk ps/);
  });

  it('migrate says where to look when the controller dies mid-stream', async () => {
    const result = await runCli(['migrate', 'dropped', '--to', 'node2'], env);
    assert.equal(result.code, 1);
    assert.match(result.stderr, /lost the progress stream of the migration of dropped to node2 before it finished \(.+\).*'chipmunk ps' and 'chipmunk migrations' \(CHIPMUNK_UNAVAILABLE\)/);
  });

  it('with several controller URLs, goes on to the next when one cannot be reached', async () => {
    const dead = await closedPortUrl();
    const result = await runCli(['ps', '--json', '--controller', `${dead},${env.CHIPMUNK_CONTROLLER}`], env);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(JSON.parse(result.stdout)[0].name, 'web');
    const none = await runCli(['ps'], { ...env, CHIPMUNK_CONTROLLER: `${dead},${await closedPortUrl()}` });
    assert.equal(none.code, 1);
    assert.match(none.stderr, /^error: no controller answers: .*ECONNREFUSED.*; .*ECONNREFUSED/);
  });

  it('never sends a mutation to a second controller once the first may have received it', async () => {
    let runs = 0;
    const dropping = createServer((req) => {
      runs++;
      req.socket.destroy(); // the request arrived; the answer is lost
    });
    await new Promise<void>((resolve) => dropping.listen(0, '127.0.0.1', resolve));
    const droppingUrl = `http://127.0.0.1:${(dropping.address() as AddressInfo).port}`;
    try {
      const before = received.filter((r) => r.method === 'POST' && r.url === '/v1/containers').length;
      const result = await runCli(['run', '--controller', `${droppingUrl},${env.CHIPMUNK_CONTROLLER}`, '--name', 'once', 'img'], env);
      assert.equal(result.code, 1);
      assert.match(result.stderr, /may have reached it, so it was not sent to another controller/);
      assert.equal(runs, 1);
      assert.equal(received.filter((r) => r.method === 'POST' && r.url === '/v1/containers').length, before, 'the second controller got nothing');
      // A read is safe to send again: it goes on to the next controller.
      const ps = await runCli(['ps', '--json', '--controller', `${droppingUrl},${env.CHIPMUNK_CONTROLLER}`], env);
      assert.equal(ps.code, 0, ps.stderr);
    } finally {
      dropping.close();
    }
  });

  it('waits out an election: a mutation that reached no leader is sent again', async () => {
    let asked = 0;
    const electing = createServer((_req, res) => {
      asked++;
      if (asked <= 2) return json(res, 503, { code: 'CHIPMUNK_NOT_LEADER', message: 'no controller leads right now' });
      json(res, 200, { ...web, status: 'stopped' });
    });
    await new Promise<void>((resolve) => electing.listen(0, '127.0.0.1', resolve));
    try {
      const url = `http://127.0.0.1:${(electing.address() as AddressInfo).port}`;
      const result = await runCli(['stop', 'web', '--json', '--controller', url], env);
      assert.equal(result.code, 0, result.stderr);
      assert.equal(JSON.parse(result.stdout).status, 'stopped');
      assert.equal(asked, 3);
    } finally {
      electing.close();
    }
  });

  it('refuses a bad controller URL list before sending anything', async () => {
    const result = await runCli(['ps', '--controller', `${env.CHIPMUNK_CONTROLLER},`], env);
    assert.equal(result.code, 2);
    assert.match(result.stderr, /bad URL list/);
  });

  it('reports the controller\'s errors with exit code 1', async () => {
    const notFound = await runCli(['stop', 'ghost'], env);
    assert.equal(notFound.code, 1);
    assert.match(notFound.stderr, /^error: .* \(CHIPMUNK_NOT_FOUND\)/);
    const unauthorized = await runCli(['ps'], { ...env, CHIPMUNK_TOKEN: 'wrong' });
    assert.equal(unauthorized.code, 1);
    assert.match(unauthorized.stderr, /\(CHIPMUNK_UNAUTHORIZED\)/);
  });

  it('says so when the controller is unreachable', async () => {
    const result = await runCli(['ps', '--json'], { ...env, CHIPMUNK_CONTROLLER: await closedPortUrl() });
    assert.equal(result.code, 1);
    assert.match(result.stderr, /^error: controller is unreachable at http:\/\/127\.0\.0\.1:\d+ \(ECONNREFUSED\) \(CHIPMUNK_UNAVAILABLE\)/);
    assert.equal(JSON.parse(result.stdout).error.code, 'CHIPMUNK_UNAVAILABLE');
  });
});
