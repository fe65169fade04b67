import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { ConflictError, InvalidInputError, NotFoundError, RuntimeFailedError, type ChipmunkError } from '../../src/shared/errors.js';
import type { AgentContainer, ContainerSpec, MigrationMode } from '../../src/shared/protocol.js';
import type { ContainerRuntime, MigrationPaths } from '../../src/agent/runtime/types.js';

/**
 * The behaviour every ContainerRuntime must have (RuncRuntime for real, FakeRuntime in memory),
 * including a migration between two of them: source dump, copy of the migration trees,
 * target restore, and the ways back (rollback, abortRestore).
 *
 * The container under test runs `image` with the statefulapp's interface (GET / → {counter},
 * POST /increment, GET /file → {lines}, GET /verify-memory → {ok}) on container port 8080;
 * state is only checked where the fixture can `reach` it.
 */

/** JSON over HTTP to the app in one container. */
export interface AppClient {
  get(path: string): Promise<any>;
  post(path: string): Promise<any>;
}

export interface RuntimePair {
  source: ContainerRuntime;
  target: ContainerRuntime;
  /**
   * Copies the source's `migrationPaths(id)` trees (or `from`, a checkpoint's) to the target's
   * `migrationPaths(id)`: what the transfer layer, or a download from the checkpoint store, does.
   */
  copyTrees(migrationId: string, from?: MigrationPaths): Promise<void>;
  /** A client for the container's app once it answers; undefined when nothing runs (fakes). */
  reach(runtime: ContainerRuntime, container: AgentContainer): Promise<AppClient> | undefined;
  /** Where the source's CRIU page server may listen for a lazy migration (a fresh port each call). */
  pageServer(): { address: string; port: number };
  image: string;
  /** Removes everything the pair made, whatever state a failed test left it in. */
  cleanup(): Promise<void>;
}

export const APP_PORT = 8080;
export const HOST_PORT = 18080;

