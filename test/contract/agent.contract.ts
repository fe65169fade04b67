import { after, afterEach, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { ConflictError, InvalidInputError, NotFoundError, RuntimeFailedError, TransferFailedError, UnavailableError } from '../../src/shared/errors.js';
import type { AgentContainer, ContainerSpec, DumpResult, MigrationMode, RestoreRequest } from '../../src/shared/protocol.js';
import type { AgentApi } from '../../src/controller/agent-client.js';
import { assertRejects } from './errors.js';

/**
 * The agent API as the controller relies on it (src/controller/migration.ts,
 * migration-settle.ts, checkpoints.ts, failover.ts), run against the in-memory agents the
 * controller's unit tests use (test/fakes/agents.ts) and against real agents over HTTP, so the
 * fakes cannot drift from what an agent does. Errors are compared by class and code, never by
 * message.
 *
 * One cluster serves the whole suite; each test uses its own container names and leaves
 * nothing behind (checked), and what a failed test left is cleared before the next one.
 */

export interface ContractNode {
  name: string;
  /** Where other agents reach this one (a restore's `source.url`). */
  url: string;
  api: AgentApi;
}

export interface AgentCluster {
  /** At least two. */
  nodes: ContractNode[];
  /** What the suite's containers run: a process CRIU can dump, publishing no ports. */
  image: string;
  command: string[];
  /** The checkpoint store the agents upload to and restore from. */
  storeUrl: string;
  /** A port no other page server of this cluster uses, for a lazy dump. */
  pageServerPort(): number;
  /** An agent whose process is gone (the node's host died, or the agent was killed). */
  unreachable: AgentApi;
  /** Removes everything the cluster made, whatever state a failed test left it in. */
  cleanup(): Promise<void>;
}

export function describeAgentContract(name: string, makeCluster: () => Promise<AgentCluster>, opts: { timeoutMs?: number } = {}): void {
  const timeout = opts.timeoutMs ?? 60_000;
  let cluster: AgentCluster;
  /** Migration and checkpoint ids the running test used: what to clear if it fails. */
  let used: { migrations: string[]; checkpoints: string[] } = { migrations: [], checkpoints: [] };

  const node = (i: number) => cluster.nodes[i]!;
  const newId = (tag: string, list: string[]) => {
    const id = `${tag}-${randomBytes(4).toString('hex')}`;
    list.push(id);
    return id;
  };
  const migrationId = (tag: string) => newId(`mig-${tag}`, used.migrations);
  const checkpointId = (tag: string) => newId(`ckpt-${tag}`, used.checkpoints);
  const spec = (containerName: string): ContainerSpec => ({
    name: `ac-${containerName}`,
    image: cluster.image,
    command: cluster.command,
    env: {},
    ports: [],
    memoryBytes: 128 * 1024 * 1024,
  });
  const lazyUnsupported = async () => (await Promise.all([node(0).api.info(), node(1).api.info()])).some((info) => !info.capabilities.lazyMigration);

  /** How many nodes run the container now: after any migration step the answer is at most 1. */
  async function runningCopies(containerName: string): Promise<number> {
    const lists = await Promise.all(cluster.nodes.map((n) => n.api.listContainers()));
    return lists.filter((list) => list.some((c) => c.name === containerName && c.status === 'running')).length;
  }

  async function assertNothingLeft(): Promise<void> {
    for (const n of cluster.nodes) assert.deepEqual((await n.api.listContainers()).map((c) => c.name), [], `containers left on ${n.name}`);
  }

  /** After a failed test: every migration it began undone, every container removed. */
  async function clearLeftovers(): Promise<void> {
    for (const n of cluster.nodes) {
      for (const id of used.migrations) {
        await n.api.abort(id).catch(() => undefined);
        await n.api.finish(id).catch(() => undefined);
      }
      for (const id of used.checkpoints) await n.api.discardCheckpoint(id).catch(() => undefined);
      for (const c of await n.api.listContainers().catch(() => [])) await n.api.remove(c.name).catch(() => undefined);
    }
  }

  /** The restore request of migration `id` from node 0 to node 1. */
  function restoreRequest(id: string, c: AgentContainer, mode: MigrationMode, dump?: DumpResult): RestoreRequest {
    return {
      migrationId: id,
      mode,
      spec: c.spec,
      generation: c.generation + 1,
      source: { node: node(0).name, url: node(0).url },
      ...(dump?.pageServer ? { pageServer: dump.pageServer } : {}),
    };
  }

  /** Runs a container on node 0, prepares node 1 and dumps it on node 0: the point a rollback or a restore starts from. */
  async function runAndDump(containerName: string, mode: MigrationMode): Promise<{ id: string; c: AgentContainer; dump: DumpResult }> {
    const [source, target] = [node(0).api, node(1).api];
    const c = await source.run(spec(containerName));
    const id = migrationId(containerName);
    const { pageServer: _, ...prepare } = restoreRequest(id, c, mode);
    await target.prepare(id, prepare);
    const port = mode === 'lazy' ? cluster.pageServerPort() : undefined;
    const dump = await source.dump(c.name, { migrationId: id, mode, ...(port !== undefined ? { pageServerPort: port } : {}) });
    assert.equal(dump.migrationId, id);
    assert.ok(dump.imageBytes > 0, `imageBytes ${dump.imageBytes}`);
    assert.ok(dump.frozenAt > 0 && dump.frozenAt <= Date.now(), `frozenAt ${dump.frozenAt}`);
    if (mode === 'lazy') assert.deepEqual(dump.pageServer, { address: (await source.info()).address, port }, 'the page server is on the source, at the port asked for');
    else assert.equal(dump.pageServer, undefined, 'a copy dump has no page server');
    assert.equal((await source.get(c.name)).status, 'migrating');
    assert.equal(await runningCopies(c.name), 0, 'dumped: it runs nowhere until a restore or a rollback');
    return { id, c, dump };
  }

  async function assertCanRollBack(api: AgentApi, id: string, expected: boolean, what: string): Promise<void> {
    const state = await api.dumpState(id);
    assert.equal(state.migrationId, id);
    assert.equal(state.canRollBack, expected, `${what}: ${state.reason ?? ''}`);
    if (!expected) assert.ok(typeof state.reason === 'string' && state.reason.length > 0, `${what}: a reason is given`);
  }

  describe(`agent contract: ${name}`, { timeout: timeout * 12 }, () => {
    before(async () => {
      cluster = await makeCluster();
      assert.ok(cluster.nodes.length >= 2, 'the contract needs two nodes');
    });
    after(async () => {
      await cluster?.cleanup();
    });
    afterEach(async () => {
      await clearLeftovers();
      used = { migrations: [], checkpoints: [] };
    });

    it('describes itself: node name and capabilities', { timeout }, async () => {
      for (const n of cluster.nodes) {
        const info = await n.api.info();
        assert.equal(info.node, n.name);
        assert.equal(typeof info.address, 'string');
        assert.equal(typeof info.capabilities.lazyMigration, 'boolean');
      }
    });

    it('runs, gets, lists, stops and removes a container; refuses duplicates and what is not running', { timeout }, async () => {
      const api = node(0).api;
      const s = spec('basic');
      const c = await api.run(s);
      assert.equal(c.name, s.name);
      assert.equal(c.status, 'running');
      assert.equal(c.generation, 0);
      assert.deepEqual(c.spec, s);
      assert.ok(!Number.isNaN(Date.parse(c.createdAt)), c.createdAt);
      assert.equal((await api.get(s.name)).status, 'running');
      assert.deepEqual((await api.listContainers()).map((x) => x.name), [s.name]);
      assert.deepEqual(await node(1).api.listContainers(), [], 'the other node has nothing of it');
      assert.equal(typeof (await api.logs(s.name)), 'string');
      assert.equal((await api.stats(s.name)).name, s.name);

      await assertRejects(api.run(s), ConflictError, 'a second container of the same name');
      await assertRejects(api.run({ ...spec('noimage'), image: 'chipmunk/missing-image' }), InvalidInputError, 'an image the node lacks');
      const elsewhere = migrationId('taken');
      await assertRejects(api.prepare(elsewhere, { migrationId: elsewhere, mode: 'copy', spec: s, generation: 1, source: { node: node(1).name, url: node(1).url } }), ConflictError, 'preparing a restore where the name is taken');
      assert.deepEqual((await api.listContainers()).map((x) => x.name), [s.name], 'refused calls left nothing behind');
      assert.equal((await api.get(s.name)).status, 'running');

      const stopped = await api.stop(s.name);
      assert.equal(stopped.status, 'stopped');
      assert.equal((await api.get(s.name)).status, 'stopped');
      assert.equal((await api.stop(s.name)).status, 'stopped', 'stopping a stopped container is no error');
      const refused = migrationId('stopped');
      await assertRejects(api.dump(s.name, { migrationId: refused, mode: 'copy' }), ConflictError, 'dump of a stopped container');
      await assertCanRollBack(api, refused, false, 'a refused dump leaves no dump');
      await assertRejects(api.checkpoint(s.name, { checkpointId: checkpointId('stopped') }), ConflictError, 'checkpoint of a stopped container');
      assert.equal((await api.get(s.name)).status, 'stopped');

      await api.remove(s.name);
      await assertRejects(api.get(s.name), NotFoundError, 'get after remove');
      assert.deepEqual(await api.listContainers(), []);
      // The name is free again; a running container is removed as well (the controller's rm).
      assert.equal((await api.run(s)).status, 'running');
      await api.remove(s.name);
      await assertNothingLeft();
    });

    it('answers calls about unknown containers, migrations and checkpoints', { timeout }, async () => {
      const api = node(0).api;
      const ghost = 'ac-ghost';
      const id = migrationId('ghost');
      const attempts: Array<[string, () => Promise<unknown>]> = [
        ['get', () => api.get(ghost)],
        ['stop', () => api.stop(ghost)],
        ['remove', () => api.remove(ghost)],
        ['logs', () => api.logs(ghost)],
        ['stats', () => api.stats(ghost)],
        ['dump', () => api.dump(ghost, { migrationId: id, mode: 'copy' })],
        ['checkpoint', () => api.checkpoint(ghost, { checkpointId: checkpointId('ghost') })],
        ['rollback', () => api.rollback(id)],
        ['uploadCheckpoint', () => api.uploadCheckpoint(checkpointId('ghost'), { container: ghost, storeUrl: cluster.storeUrl, logPosition: null, metadata: {} })],
      ];
      for (const [op, attempt] of attempts) await assertRejects(attempt(), NotFoundError, `${op} of something unknown`);
      await assertCanRollBack(api, id, false, 'dumpState of an unknown migration');
      assert.equal((await api.progress(id)).bytes, 0, 'progress of a restore that is not running');
      // Cleaning up what the node never had is not an error: the controller repeats these after failures.
      await api.abort(id);
      await api.finish(id);
      await api.settle(id);
      await api.discardCheckpoint(checkpointId('ghost'));

      // A restore of a migration its source has no dump of (the source restarted, or never dumped).
      const target = node(1).api;
      const orphan = migrationId('orphan');
      const req: RestoreRequest = { migrationId: orphan, mode: 'copy', spec: spec('orphan'), generation: 1, source: { node: node(0).name, url: node(0).url } };
      await target.prepare(orphan, req);
      await assertRejects(target.restore(orphan, req), TransferFailedError, 'restore without a dump on the source');
      assert.equal(await runningCopies(req.spec.name), 0);
      await target.abort(orphan);
      await assertNothingLeft();
    });

    it('an agent that is gone answers every call with UnavailableError', { timeout }, async () => {
      const api = cluster.unreachable;
      const id = migrationId('gone');
      for (const [op, attempt] of [
        ['info', () => api.info()],
        ['get', () => api.get('ac-gone')],
        ['dumpState', () => api.dumpState(id)],
        ['abort', () => api.abort(id)],
        ['finish', () => api.finish(id)],
      ] as Array<[string, () => Promise<unknown>]>) {
        await assertRejects(attempt(), UnavailableError, op);
      }
    });

    for (const mode of ['copy', 'lazy'] as const) {
      it(`migrates in ${mode} mode: prepare, dump, restore, finish, settle; one running copy throughout`, { timeout }, async (t) => {
        if (mode === 'lazy' && (await lazyUnsupported())) return skip(t, 'no lazy migration on these nodes');
        const [source, target] = [node(0).api, node(1).api];
        const { id, c, dump } = await runAndDump(`mv-${mode}`, mode);
        await assertRejects(source.stop(c.name), ConflictError, 'stop while migrating');
        await assertRejects(source.remove(c.name), ConflictError, 'remove while migrating');
        await assertRejects(source.dump(c.name, { migrationId: migrationId('second'), mode: 'copy' }), ConflictError, 'a second dump');
        await assertRejects(source.checkpoint(c.name, { checkpointId: checkpointId('migrating') }), ConflictError, 'checkpoint while migrating');
        await assertCanRollBack(source, id, true, `right after a ${mode} dump nobody pulled from`);

        const prepared = await target.get(c.name);
        assert.equal(prepared.status, 'migrating', 'the target holds the prepared container, not running');
        await assertRejects(target.run(spec(`mv-${mode}`)), ConflictError, 'run over a prepared restore');
        const { pageServer: _, ...again } = restoreRequest(id, c, mode);
        await target.prepare(id, again);

        const restored = await target.restore(id, restoreRequest(id, c, mode, dump));
        assert.equal(restored.container.name, c.name);
        assert.equal(restored.container.status, 'running');
        assert.equal(restored.container.generation, c.generation + 1);
        assert.deepEqual(restored.container.spec, c.spec);
        assert.ok(restored.bytesTransferred > 0, `bytesTransferred ${restored.bytesTransferred}`);
        assert.ok(restored.restoredAt >= dump.frozenAt);
        const onTarget = await target.get(c.name);
        assert.equal(onTarget.status, 'running');
        assert.equal(onTarget.generation, c.generation + 1);
        assert.equal((await source.get(c.name)).status, 'migrating');
        assert.equal(await runningCopies(c.name), 1);
        if (mode === 'lazy') {
          await assertCanRollBack(source, id, false, 'a lazy target pulled pages');
          await assertRejects(source.rollback(id), RuntimeFailedError, 'rollback once the memory went to the target');
          assert.equal(await runningCopies(c.name), 1, 'the refused rollback ran nothing');
        }

        await source.finish(id);
        await assertRejects(source.get(c.name), NotFoundError, 'the source removed its copy');
        await assertCanRollBack(source, id, false, 'after finish');
        await source.finish(id);
        const settled = await target.settle(id);
        if (mode === 'copy') assert.equal(settled.lazyPagesBytes, 0, 'a copy restore pulls no lazy pages');
        else assert.ok(settled.lazyPagesBytes > 0, `lazyPagesBytes ${settled.lazyPagesBytes}`);
        await target.settle(id);
        assert.equal(await runningCopies(c.name), 1);
        assert.equal((await target.get(c.name)).status, 'running');

        await target.remove(c.name);
        await assertNothingLeft();
      });

      it(`rolls back after a ${mode} dump: the target drops its copy, the source runs it again`, { timeout }, async (t) => {
        if (mode === 'lazy' && (await lazyUnsupported())) return skip(t, 'no lazy migration on these nodes');
        const [source, target] = [node(0).api, node(1).api];
        const { id, c } = await runAndDump(`rb-${mode}`, mode);
        await assertCanRollBack(source, id, true, `after a ${mode} dump nobody pulled from`);
        await target.abort(id);
        await target.abort(id);
        await assertRejects(target.get(c.name), NotFoundError, 'the aborted target keeps nothing');

        const back = await source.rollback(id);
        assert.equal(back.name, c.name);
        assert.equal(back.status, 'running');
        assert.equal(back.generation, c.generation + 1, 'a rollback is a new incarnation');
        assert.equal((await source.get(c.name)).status, 'running');
        assert.equal(await runningCopies(c.name), 1);
        await assertCanRollBack(source, id, false, 'the rollback used the dump up');
        await assertRejects(source.rollback(id), NotFoundError, 'a second rollback');

        // An ordinary container again.
        assert.equal((await source.stop(c.name)).status, 'stopped');
        await source.remove(c.name);
        await assertNothingLeft();
      });
    }

    it('aborts a completed restore: the target keeps nothing and the source rolls back', { timeout }, async () => {
      const [source, target] = [node(0).api, node(1).api];
      const { id, c, dump } = await runAndDump('abort', 'copy');
      assert.equal((await target.restore(id, restoreRequest(id, c, 'copy', dump))).container.status, 'running');
      assert.equal(await runningCopies(c.name), 1);

      await target.abort(id);
      await assertRejects(target.get(c.name), NotFoundError, 'the aborted restore is gone');
      assert.equal(await runningCopies(c.name), 0);
      await assertCanRollBack(source, id, true, 'a copy dump survives the target');
      assert.equal((await source.rollback(id)).status, 'running');
      assert.equal(await runningCopies(c.name), 1);

      await source.remove(c.name);
      await assertNothingLeft();
    });

    it('checkpoints a running container, uploads and discards it, restores it from the store elsewhere and in place', { timeout }, async () => {
      const [home, other] = [node(0).api, node(1).api];
      const c = await home.run(spec('ckpt'));
      const cid = checkpointId('ckpt');
      const taken = await home.checkpoint(c.name, { checkpointId: cid });
      assert.equal(taken.checkpointId, cid);
      assert.ok(taken.frozenMs >= 0);
      assert.ok(taken.imageBytes > 0, `imageBytes ${taken.imageBytes}`);
      assert.equal((await home.get(c.name)).status, 'running', 'a checkpoint leaves the container running');

      const stored = await home.uploadCheckpoint(cid, { container: c.name, storeUrl: cluster.storeUrl, logPosition: { logId: 'contract-log', seq: 7 }, metadata: { spec: c.spec, generation: c.generation } });
      assert.equal(stored.container, c.name);
      assert.deepEqual(stored.logPosition, { logId: 'contract-log', seq: 7 });
      assert.ok(stored.id.length > 0);
      await home.discardCheckpoint(cid);
      await home.discardCheckpoint(cid);
      await assertRejects(home.uploadCheckpoint(cid, { container: c.name, storeUrl: cluster.storeUrl, logPosition: { logId: 'contract-log', seq: 8 }, metadata: {} }), NotFoundError, 'upload of a discarded checkpoint');

      const fromStore = (opId: string, id: string, generation: number): RestoreRequest => ({
        migrationId: opId,
        mode: 'copy',
        spec: c.spec,
        generation,
        source: { node: node(0).name, url: node(0).url },
        checkpoint: { storeUrl: cluster.storeUrl, id },
      });
      // Where the name still runs, a restore is refused, and the abort that follows leaves the running one alone.
      const clash = migrationId('clash');
      await assertRejects(home.restore(clash, fromStore(clash, stored.id, 1)), ConflictError, 'restore over a running container');
      await home.abort(clash);
      assert.equal((await home.get(c.name)).status, 'running');
      assert.equal((await home.get(c.name)).generation, c.generation);

      // A checkpoint the store does not have.
      const missing = migrationId('missing');
      await assertRejects(other.restore(missing, fromStore(missing, 'ffffffffffffffff', 1)), TransferFailedError, 'restore of an unknown checkpoint');
      await other.abort(missing);
      await assertRejects(other.get(c.name), NotFoundError, 'the failed restore left nothing after its abort');

      // A failover: the original is gone, the newest checkpoint comes back on another node.
      await home.remove(c.name);
      const op = migrationId('restore');
      const restored = await other.restore(op, fromStore(op, stored.id, c.generation + 1));
      assert.equal(restored.container.status, 'running');
      assert.equal(restored.container.generation, c.generation + 1);
      assert.ok(restored.bytesTransferred > 0, `bytesTransferred ${restored.bytesTransferred}`);
      await other.settle(op);
      assert.equal(await runningCopies(c.name), 1);
      assert.equal((await other.get(c.name)).status, 'running');

      // `restore --from`: the container is removed where it runs and comes back there, one incarnation on.
      await other.remove(c.name);
      const undo = migrationId('restore-from');
      assert.equal((await other.restore(undo, fromStore(undo, stored.id, c.generation + 2))).container.generation, c.generation + 2);
      await other.settle(undo);
      assert.equal(await runningCopies(c.name), 1);

      await other.remove(c.name);
      await assertNothingLeft();
    });
  });
}


function skip(t: TestContext, why: string): void {
  t.skip(why);
}
