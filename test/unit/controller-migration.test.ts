import { after, describe, it } from 'node:test';
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
import { ContainerLocks, containerKey, type ContainerRecord } from '../../src/controller/container-lock.js';
import { ContainerService } from '../../src/controller/containers.js';
import { ContainerAddresses, DEFAULT_CONTAINER_RANGE, parseContainerRange } from '../../src/controller/addresses.js';
import { Fences } from '../../src/controller/fences.js';
import { MigrationOrchestrator, migrationKey } from '../../src/controller/migration.js';
import { NodeRegistry } from '../../src/controller/registry.js';
import { MemoryStore } from '../../src/controller/store/index.js';
import { FAKE_LAZY_PAGES_BYTES, FakeCluster } from '../fakes/agents.js';

const silent = pino({ level: 'silent' });

function spec(name: string): ContainerSpec {
  return { name, image: 'counter', command: [], env: {}, ports: [{ hostPort: 8080, containerPort: 80, protocol: 'tcp' }], memoryBytes: 0 };
}

/** Two nodes with fake agents, and `web` running on node1. */
async function setup(opts: { lazy?: { node1?: boolean; node2?: boolean }; leaseMs?: number } = {}) {
  const store = new MemoryStore();
  const cluster = new FakeCluster();
  cluster.add('node1', { lazyMigration: opts.lazy?.node1 ?? true });
  cluster.add('node2', { lazyMigration: opts.lazy?.node2 ?? true });
  const nodes = new NodeRegistry(store, opts.leaseMs);
  for (const node of ['node1', 'node2']) await nodes.heartbeat(cluster.agent(node).registration());
  const locks = new ContainerLocks(store);
  const fences = new Fences(store);
  const containers = new ContainerService(store, nodes, cluster.resolver, locks, new ContainerAddresses(store, parseContainerRange(DEFAULT_CONTAINER_RANGE)));
  /** A new orchestrator with its own lock owner: a restarted controller. */
  const orchestrator = () => new MigrationOrchestrator({ store, nodes, agentFor: cluster.resolver, locks: new ContainerLocks(store), fences, log: silent });
  const migrations = new MigrationOrchestrator({ store, nodes, agentFor: cluster.resolver, locks, fences, log: silent });
  await containers.run({ spec: spec('web'), node: 'node1' });
  cluster.calls.length = 0;
  const record = async (name = 'web') => (await store.get<ContainerRecord>(containerKey(name)))!.value;
  return { store, cluster, nodes, containers, migrations, orchestrator, record, fences };
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
  assert.equal(container.lock, undefined);
  const [migration] = await env.migrations.list();
  assert.equal(migration.phase, 'failed');
  assert.deepEqual(migration.history.slice(-2).map((event) => event.phase), ['rollback', 'failed']);
  assert.equal(migration.error?.code, 'CHIPMUNK_MIGRATION_FAILED');
}

/** The container still runs on node1 (never stopped), unlocked. */
async function assertOnSource(env: Setup): Promise<void> {
  assert.equal(env.cluster.runningCopies('web'), 1);
  assert.equal(env.cluster.agent('node1').containers.get('web')?.status, 'running');
  const container = await env.record();
  assert.deepEqual([container.node, container.status, container.lock], ['node1', 'running', undefined]);
  assert.equal((await env.migrations.list())[0].phase, 'failed');
}