export function describeRuntimeContract(name: string, makePair: () => Promise<RuntimePair>, opts: { timeoutMs?: number } = {}): void {
  /** Per test. */
  const timeout = opts.timeoutMs ?? 180_000;

  async function withPair(run: (pair: RuntimePair) => Promise<void>): Promise<void> {
    const pair = await makePair();
    let failure: unknown;
    try {
      await run(pair);
    } catch (err) {
      failure = err;
    }
    try {
      await pair.cleanup();
    } catch (err) {
      if (failure === undefined) throw err;
      console.error(`cleanup after a failed test also failed: ${(err as Error).message}`);
    }
    if (failure !== undefined) throw failure;
  }

  function appSpec(pair: RuntimePair, containerName: string, over: Partial<ContainerSpec> = {}): ContainerSpec {
    return {
      name: containerName,
      image: pair.image,
      command: [],
      env: { MEMORY_MB: '32' },
      ports: [{ hostPort: HOST_PORT, containerPort: APP_PORT, protocol: 'tcp' }],
      memoryBytes: 256 * 1024 * 1024,
      ...over,
    };
  }

  const migrationId = (tag: string) => `mig-${tag}-${randomBytes(3).toString('hex')}`;
  const names = async (rt: ContainerRuntime) => (await rt.list()).map((c) => c.name);
  const lazyUnsupported = (pair: RuntimePair) => !pair.source.capabilities.lazyMigration || !pair.target.capabilities.lazyMigration;
  const dumpOpts = (pair: RuntimePair, id: string, mode: MigrationMode) => ({
    migrationId: id,
    mode,
    ...(mode === 'lazy' ? { pageServer: pair.pageServer() } : {}),
  });

  /** Puts some state in the app: `n` increments, each also a line in its data file. */
  async function addState(app: AppClient | undefined, n: number): Promise<void> {
    if (!app) return;
    for (let i = 0; i < n; i++) await app.post('/increment');
    assert.equal((await app.get('/')).counter, n);
  }

  async function assertState(app: AppClient | undefined, n: number): Promise<void> {
    if (!app) return;
    assert.equal((await app.get('/')).counter, n, 'the counter (process memory) survived');
    assert.equal((await app.get('/file')).lines, n, 'the file written before the dump survived');
    assert.equal((await app.get('/verify-memory')).ok, true, 'the 32 MB memory pattern is intact');
  }

  describe(`ContainerRuntime contract: ${name}`, () => {
    it('runs a container, gets, lists, shows its logs, stops and removes it', { timeout }, () =>
      withPair(async (pair) => {
        const rt = pair.source;
        assert.deepEqual(await rt.list(), []);
        const spec = appSpec(pair, 'basic');
        const c = await rt.run(spec);
        assert.equal(c.name, 'basic');
        assert.equal(c.status, 'running');
        assert.equal(c.generation, 0);
        assert.deepEqual(c.spec, spec);
        assert.ok(!Number.isNaN(Date.parse(c.createdAt)), c.createdAt);
        assert.equal((await rt.get('basic')).status, 'running');
        assert.deepEqual(await names(rt), ['basic']);
        assert.deepEqual(await names(pair.target), [], 'the target has nothing of it');

        const app = await pair.reach(rt, c);
        if (app) assert.equal((await app.get('/')).counter, 0);
        await eventually(async () => (await rt.logs('basic')).length > 0, 'the container logs something');
        assert.equal(typeof (await rt.logs('basic', { stream: 'stderr' })), 'string');
        assert.ok((await rt.logs('basic', { stream: 'stdout', tailLines: 1 })).length > 0);
        assert.equal((await rt.stats('basic')).name, 'basic');

        await assertRejects(rt.remove('basic'), ConflictError, 'a running container is not removed without force');
        assert.deepEqual(await names(rt), ['basic']);

        const stopped = await rt.stop('basic', { timeoutMs: 5_000 });
        assert.equal(stopped.status, 'stopped');
        assert.equal((await rt.get('basic')).status, 'stopped');
        await assertRejects(rt.dump('basic', { migrationId: migrationId('stopped'), mode: 'copy' }), ConflictError, 'only running containers migrate');
        assert.equal((await rt.get('basic')).status, 'stopped');

        await rt.remove('basic');
        assert.deepEqual(await rt.list(), []);
        await assertRejects(rt.get('basic'), NotFoundError);
        // The name and the port are free again.
        await rt.run(spec);
        await rt.remove('basic', { force: true });
        assert.deepEqual(await rt.list(), []);
      }));

    it('rejects bad input with the right error and leaves nothing behind', { timeout }, () =>
      withPair(async (pair) => {
        const rt = pair.source;
        await rt.run(appSpec(pair, 'holder'));
        const before = await rt.list();

        await assertRejects(rt.run(appSpec(pair, 'noimage', { image: 'chipmunk/no-such-image', ports: [] })), InvalidInputError, 'unknown image');
        await assertRejects(rt.run(appSpec(pair, 'holder', { ports: [] })), ConflictError, 'name taken');
        await assertRejects(rt.run(appSpec(pair, 'portclash')), ConflictError, 'host port taken');
        await assertRejects(rt.run(appSpec(pair, 'tiny', { ports: [], memoryBytes: 1024 * 1024 })), InvalidInputError, 'memory too small');
        const twice = { hostPort: HOST_PORT + 1, containerPort: APP_PORT, protocol: 'tcp' as const };
        await assertRejects(rt.run(appSpec(pair, 'twice', { ports: [twice, twice] })), InvalidInputError, 'a host port published twice');
        assert.deepEqual(await rt.list(), before, 'failed runs left nothing behind');

        const attempts: Array<[string, () => Promise<unknown>]> = [
          ['get', () => rt.get('ghost')],
          ['stop', () => rt.stop('ghost')],
          ['remove', () => rt.remove('ghost', { force: true })],
          ['logs', () => rt.logs('ghost')],
          ['stats', () => rt.stats('ghost')],
          ['dump', () => rt.dump('ghost', { migrationId: migrationId('ghost'), mode: 'copy' })],
          ['rollback', () => rt.rollback(migrationId('ghost'))],
        ];
        for (const [op, attempt] of attempts) await assertRejects(attempt(), NotFoundError, `${op} of an unknown name or migration`);
        // Cleaning up a migration this node never saw is a no-op, not an error.
        await pair.target.abortRestore(migrationId('ghost'));
        await rt.finishMigration(migrationId('ghost'));
        assert.deepEqual(await rt.list(), before);
        assert.deepEqual(await pair.target.list(), []);
        await rt.remove('holder', { force: true });
      }));

    for (const mode of ['copy', 'lazy'] as const) {
      it(`migrates a running container in ${mode} mode with its memory, counter and files`, { timeout }, (t) =>
        withPair(async (pair) => {
          if (mode === 'lazy' && lazyUnsupported(pair)) return skip(t, 'no lazy migration on these hosts');
          const { source, target } = pair;
          const c = await source.run(appSpec(pair, `mv-${mode}`));
          await addState(await pair.reach(source, c), 3);

          const id = migrationId(mode);
          const opts = dumpOpts(pair, id, mode);
          const out = await source.dump(c.name, opts);
          assert.ok(out.imageBytes > 0, `imageBytes ${out.imageBytes}`);
          assert.ok(out.frozenAt > 0 && out.frozenAt <= Date.now());
          assert.equal((await source.get(c.name)).status, 'migrating');
          await assertMigratingRefuses(source, c.name);

          await pair.copyTrees(id);
          const restored = await target.restore(c.spec, { migrationId: id, mode, generation: c.generation + 1, pageServer: opts.pageServer });
          assert.equal(restored.name, c.name);
          assert.equal(restored.status, 'running');
          assert.equal(restored.generation, c.generation + 1);
          assert.deepEqual(restored.spec, c.spec);
          assert.equal((await target.get(c.name)).status, 'running');
          assert.deepEqual(await names(target), [c.name]);

          const app = await pair.reach(target, restored);
          await assertState(app, 3);
          if (app) assert.equal((await app.post('/increment')).counter, 4, 'the restored container keeps working');
          assert.ok((await target.logs(c.name)).length > 0, 'the logs came along');

          await source.finishMigration(id);
          await assertRejects(source.get(c.name), NotFoundError, 'the source forgot it');
          assert.deepEqual(await source.list(), []);
          assert.ok(!existsSync(source.migrationPaths(id).images), 'the source removed its images');

          await target.stop(c.name, { timeoutMs: 5_000 });
          await target.remove(c.name);
          assert.deepEqual(await target.list(), []);
        }));

      it(`rolls back after a ${mode} dump: the container runs on the source again`, { timeout }, (t) =>
        withPair(async (pair) => {
          if (mode === 'lazy' && lazyUnsupported(pair)) return skip(t, 'no lazy migration on these hosts');
          const { source, target } = pair;
          const c = await source.run(appSpec(pair, `rb-${mode}`));
          await addState(await pair.reach(source, c), 2);

          // Twice: a rolled-back container migrates (and rolls back) again like any other.
          for (let round = 1; round <= 2; round++) {
            const id = migrationId(`rb-${mode}`);
            await source.dump(c.name, dumpOpts(pair, id, mode));
            await assertMigratingRefuses(source, c.name);
            // The transfer ran, then the migration failed before the restore.
            await pair.copyTrees(id);
            await target.abortRestore(id);
            await target.abortRestore(id);
            assert.deepEqual(await target.list(), []);
            assertNoTrees(target, id);

            const back = await source.rollback(id);
            assert.equal(back.status, 'running');
            assert.equal(back.generation, c.generation + round);
            assert.equal((await source.get(c.name)).status, 'running');
            const app = await pair.reach(source, back);
            await assertState(app, round + 1);
            if (app) assert.equal((await app.post('/increment')).counter, round + 2);
          }

          // No longer migrating: the usual operations work again, and removing it frees its
          // name and port for a new container.
          await source.stop(c.name, { timeoutMs: 5_000 });
          await source.remove(c.name);
          assert.deepEqual(await source.list(), []);
          const fresh = await source.run(appSpec(pair, c.name));
          const freshApp = await pair.reach(source, fresh);
          if (freshApp) assert.equal((await freshApp.get('/')).counter, 0);
          await source.remove(c.name, { force: true });
          assert.deepEqual(await source.list(), []);
        }));
    }

    it('checkpoints a running container, which runs on; a restore of the checkpoint has the state of that instant', { timeout }, () =>
      withPair(async (pair) => {
        const { source, target } = pair;
        const c = await source.run(appSpec(pair, 'ckpt'));
        const app = await pair.reach(source, c);
        await addState(app, 3);

        const checkpointId = migrationId('ckpt');
        const ckpt = await source.checkpoint(c.name, checkpointId);
        assert.ok(ckpt.imageBytes > 0, `imageBytes ${ckpt.imageBytes}`);
        assert.ok(ckpt.frozenMs >= 0);
        assert.equal((await source.get(c.name)).status, 'running', 'a checkpoint leaves the container running');
        if (app) assert.equal((await app.post('/increment')).counter, 4, 'and working');
        await assertRejects(source.checkpoint('no-such', migrationId('ckpt')), NotFoundError, 'unknown name');

        const restoreId = migrationId('from-ckpt');
        await pair.copyTrees(restoreId, ckpt.paths);
        await source.discardCheckpoint(checkpointId);
        assert.ok(!existsSync(ckpt.paths.images), 'discardCheckpoint removed the images');
        const restored = await target.restore(c.spec, { migrationId: restoreId, mode: 'copy', generation: c.generation + 1 });
        assert.equal(restored.status, 'running');
        await assertState(await pair.reach(target, restored), 3);
        await target.remove(c.name, { force: true });
        await source.remove(c.name, { force: true });
      }));

    it('aborts a completed restore: nothing is left on the target and the source rolls back', { timeout }, () =>
      withPair(async (pair) => {
        const { source, target } = pair;
        const c = await source.run(appSpec(pair, 'abort'));
        await addState(await pair.reach(source, c), 2);
        const id = migrationId('abort');
        await source.dump(c.name, { migrationId: id, mode: 'copy' });
        await pair.copyTrees(id);
        await target.restore(c.spec, { migrationId: id, mode: 'copy', generation: c.generation + 1 });
        assert.deepEqual(await names(target), [c.name]);

        await target.abortRestore(id);
        assert.deepEqual(await target.list(), []);
        assertNoTrees(target, id);
        await target.abortRestore(id);
        // Name and port are free on the target again.
        const fresh = await target.run(appSpec(pair, c.name));
        const freshApp = await pair.reach(target, fresh);
        if (freshApp) assert.equal((await freshApp.get('/')).counter, 0);
        await target.remove(c.name, { force: true });
        assert.deepEqual(await target.list(), []);

        const back = await source.rollback(id);
        assert.equal(back.status, 'running');
        await assertState(await pair.reach(source, back), 2);
        await source.remove(c.name, { force: true });
        assert.deepEqual(await source.list(), []);
      }));

    it('fails a lazy restore whose page server is unreachable, leaving nothing on the target', { timeout }, (t) =>
      withPair(async (pair) => {
        if (lazyUnsupported(pair)) return skip(t, 'no lazy migration on these hosts');
        const { source, target } = pair;
        const c = await source.run(appSpec(pair, 'nopages'));
        await addState(await pair.reach(source, c), 2);
        const id = migrationId('nopages');
        const opts = dumpOpts(pair, id, 'lazy');
        await source.dump(c.name, opts);
        await pair.copyTrees(id);
        const elsewhere = { address: opts.pageServer!.address, port: opts.pageServer!.port + 1000 };
        await assertRejects(target.restore(c.spec, { migrationId: id, mode: 'lazy', generation: 1, pageServer: elsewhere }), RuntimeFailedError, 'no page server');
        assert.deepEqual(await target.list(), []);
        await target.abortRestore(id);
        assertNoTrees(target, id);

        // Nobody took the pages: the source still has them and rolls back.
        const back = await source.rollback(id);
        assert.equal(back.status, 'running');
        await assertState(await pair.reach(source, back), 2);
        await source.remove(c.name, { force: true });
      }));

    it('refuses a restore over an existing name or published port, leaving both in place', { timeout }, () =>
      withPair(async (pair) => {
        const { source, target } = pair;
        const c = await source.run(appSpec(pair, 'dup'));
        const id = migrationId('dup');
        await source.dump(c.name, { migrationId: id, mode: 'copy' });
        await pair.copyTrees(id);
        await target.run(appSpec(pair, 'dup', { ports: [] }));
        await assertRejects(target.restore(c.spec, { migrationId: id, mode: 'copy', generation: 1 }), ConflictError, 'name taken on the target');
        await target.remove('dup', { force: true });
        await target.run(appSpec(pair, 'squatter'));
        await assertRejects(target.restore(c.spec, { migrationId: id, mode: 'copy', generation: 1 }), ConflictError, 'port taken on the target');
        assert.deepEqual(await names(target), ['squatter']);
        await target.remove('squatter', { force: true });

        await target.abortRestore(id);
        assert.equal((await source.rollback(id)).status, 'running');
        await source.remove(c.name, { force: true });
      }));
  });
}

