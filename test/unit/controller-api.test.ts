import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import { request } from 'undici';
import { ChipmunkError, ConflictError, InvalidInputError, NotFoundError, RuntimeFailedError, UnauthorizedError } from '../../src/shared/errors.js';
import { ControllerClient } from '../../src/shared/controller-client.js';
import { ApiClient } from '../../src/shared/http.js';
import type { HeartbeatResponse, MigrationEvent, MigrationSummary, RegisterNodeRequest } from '../../src/shared/protocol.js';
import { startController, type ControllerOptions, type RunningController } from '../../src/controller/index.js';
import { FakeCluster } from '../fakes/agents.js';

const TOKEN = 'test-token';

interface Env {
  controller: RunningController;
  /** The typed client everyone uses; `api` sends raw requests where the wire format is under test. */
  client: ControllerClient;
  api: ApiClient;
  cluster: FakeCluster;
}

async function withController(run: (env: Env) => Promise<void>, opts: Partial<ControllerOptions> & { cluster?: FakeCluster } = {}): Promise<void> {
  const cluster = opts.cluster ?? twoNodeCluster();
  const controller = await startController({
    listen: { host: '127.0.0.1', port: 0 },
    token: TOKEN,
    storeSpec: 'memory:',
    logger: pino({ level: 'silent' }),
    agentFactory: cluster.resolver,
    ...opts,
  });
  try {
    await run({ controller, client: new ControllerClient({ urls: [controller.url], token: TOKEN }), api: new ApiClient({ baseUrl: controller.url, token: TOKEN, peer: 'controller' }), cluster });
  } finally {
    await controller.close();
  }
}

function twoNodeCluster(): FakeCluster {
  const cluster = new FakeCluster();
  cluster.add('node1');
  cluster.add('node2');
  return cluster;
}

/** What an agent's heartbeat does. */
function heartbeat(controller: RunningController, node: RegisterNodeRequest): Promise<HeartbeatResponse> {
  return new ControllerClient({ urls: [controller.url], token: TOKEN }).heartbeat(node);
}

async function registerAll(env: Env, names = ['node1', 'node2']): Promise<void> {
  for (const name of names) await heartbeat(env.controller, env.cluster.agent(name).registration());
}

function runRequest(name: string, extra: { node?: string; image?: string } = {}) {
  return { spec: { name, image: extra.image ?? 'counter', ports: [{ hostPort: 8080, containerPort: 80 }] }, ...(extra.node ? { node: extra.node } : {}) };
}

type MigrateLine = MigrationEvent | { summary: MigrationSummary } | { error: { code: string; message: string; details?: Record<string, unknown> } };

async function migrate(client: ApiClient, name: string, body: { to: string; mode?: string }): Promise<{ contentType: string; lines: MigrateLine[] }> {
  const res = await client.stream('POST', `/v1/containers/${name}/migrate`, body);
  const text = await res.body.text();
  assert.ok(text.endsWith('\n'), 'every NDJSON line ends with a newline');
  return { contentType: String(res.headers['content-type']), lines: text.trimEnd().split('\n').map((line) => JSON.parse(line) as MigrateLine) };
}