/** The migration went through: the container runs on node2 only, and the record says so. */
async function assertOnTarget(env: Setup): Promise<void> {
  assert.equal(env.cluster.runningCopies('web'), 1);
  assert.equal(env.cluster.agent('node2').containers.get('web')?.status, 'running');
  const container = await env.record();
  assert.deepEqual([container.node, container.status, container.lock], ['node2', 'running', undefined]);
  assert.equal((await env.migrations.list())[0].phase, 'done');
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
    assert.equal(container.lock, undefined);
    assert.equal(env.cluster.runningCopies('web'), 1);
    assert.equal(env.cluster.agent('node1').containers.has('web'), false);

    const [checkpoint] = env.cluster.agent('node1').dumpRequests;
    assert.ok(checkpoint.pageServerPort! >= 27000 && checkpoint.pageServerPort! <= 27999, 'lazy mode gets a page server port');
    const stored = (await env.store.get<MigrationRecord>(migrationKey(summary.id)))!.value;
    assert.equal(stored.phase, 'done');
    // The frozen window's steps, as the source's dump and the target's restore answered them, on their phases' events.
    assert.deepEqual(stored.history.map((event) => event.steps?.map((s) => s.step)), [undefined, ['criu-dump'], ['fetch-images', 'criu-restore'], undefined, undefined, undefined]);
    assert.deepEqual(stored.history.map(({ steps: _steps, ...event }) => event), events, 'the rest as streamed, in order');
    assert.deepEqual(summary.phases.find((p) => p.phase === 'transfer')?.steps, [{ step: 'fetch-images', ms: 2 }, { step: 'criu-restore', ms: 3 }]);
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

  describe('failures before the target runs it leave the container on the source, exactly once', () => {
    it('at dump, before the source froze it: nothing to roll back', async () => {
      const env = await setup();
      env.cluster.agent('node1').failNext('dump', new RuntimeFailedError('criu dump failed', { op: 'checkpoint', logPath: '/var/log/dump.log' }));
      const { error, events } = await migrateExpectingFailure(env);
      assert.equal(error.details.phase, 'dump');
      assert.equal(error.details.node, 'node1');
      assert.equal(error.details.logPath, '/var/log/dump.log');
      assert.match(error.message, /criu dump failed.*web still runs on node1/);
      assert.deepEqual(events.map((event) => event.phase), ['prepare', 'dump', 'failed']);
      assert.ok(env.cluster.callIndex('node2.abort') >= 0, 'the prepared target is undone');
      assert.equal(env.cluster.callIndex('node1.rollback'), -1, 'a container that still runs is not rolled back');
      await assertOnSource(env);
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
      await assertOnSource(env);
    });

    it('at dump, after the source froze it', async () => {
      const env = await setup();
      env.cluster.agent('node1').failNext('dump', new RuntimeFailedError('criu dump timed out', { op: 'checkpoint' }), { afterEffect: true });
      const { error } = await migrateExpectingFailure(env);
      assert.equal(error.details.phase, 'dump');
      assert.ok(env.cluster.callIndex('node1.rollback') >= 0);
      await assertRolledBack(env);
      assert.equal((await env.record()).generation, 1, 'the rollback restored a new incarnation on the source');
    });

    it('at transfer, before the target pulled any page', async () => {
      const env = await setup();
      env.cluster.agent('node2').failNext('restore', new TransferFailedError('connection reset while fetching images.tar'));
      const { error } = await migrateExpectingFailure(env);
      assert.equal(error.details.phase, 'transfer');
      assert.equal(error.details.node, 'node2');
      assertAbortBeforeRollback(env.cluster);
      await assertRolledBack(env);
    });

    it('copy mode: a restore that failed on the target rolls back from the dump', async () => {
      const env = await setup({ lazy: { node2: false } });
      env.cluster.agent('node2').failNext('restore', new RuntimeFailedError('criu restore failed', { op: 'restore', logPath: '/var/log/restore.log' }));
      const { error } = await migrateExpectingFailure(env);
      assert.equal(error.details.phase, 'restore');
      assert.equal(error.details.logPath, '/var/log/restore.log');
      assertAbortBeforeRollback(env.cluster);
      await assertRolledBack(env);
    });

    it('a rollback that fails is not given up: the lock stays and the retry loop finishes it', async () => {
      const env = await setup();
      env.cluster.agent('node2').failNext('restore', new TransferFailedError('connection reset'));
      env.cluster.agent('node1').failNext('rollback', new RuntimeFailedError('criu restore failed on the source', { op: 'rollback' }));
      const { error } = await migrateExpectingFailure(env);
      assert.match(error.message, /rolling web back on node1 failed.*tries again/);
      assert.equal((await env.record()).lock?.operation, 'migration', 'the container stays locked until it is settled');
      assert.equal((await env.migrations.list())[0].phase, 'rollback');
      await env.migrations.settleUnfinished();
      await assertRolledBack(env);
    });

    it('issue 8 item 7: a target that does not confirm its abort blocks the rollback while its node is alive', async () => {
      const env = await setup({ lazy: { node2: false }, leaseMs: 500 });
      // Both nodes keep heartbeating: node2 is alive, only its answers to the controller are lost.
      const beat = setInterval(() => {
        for (const node of ['node1', 'node2']) void env.nodes.heartbeat(env.cluster.agent(node).registration());
      }, 50);
      after(() => clearInterval(beat));
      env.cluster.agent('node2').failNext('restore', new RuntimeFailedError('restore timed out', { op: 'restore' }), { afterEffect: true });
      // The target restored it, but it cannot be asked anything: every answer is lost.
      const target = env.cluster.agent('node2');
      const unreachableError = new TransferFailedError('agent node2 did not answer');
      const failAll = () => {
        for (const method of ['get', 'abort'] as const) target.failNext(method, unreachableError);
      };
      const origAbort = target.abort.bind(target);
      let aborts = 0;
      target.abort = async (id: string) => {
        aborts++;
        failAll();
        return origAbort(id);
      };
      const origGet = target.get.bind(target);
      target.get = async (name: string) => {
        target.failNext('get', unreachableError);
        return origGet(name);
      };
      const { error } = await migrateExpectingFailure(env);
      assert.ok(aborts >= 1);
      assert.match(error.message, /did not confirm/);
      assert.equal(env.cluster.callIndex('node1.rollback'), -1, 'no rollback while the target may run a copy');
      assert.ok(env.cluster.runningCopies('web') <= 1, 'never two copies');
      // The target answers again: it is told to abort, then the source rolls back.
      target.abort = origAbort;
      target.get = origGet;
      target.containers.get('web')!.status = 'stopped';
      await env.migrations.settleUnfinished();
      await assertRolledBack(env);
    });

    it('issue 8 item 7: a dead target (lease expired) that does not answer is fenced, then the source rolls back', async () => {
      const env = await setup();
      env.cluster.agent('node2').failNext('restore', new TransferFailedError('connection reset'));
      const target = env.cluster.agent('node2');
      target.abort = async () => {
        // Its lease has expired by now: node2 is dead as far as the cluster knows.
        await env.store.delete('/liveness/node2');
        throw new TransferFailedError('agent node2 did not answer');
      };
      const { error } = await migrateExpectingFailure(env);
      assert.equal(error.details.rolledBack, true);
      await assertRolledBack(env);
      assert.deepEqual(await env.fences.forNode('node2'), [{ name: 'web', generation: 2 }], 'the target copy (generation 1) is removed when node2 returns');
    });
  });

  describe('issue 8 items 1 and 2: once the target runs it, a failure rolls forward, never back', () => {
    it('a restore that reports an error although the target started the container', async () => {
      const env = await setup();
      env.cluster.agent('node2').failNext('restore', new RuntimeFailedError('criu restore timed out', { op: 'restore' }), { afterEffect: true });
      const summary = await env.migrations.migrate('web', { to: 'node2' });
      assert.equal(summary.to, 'node2');
      await assertOnTarget(env);
      assert.equal(env.cluster.callIndex('node2.abort'), -1, 'the only running copy is not aborted');
    });

    it('a verify that fails once (a time-out) while the target runs it', async () => {
      const env = await setup();
      env.cluster.agent('node2').failNext('get', new RuntimeFailedError('runc state timed out', { op: 'state' }));
      await env.migrations.migrate('web', { to: 'node2' });
      await assertOnTarget(env);
      assert.equal(env.cluster.callIndex('node2.abort'), -1);
    });

    it('a lost answer to the source cleanup: committed, the cleanup is asked again later', async () => {
      const env = await setup();
      env.cluster.agent('node1').failNext('finish', new TransferFailedError('connection reset before the answer'), { afterEffect: false });
      await env.migrations.migrate('web', { to: 'node2' });
      await assertOnTarget(env);
      assert.equal(env.cluster.callIndex('node2.abort'), -1, 'the only running copy is not aborted');
      assert.equal((await env.migrations.list())[0].cleanupPending, true);
      await env.migrations.settleUnfinished();
      assert.equal((await env.migrations.list())[0].cleanupPending, false);
      assert.equal(env.cluster.agent('node1').containers.has('web'), false, 'the source removed its copy on the second ask');
    });

    it('copy mode too: a lost cleanup answer never aborts the target', async () => {
      const env = await setup({ lazy: { node2: false } });
      env.cluster.agent('node1').failNext('finish', new TransferFailedError('connection reset'), { afterEffect: true });
      await env.migrations.migrate('web', { to: 'node2' });
      await assertOnTarget(env);
      assert.equal(env.cluster.callIndex('node2.abort'), -1);
    });

    it('lazy past the point of no return, target dead on arrival: an unprotected container is reported lost, never rolled back into a refusal', async () => {
      const env = await setup();
      env.cluster.agent('node2').crashNextRestore = true;
      const { error } = await migrateExpectingFailure(env);
      assert.match(error.message, /web is lost: a target pulled memory pages/);
      assert.equal(env.cluster.callIndex('node1.rollback'), -1, 'no rollback from a page server that no longer has the memory');
      const container = await env.record();
      assert.equal(container.status, 'lost');
      assert.equal(container.lock, undefined);
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

    it('issue 8 item 10: a container whose process has exited (the record still says running)', async () => {
      const env = await setup();
      env.cluster.agent('node1').containers.get('web')!.status = 'stopped';
      const revision = await env.store.currentRevision();
      await assert.rejects(env.migrations.migrate('web', { to: 'node2' }), (err: unknown) => {
        assert.ok(err instanceof InvalidInputError);
        assert.match(err.message, /web is not running on node1 \(it is stopped\).*chipmunk logs web/);
        return true;
      });
      assert.equal(await env.store.currentRevision(), revision, 'nothing recorded');
      assert.deepEqual(env.cluster.calls, ['node1.get']);
    });

    it('a migration whose traffic the gateway does not hold: nothing is frozen', async () => {
      const env = await setup();
      const released: string[] = [];
      const migrations = new MigrationOrchestrator({
        store: env.store,
        nodes: env.nodes,
        agentFor: env.cluster.resolver,
        locks: new ContainerLocks(env.store),
        fences: env.fences,
        log: silent,
        traffic: {
          hold: async () => {
            throw new Error('gateway unreachable');
          },
          release: async (_name, _id, container) => void released.push(container.node),
        },
      });
      await assert.rejects(migrations.migrate('web', { to: 'node2' }), /gateway unreachable.*still runs on node1/);
      assert.equal(env.cluster.callIndex('node1.dump'), -1, 'not frozen');
      assert.ok(env.cluster.callIndex('node2.abort') >= 0, 'the prepared target is undone');
      await assertOnSource(env);
    });

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
        generation: 0,
      };
      await env.store.txn({
        compare: [{ key: containerKey('web'), modRevision: container!.modRevision }],
        ops: [
          { type: 'put', key: containerKey('web'), value: { ...container!.value, lock: { id, operation: 'migration', owner: 'controller-crashed', since: Date.now(), phase } } },
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
      await env.orchestrator().settleUnfinished();
      assert.equal((await migrationRecord(env, id)).phase, 'failed');
      const container = await env.record();
      assert.deepEqual([container.node, container.status, container.lock], ['node1', 'running', undefined]);
      assert.equal(env.cluster.runningCopies('web'), 1);
    });

    it('adopts it when the target runs the container', async () => {
      const env = await setup();
      const id = await interruptedAt(env, 'verify');
      const spec0 = (await env.record()).spec;
      await env.cluster.agent('node1').dump('web', { migrationId: id, mode: 'lazy', pageServerPort: 27000 });
      await env.cluster.agent('node2').restore(id, { migrationId: id, mode: 'lazy', spec: spec0, generation: 1, source: { node: 'node1', url: 'http://node1' } });

      await env.orchestrator().settleUnfinished();
      assert.equal((await migrationRecord(env, id)).phase, 'done');
      const container = await env.record();
      assert.deepEqual([container.node, container.status, container.generation, container.lock], ['node2', 'running', 1, undefined]);
      assert.ok(env.cluster.callIndex('node1.finish') >= 0, 'the source cleaned up its frozen copy');
      assert.equal(env.cluster.runningCopies('web'), 1);
    });

    it('rolls the source back when neither node runs the container', async () => {
      const env = await setup();
      const id = await interruptedAt(env, 'transfer');
      await env.cluster.agent('node1').dump('web', { migrationId: id, mode: 'lazy', pageServerPort: 27000 });
      assert.equal(env.cluster.runningCopies('web'), 0);

      await env.orchestrator().settleUnfinished();
      const record = await migrationRecord(env, id);
      assert.equal(record.phase, 'failed');
      assert.deepEqual(record.history.slice(-2).map((event) => event.phase), ['rollback', 'failed']);
      assertAbortBeforeRollback(env.cluster);
      const container = await env.record();
      assert.deepEqual([container.node, container.status, container.lock], ['node1', 'running', undefined]);
      assert.equal(env.cluster.runningCopies('web'), 1);
    });

    it('leaves finished migrations alone', async () => {
      const env = await setup();
      await env.migrations.migrate('web', { to: 'node2' });
      const revision = await env.store.currentRevision();
      env.cluster.calls.length = 0;
      await env.orchestrator().settleUnfinished();
      assert.equal(await env.store.currentRevision(), revision);
      assert.deepEqual(env.cluster.calls, []);
    });
  });
});
