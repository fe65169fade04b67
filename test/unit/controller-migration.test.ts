import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import {
  CapabilityMissingError,
  InvalidInputError,
  MigrationFailedError,
  MigrationInProgressError,
  NotFoundError,
  RuntimeFailedError,
  TransferFailedError,
} from '../../src/shared/errors.js';
import type { ContainerSpec, MigrationEvent, MigrationRecord, MigrationPhaseName } from '../../src/shared/protocol.js';
import { ContainerService, containerKey, type ContainerRecord } from '../../src/controller/containers.js';
import { MigrationOrchestrator, migrationKey } from '../../src/controller/migration.js';
import { NodeRegistry } from '../../src/controller/registry.js';
import { MemoryStore } from '../../src/controller/store/index.js';
import { FAKE_LAZY_PAGES_BYTES, FakeCluster } from '../fakes/agents.js';

const silent = pino({ level: 'silent' });

function spec(name: string): ContainerSpec {
  return { name, image: 'counter', command: [], env: {}, ports: [{ hostPort: 8080, containerPort: 80, protocol: 'tcp' }], memoryBytes: 0 };
}

/** Two nodes with fake agents, and `web` running on node1. */
async function setup(opts: { lazy?: { node1?: boolean; node2?: boolean } } = {}) {
  const store = new MemoryStore();
  const cluster = new FakeCluster();
  cluster.add('node1', { lazyMigration: opts.lazy?.node1 ?? true });
  cluster.add('node2', { lazyMigration: opts.lazy?.node2 ?? true });
  const nodes = new NodeRegistry(store);
  for (const node of ['node1', 'node2']) await nodes.heartbeat(cluster.agent(node).registration());
  const containers = new ContainerService(store, nodes, cluster.resolver);
  const orchestrator = () => new MigrationOrchestrator({ store, nodes, agentFor: cluster.resolver, log: silent });
  const migrations = orchestrator();
  await containers.run({ spec: spec('web'), node: 'node1' });
  cluster.calls.length = 0;
  const record = async (name = 'web') => (await store.get<ContainerRecord>(containerKey(name)))!.value;
  return { store, cluster, nodes, containers, migrations, orchestrator, record };
}

type Setup = Awaited<ReturnType<typeof setup>>;

async function migrateExpectingFailure(env: Setup, to = 'node2'): Promise<{ error: MigrationFailedError; events: MigrationEvent[] }> {
  const events: MigrationEvent[] = [];
  const error = await env.migrations.migrate('web', { to }, (event) => events.push(event)).then(
    () => assert.fail('the migration should have failed'),
    (err: unknown) => err,
  );
  assert.ok(error instanceof MigrationFailedError, `expected MigrationFailedError, got ${String(error)}`);
  return { error, events };
}

/** The container is back on node1, running, unlocked, and the migration is recorded as rolled back and failed. */
async function assertRolledBack(env: Setup): Promise<void> {
  assert.equal(env.cluster.runningCopies('web'), 1);
  assert.equal(env.cluster.agent('node1').containers.get('web')?.status, 'running');
  const container = await env.record();
  assert.equal(container.node, 'node1');
  assert.equal(container.status, 'running');
  assert.equal(container.migration, undefined);
  const [migration] = await env.migrations.list();
  assert.equal(migration.phase, 'failed');
  assert.deepEqual(migration.history.slice(-2).map((event) => event.phase), ['rollback', 'failed']);
  assert.equal(migration.error?.code, 'CHIPMUNK_MIGRATION_FAILED');
}

function assertAbortBeforeRollback(cluster: FakeCluster): void {
  const abort = cluster.callIndex('node2.abort');
  const rollback = cluster.callIndex('node1.rollback');
  assert.ok(abort >= 0, `the target was not asked to abort: ${cluster.calls.join(', ')}`);
  assert.ok(rollback > abort, `the source rolled back before the target aborted: ${cluster.calls.join(', ')}`);
}