async function assertMigratingRefuses(rt: ContainerRuntime, name: string): Promise<void> {
  await assertRejects(rt.stop(name), ConflictError, 'stop while migrating');
  await assertRejects(rt.remove(name, { force: true }), ConflictError, 'remove while migrating');
  await assertRejects(rt.dump(name, { migrationId: 'mig-second', mode: 'copy' }), ConflictError, 'a second dump');
  assert.equal((await rt.get(name)).status, 'migrating');
}

function assertNoTrees(rt: ContainerRuntime, id: string): void {
  const paths = rt.migrationPaths(id);
  assert.ok(!existsSync(paths.images), `${paths.images} is gone`);
  assert.ok(!existsSync(paths.files), `${paths.files} is gone`);
}

async function assertRejects(p: Promise<unknown>, cls: new (...args: any[]) => ChipmunkError, what?: string): Promise<void> {
  const codes: Record<string, string> = {
    InvalidInputError: 'CHIPMUNK_INVALID_INPUT',
    NotFoundError: 'CHIPMUNK_NOT_FOUND',
    ConflictError: 'CHIPMUNK_CONFLICT',
    RuntimeFailedError: 'CHIPMUNK_RUNTIME_FAILED',
  };
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof cls, `${what ?? ''}: expected ${cls.name}, got ${(err as Error)?.constructor?.name}: ${(err as Error)?.message}`);
    assert.equal((err as ChipmunkError).code, codes[cls.name], what);
    return true;
  });
}

async function eventually(check: () => Promise<boolean>, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) assert.fail(`timed out waiting until ${what}`);
    await sleep(100);
  }
}

function skip(t: TestContext, why: string): void {
  t.skip(why);
}