describe('controller HTTP API', () => {
  it('requires the cluster token everywhere but the health check', () =>
    withController(async ({ controller }) => {
      const health = await request(`${controller.url}/healthz`);
      assert.equal(health.statusCode, 200);
      assert.deepEqual(await health.body.json(), { ok: true });

      const anonymous = await request(`${controller.url}/v1/containers`);
      assert.equal(anonymous.statusCode, 401);
      assert.equal(((await anonymous.body.json()) as { code: string }).code, 'CHIPMUNK_UNAUTHORIZED');

      const wrong = new ApiClient({ baseUrl: controller.url, token: 'not-the-token' });
      await assert.rejects(wrong.get('/v1/nodes'), UnauthorizedError);
    }));

  it('a controller that runs alone lists itself as the leader, without a term', () =>
    withController(async (env) => {
      const [self, ...others] = await env.client.controllers();
      assert.deepEqual(others, []);
      assert.deepEqual([self?.url, self?.leader, self?.term, self?.node], [env.controller.url, true, undefined, undefined]);
    }));

  it('registers nodes by heartbeat and lists them', () =>
    withController(async (env) => {
      await registerAll(env);
      const nodes = await env.client.nodes();
      assert.deepEqual(
        nodes.map((node) => [node.name, node.address, node.status]),
        [
          ['node1', '10.0.0.1', 'ready'],
          ['node2', '10.0.0.2', 'ready'],
        ],
      );
      const res = await request(`${env.controller.url}/v1/nodes/node1`, {
        method: 'PUT',
        headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
        body: JSON.stringify(env.cluster.agent('node2').registration()),
      });
      assert.equal(res.statusCode, 400, 'the path and the body must name the same node');
      await res.body.dump();
    }));

  it('turns a node unreachable when its heartbeats stop', () =>
    withController(
      async (env) => {
        await registerAll(env, ['node1']);
        assert.equal((await env.client.nodes())[0].status, 'ready');
        await sleep(300);
        assert.equal((await env.client.nodes())[0].status, 'unreachable');
        await assert.rejects(env.client.run(runRequest('web', { node: 'node1' })), /node node1 is unreachable/);
        await heartbeat(env.controller, env.cluster.agent('node1').registration());
        assert.equal((await env.client.nodes())[0].status, 'ready');
      },
      { nodeReadyWithinMs: 100 },
    ));

  it('runs containers, lists them with their published ports, and places by load', () =>
    withController(async (env) => {
      await registerAll(env);
      const web = await env.client.run(runRequest('web', { node: 'node2' }));
      assert.deepEqual([web.name, web.node, web.status, web.ports], ['web', 'node2', 'running', ['10.0.0.2:8080->80/tcp']]);
      const db = await env.client.run(runRequest('db'));
      assert.equal(db.node, 'node1', 'the ready node with fewer containers');

      const listed = await env.client.containers();
      assert.deepEqual(
        listed.map((view) => [view.name, view.node, view.ports[0]]),
        [
          ['db', 'node1', '10.0.0.1:8080->80/tcp'],
          ['web', 'node2', '10.0.0.2:8080->80/tcp'],
        ],
      );

      const logs = await env.client.logs('web', { stream: 'stdout', tail: 10 });
      assert.match(String(logs.headers['content-type']), /^text\/plain/);
      assert.equal(await logs.body.text(), 'web on node2 (stdout)\n');

      const stopped = await env.client.stop('web');
      assert.equal(stopped.status, 'stopped');
      await env.client.remove('web');
      assert.deepEqual((await env.client.containers()).map((view) => view.name), ['db']);
      assert.equal(env.cluster.agent('node2').containers.has('web'), false);
    }));

  it('refuses bad runs with clear errors and records nothing', () =>
    withController(async (env) => {
      await registerAll(env);
      await env.client.run(runRequest('web'));

      await assert.rejects(env.client.run(runRequest('api', { node: 'node7' })), (err: unknown) => {
        assert.ok(err instanceof InvalidInputError);
        assert.match(err.message, /unknown node "node7".*chipmunk node ls/);
        return true;
      });
      await assert.rejects(env.client.run(runRequest('web')), ConflictError);
      // The agent's own refusal comes through unchanged (an agent answers an unknown image with CHIPMUNK_INVALID_INPUT).
      await assert.rejects(env.client.run(runRequest('api', { image: 'missing-image' })), (err: unknown) => {
        assert.ok(err instanceof InvalidInputError);
        assert.match(err.message, /unknown image 'missing-image'.*node/);
        return true;
      });
      await assert.rejects(env.client.run({ spec: { name: 'Bad Name', image: 'counter' } }), InvalidInputError);

      assert.deepEqual((await env.client.containers()).map((view) => view.name), ['web']);
      await assert.rejects(env.client.stop('nope'), NotFoundError);
    }));

  it('streams a migration as NDJSON, ending with its summary', () =>
    withController(async (env) => {
      await registerAll(env);
      await env.client.run(runRequest('web', { node: 'node1' }));

      const { contentType, lines } = await migrate(env.api, 'web', { to: 'node2' });
      assert.match(contentType, /^application\/x-ndjson/);
      const events = lines.slice(0, -1) as MigrationEvent[];
      assert.deepEqual(
        events.map((event) => event.phase),
        ['prepare', 'dump', 'transfer', 'verify', 'cleanup', 'done'],
      );
      const last = lines.at(-1)!;
      assert.ok('summary' in last, `last line: ${JSON.stringify(last)}`);
      assert.deepEqual([last.summary.from, last.summary.to, last.summary.mode], ['node1', 'node2', 'lazy']);

      const [web] = await env.client.containers();
      assert.deepEqual([web.node, web.status, web.ports], ['node2', 'running', ['10.0.0.2:8080->80/tcp']]);
      const [record] = await env.client.migrations();
      assert.deepEqual([record.id, record.phase], [last.summary.id, 'done']);
      assert.equal(env.cluster.runningCopies('web'), 1);
    }));

  it('streams a failed migration to its error line; refuses an impossible one with an ordinary error', () =>
    withController(async (env) => {
      await registerAll(env);
      await env.client.run(runRequest('web', { node: 'node1' }));

      await assert.rejects(migrate(env.api, 'web', { to: 'node1' }), (err: unknown) => {
        assert.ok(err instanceof InvalidInputError);
        assert.match(err.message, /already on node node1/);
        return true;
      });
      await assert.rejects(migrate(env.api, 'web', { to: 'Not A Node' }), InvalidInputError);

      env.cluster.agent('node2').failNext('restore', new RuntimeFailedError('criu restore failed', { op: 'restore', logPath: '/var/log/r.log' }));
      const { lines } = await migrate(env.api, 'web', { to: 'node2' });
      const last = lines.at(-1)!;
      assert.ok('error' in last, `last line: ${JSON.stringify(last)}`);
      assert.equal(last.error.code, 'CHIPMUNK_MIGRATION_FAILED');
      assert.deepEqual([last.error.details?.phase, last.error.details?.node, last.error.details?.logPath], ['restore', 'node2', '/var/log/r.log']);
      assert.ok(!JSON.stringify(last).includes('    at '), 'no stack traces on the wire');
      assert.deepEqual(
        (lines.slice(0, -1) as MigrationEvent[]).map((event) => event.phase).slice(-2),
        ['rollback', 'failed'],
      );

      const [web] = await env.client.containers();
      assert.deepEqual([web.node, web.status], ['node1', 'running']);
      const [record] = await env.client.migrations();
      assert.equal(record.phase, 'failed');
      assert.equal(record.error?.code, 'CHIPMUNK_MIGRATION_FAILED');
      assert.equal(env.cluster.runningCopies('web'), 1);
    }));

  it('keeps nodes, containers and migrations across a restart with the SQLite store', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'chipmunk-controller-'));
    const cluster = twoNodeCluster();
    const storeSpec = `sqlite:${join(dir, 'state', 'controller.db')}`;
    try {
      await withController(
        async (env) => {
          await registerAll(env);
          await env.client.run(runRequest('web', { node: 'node1' }));
          await env.client.run(runRequest('db', { node: 'node2' }));
          await migrate(env.api, 'web', { to: 'node2' });
        },
        { storeSpec, cluster },
      );
      await withController(
        async (env) => {
          assert.deepEqual(
            (await env.client.containers()).map((view) => [view.name, view.node, view.status]),
            [
              ['db', 'node2', 'running'],
              ['web', 'node2', 'running'],
            ],
          );
          assert.deepEqual((await env.client.nodes()).map((node) => node.name), ['node1', 'node2']);
          assert.deepEqual((await env.client.migrations()).map((record) => record.phase), ['done']);
        },
        { storeSpec, cluster },
      );
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('says so when it cannot listen', () =>
    withController(async ({ controller }) => {
      const port = Number(new URL(controller.url).port);
      await assert.rejects(
        startController({ listen: { host: '127.0.0.1', port }, token: TOKEN, storeSpec: 'memory:', logger: pino({ level: 'silent' }) }),
        (err: unknown) => err instanceof ChipmunkError && /cannot listen on 127\.0\.0\.1:\d+ \(EADDRINUSE\)/.test(err.message),
      );
    }));
});