describe('migration orchestrator', () => {
  it('moves the container, records each phase in order, and summarizes', async () => {
    const env = await setup();
    const events: MigrationEvent[] = [];
    const summary = await env.migrations.migrate('web', { to: 'node2' }, (event) => events.push(event));

    const phases: MigrationPhaseName[] = ['prepare', 'dump', 'transfer', 'verify', 'cleanup', 'done'];
    assert.deepEqual(events.map((event) => event.phase), phases);
    assert.ok(events.every((event, i) => i === 0 || event.at >= events[i - 1].at));
    assert.ok(events.every((event) => event.migrationId === summary.id));

    assert.equal(summary.mode, 'lazy');
    assert.deepEqual([summary.name, summary.from, summary.to], ['web', 'node1', 'node2']);
    assert.equal(summary.bytesTransferred, 4096 + FAKE_LAZY_PAGES_BYTES, "images and files, then the lazily copied pages");
    assert.ok(summary.downtimeMs >= 0 && summary.downtimeMs <= summary.totalMs);
    assert.deepEqual(summary.phases.map((phase) => phase.phase), phases.slice(0, -1));

    const container = await env.record();
    assert.equal(container.node, 'node2');
    assert.equal(container.generation, 1);
    assert.equal(container.ip, env.cluster.agent('node2').containers.get('web')?.ip);
    assert.equal(container.migration, undefined);
    assert.equal(env.cluster.runningCopies('web'), 1);
    assert.equal(env.cluster.agent('node1').containers.has('web'), false);

    const [dump] = env.cluster.agent('node1').dumpRequests;
    assert.ok(dump.pageServerPort! >= 27000 && dump.pageServerPort! <= 27999, 'lazy mode gets a page server port');
    const stored = (await env.store.get<MigrationRecord>(migrationKey(summary.id)))!.value;
    assert.equal(stored.phase, 'done');
    assert.deepEqual(stored.history, events);
    assert.deepEqual(stored.summary, summary);

    // And back again: the container record follows.
    await env.migrations.migrate('web', { to: 'node1' });
    assert.equal((await env.record()).node, 'node1');
    assert.equal((await env.record()).generation, 2);
    assert.equal(env.cluster.runningCopies('web'), 1);
  });

  it('uses copy mode when a node lacks lazy migration, without a page server', async () => {
    const env = await setup({ lazy: { node2: false } });
    const summary = await env.migrations.migrate('web', { to: 'node2' });
    assert.equal(summary.mode, 'copy');
    assert.equal(env.cluster.agent('node1').dumpRequests[0].pageServerPort, undefined);
  });

  it('refuses lazy mode when the target lacks it, naming copy mode, and changes nothing', async () => {
    const env = await setup({ lazy: { node2: false } });
    const revision = await env.store.currentRevision();
    await assert.rejects(env.migrations.migrate('web', { to: 'node2', mode: 'lazy' }), (err: unknown) => {
      assert.ok(err instanceof CapabilityMissingError);
      assert.match(err.message, /--mode copy/);
      assert.match(err.message, /node2/);
      return true;
    });
    assert.equal(await env.store.currentRevision(), revision);
    assert.deepEqual(env.cluster.calls, []);
  });

  it('gives concurrent lazy migrations different page server ports', async () => {
    const env = await setup();
    await env.containers.run({ spec: spec('db'), node: 'node1' });
    const release = env.cluster.agent('node1').hold('dump');
    const both = Promise.all([env.migrations.migrate('web', { to: 'node2' }), env.migrations.migrate('db', { to: 'node2' })]);
    while (env.cluster.calls.filter((call) => call === 'node1.dump').length < 2) await sleep(1);
    release();
    await both;
    const ports = env.cluster.agent('node1').dumpRequests.map((req) => req.pageServerPort);
    assert.equal(new Set(ports).size, 2);
  });

  describe('failures leave the container running on the source exactly once', () => {
    it('at dump, before the source froze it', async () => {
      const env = await setup();
      env.cluster.agent('node1').failNext('dump', new RuntimeFailedError('criu dump failed', { op: 'dump', logPath: '/var/log/dump.log' }));
      const { error, events } = await migrateExpectingFailure(env);
      assert.equal(error.details.phase, 'dump');
      assert.equal(error.details.node, 'node1');
      assert.equal(error.details.logPath, '/var/log/dump.log');
      assert.equal(error.details.rolledBack, true);
      assert.match(error.message, /criu dump failed/);
      assert.deepEqual(events.map((event) => event.phase), ['prepare', 'dump', 'rollback', 'failed']);
      assert.ok(env.cluster.callIndex('node2.abort') >= 0, 'the prepared target is undone');
      assert.ok(env.cluster.callIndex('node2.abort') < env.cluster.callIndex('node1.rollback'), 'target aborted before the source rolls back');
      await assertRolledBack(env);
    });

    it('at prepare, before anything froze: the target is undone, the source never touched', async () => {
      const env = await setup();
      env.cluster.agent('node2').failNext('prepare', new RuntimeFailedError('CNI bridge ADD failed', { op: 'CNI bridge ADD' }));
      const { error, events } = await migrateExpectingFailure(env);
      assert.equal(error.details.phase, 'prepare');
      assert.equal(error.details.node, 'node2');
      assert.match(error.message, /CNI bridge ADD failed/);
      assert.deepEqual(events.map((event) => event.phase), ['prepare', 'failed']);
      assert.equal(env.cluster.callIndex('node1.dump'), -1, 'the source was not frozen');
      assert.ok(env.cluster.callIndex('node2.abort') >= 0, 'the prepared target is undone');
      const container = await env.record();
      assert.equal(container.node, 'node1');
      assert.equal(container.migration, undefined);
    });

    it('at dump, after the source froze it', async () => {
      const env = await setup();
      env.cluster.agent('node1').failNext('dump', new RuntimeFailedError('criu dump timed out', { op: 'dump' }), { afterEffect: true });
      const { error } = await migrateExpectingFailure(env);
      assert.equal(error.details.phase, 'dump');
      assert.ok(env.cluster.callIndex('node1.rollback') >= 0);
      await assertRolledBack(env);
      assert.equal((await env.record()).generation, 1, 'the rollback restored a new incarnation on the source');
    });

    it('at transfer', async () => {
      const env = await setup();
      env.cluster.agent('node2').failNext('restore', new TransferFailedError('connection reset while fetching images.tar'));
      const { error } = await migrateExpectingFailure(env);
      assert.equal(error.details.phase, 'transfer');
      assert.equal(error.details.node, 'node2');
      assertAbortBeforeRollback(env.cluster);
      await assertRolledBack(env);
    });

    it('at restore, after the target had started its copy', async () => {
      const env = await setup();
      env.cluster
        .agent('node2')
        .failNext('restore', new RuntimeFailedError('criu restore failed', { op: 'restore', logPath: '/var/log/restore.log' }), { afterEffect: true });
      const { error } = await migrateExpectingFailure(env);
      assert.equal(error.details.phase, 'restore');
      assert.equal(error.details.node, 'node2');
      assert.equal(error.details.logPath, '/var/log/restore.log');
      assertAbortBeforeRollback(env.cluster);
      await assertRolledBack(env);
    });

    it('at verify', async () => {
      const env = await setup();
      env.cluster.agent('node2').failNext('get', new RuntimeFailedError('runc state failed', { op: 'state' }));
      const { error } = await migrateExpectingFailure(env);
      assert.equal(error.details.phase, 'verify');
      assert.equal(error.details.node, 'node2');
      assertAbortBeforeRollback(env.cluster);
      await assertRolledBack(env);
    });

    it('at cleanup', async () => {
      const env = await setup();
      env.cluster.agent('node1').failNext('finish', new RuntimeFailedError('page server died', { op: 'finish' }));
      const { error } = await migrateExpectingFailure(env);
      assert.equal(error.details.phase, 'cleanup');
      assert.equal(error.details.node, 'node1');
      assertAbortBeforeRollback(env.cluster);
      await assertRolledBack(env);
    });

    it('reports a rollback that failed too, and marks the container unknown', async () => {
      const env = await setup();
      env.cluster.agent('node2').failNext('restore', new RuntimeFailedError('criu restore failed', { op: 'restore' }));
      env.cluster.agent('node1').failNext('rollback', new RuntimeFailedError('criu restore failed on the source', { op: 'rollback' }));
      const { error } = await migrateExpectingFailure(env);
      assert.equal(error.details.rolledBack, false);
      assert.match(error.message, /rolling web back on node1 failed too/);
      const container = await env.record();
      assert.equal(container.status, 'unknown');
      assert.equal(container.migration, undefined);
      assert.equal(env.cluster.runningCopies('web'), 0);
    });
  });

  it('refuses a second migration of a container while one runs', async () => {
    const env = await setup();
    const release = env.cluster.agent('node1').hold('dump');
    const first = env.migrations.migrate('web', { to: 'node2' });
    while (env.cluster.callIndex('node1.dump') < 0) await sleep(1);

    await assert.rejects(env.migrations.migrate('web', { to: 'node2' }), MigrationInProgressError);
    await assert.rejects(env.containers.stop('web'), MigrationInProgressError);
    await assert.rejects(env.containers.remove('web'), MigrationInProgressError);
    assert.deepEqual(
      (await env.containers.list()).map((view) => view.status),
      ['migrating'],
    );

    release();
    await first;
    assert.equal((await env.record()).node, 'node2');
    assert.equal(env.cluster.runningCopies('web'), 1);
  });

  describe('refuses up front, changing nothing', () => {
    const cases: { title: string; name: string; to: string; error: new (...args: never[]) => Error; message: RegExp }[] = [
      { title: 'the node it is on', name: 'web', to: 'node1', error: InvalidInputError, message: /already on node node1/ },
      { title: 'an unknown node', name: 'web', to: 'node9', error: InvalidInputError, message: /unknown node "node9".*chipmunk node ls/ },
      { title: 'an unknown container', name: 'nope', to: 'node2', error: NotFoundError, message: /unknown container "nope".*chipmunk ps/ },
    ];
    for (const { title, name, to, error, message } of cases) {
      it(`a migration to ${title}`, async () => {
        const env = await setup();
        const revision = await env.store.currentRevision();
        const before = await env.store.list('');
        const events: MigrationEvent[] = [];
        await assert.rejects(
          env.migrations.migrate(name, { to }, (event) => events.push(event)),
          (err: unknown) => err instanceof error && message.test(err.message),
        );
        assert.equal(await env.store.currentRevision(), revision);
        assert.deepEqual(await env.store.list(''), before);
        assert.deepEqual(events, []);
        assert.deepEqual(env.cluster.calls, []);
      });
    }

    it('a migration of a stopped container', async () => {
      const env = await setup();
      await env.containers.stop('web');
      const revision = await env.store.currentRevision();
      await assert.rejects(env.migrations.migrate('web', { to: 'node2' }), /web is stopped: only running containers can be migrated/);
      assert.equal(await env.store.currentRevision(), revision);
    });
  });

  describe('settles migrations a crashed controller left mid-way', () => {
    /** Writes the store state a controller leaves when it dies in `phase`, as the orchestrator writes it. */
    async function interruptedAt(env: Setup, phase: MigrationPhaseName): Promise<string> {
      const id = `crashed-${phase}`;
      const container = await env.store.get<ContainerRecord>(containerKey('web'));
      const record: MigrationRecord = {
        id,
        name: 'web',
        from: 'node1',
        to: 'node2',
        mode: 'lazy',
        phase,
        history: [
          { migrationId: id, phase: 'prepare', at: Date.now() },
          { migrationId: id, phase, at: Date.now() },
        ],
        startedAt: Date.now(),
      };
      await env.store.txn({
        compare: [{ key: containerKey('web'), modRevision: container!.modRevision }],
        ops: [
          { type: 'put', key: containerKey('web'), value: { ...container!.value, migration: { id, phase } } },
          { type: 'put', key: migrationKey(id), value: record },
        ],
      });
      return id;
    }

    async function migrationRecord(env: Setup, id: string): Promise<MigrationRecord> {
      return (await env.store.get<MigrationRecord>(migrationKey(id)))!.value;
    }

    it('fails it when the source still runs the container', async () => {
      const env = await setup();
      const id = await interruptedAt(env, 'dump');
      await env.orchestrator().resolveInterrupted();
      assert.equal((await migrationRecord(env, id)).phase, 'failed');
      const container = await env.record();
      assert.deepEqual([container.node, container.status, container.migration], ['node1', 'running', undefined]);
      assert.equal(env.cluster.runningCopies('web'), 1);
    });

    it('adopts it when the target runs the container', async () => {
      const env = await setup();
      const id = await interruptedAt(env, 'verify');
      const spec0 = (await env.record()).spec;
      await env.cluster.agent('node1').dump('web', { migrationId: id, mode: 'lazy', pageServerPort: 27000 });
      await env.cluster.agent('node2').restore(id, { migrationId: id, mode: 'lazy', spec: spec0, generation: 1, source: { node: 'node1', url: 'http://node1' } });

      await env.orchestrator().resolveInterrupted();
      assert.equal((await migrationRecord(env, id)).phase, 'done');
      const container = await env.record();
      assert.deepEqual([container.node, container.status, container.generation, container.migration], ['node2', 'running', 1, undefined]);
      assert.ok(env.cluster.callIndex('node1.finish') >= 0, 'the source cleaned up its frozen copy');
      assert.equal(env.cluster.runningCopies('web'), 1);
    });

    it('rolls the source back when neither node runs the container', async () => {
      const env = await setup();
      const id = await interruptedAt(env, 'transfer');
      await env.cluster.agent('node1').dump('web', { migrationId: id, mode: 'lazy', pageServerPort: 27000 });
      assert.equal(env.cluster.runningCopies('web'), 0);

      await env.orchestrator().resolveInterrupted();
      const record = await migrationRecord(env, id);
      assert.equal(record.phase, 'failed');
      assert.deepEqual(record.history.slice(-2).map((event) => event.phase), ['rollback', 'failed']);
      assertAbortBeforeRollback(env.cluster);
      const container = await env.record();
      assert.deepEqual([container.node, container.status, container.migration], ['node1', 'running', undefined]);
      assert.equal(env.cluster.runningCopies('web'), 1);
    });

    it('leaves finished migrations alone', async () => {
      const env = await setup();
      await env.migrations.migrate('web', { to: 'node2' });
      const revision = await env.store.currentRevision();
      env.cluster.calls.length = 0;
      await env.orchestrator().resolveInterrupted();
      assert.equal(await env.store.currentRevision(), revision);
      assert.deepEqual(env.cluster.calls, []);
    });
  });
});
