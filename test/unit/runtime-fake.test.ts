import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { promisify } from 'node:util';
import { FakeRuntime } from '../../src/agent/runtime/fake-runtime.js';
import { ChipmunkError, InvalidInputError, RuntimeFailedError } from '../../src/shared/errors.js';
import type { ContainerSpec } from '../../src/shared/protocol.js';
import { describeRuntimeContract, type RuntimePair } from '../contract/runtime.contract.js';

const execFileAsync = promisify(execFile);

/** Copies the source's migration trees to the target's as files, like the transfer layer. */
async function copyTree(from: string, to: string): Promise<void> {
  await mkdir(to, { recursive: true });
  await execFileAsync('cp', ['-a', `${from}/.`, to]);
}

/** Fakes share one registry of page servers: each lazy dump gets its own port. */
let nextPageServerPort = 27000;

async function fakePair(): Promise<RuntimePair> {
  const source = new FakeRuntime({ node: 'fake1' });
  const target = new FakeRuntime({ node: 'fake2', ipPrefix: '198.19.1' });
  return {
    source,
    target,
    image: 'chipmunk/statefulapp',
    async copyTrees(id, checkpoint) {
      const from = checkpoint ?? source.migrationPaths(id);
      const to = target.migrationPaths(id);
      await copyTree(from.images, to.images);
      await copyTree(from.files, to.files);
    },
    reach: () => undefined,
    pageServer: () => ({ address: '198.18.2.11', port: nextPageServerPort++ }),
    async cleanup() {
      await source.close();
      await target.close();
    },
  };
}

describeRuntimeContract('FakeRuntime', fakePair);

describe('FakeRuntime specifics', () => {
  const spec: ContainerSpec = { name: 'app', image: 'chipmunk/busybox', command: [], env: {}, ports: [], memoryBytes: 0 };

  it('carries its fake process state and logs through a migration', async () => {
    const pair = await fakePair();
    const source = pair.source as FakeRuntime;
    const target = pair.target as FakeRuntime;
    try {
      await source.run(spec);
      source.fakeState('app').counter = 7;
      source.fakeLog('app', 'hello from the source');
      await source.dump('app', { migrationId: 'm1', mode: 'copy' });
      await pair.copyTrees('m1');
      await target.restore(spec, { migrationId: 'm1', mode: 'copy', generation: 1 });
      assert.equal(target.fakeState('app').counter, 7);
      assert.match(await target.logs('app'), /hello from the source/);
    } finally {
      await pair.cleanup();
    }
  });

  it('fails a restore without images like runc, leaving nothing behind', async () => {
    const target = new FakeRuntime();
    try {
      await assert.rejects(target.restore(spec, { migrationId: 'nothing-copied', mode: 'copy', generation: 1 }), RuntimeFailedError);
      assert.deepEqual(await target.list(), []);
    } finally {
      await target.close();
    }
  });

  it('knows only the images it is given, and refuses lazy mode without the capability', async () => {
    const rt = new FakeRuntime({ knownImages: ['mine'], capabilities: { lazyMigration: false } });
    try {
      await assert.rejects(rt.run(spec), InvalidInputError);
      await rt.run({ ...spec, image: 'mine' });
      await assert.rejects(rt.dump('app', { migrationId: 'm', mode: 'lazy', pageServer: { address: '198.18.2.11', port: 27000 } }), (err: unknown) => {
        assert.ok(err instanceof ChipmunkError);
        assert.equal(err.code, 'CHIPMUNK_CAPABILITY_MISSING');
        return true;
      });
      assert.equal((await rt.get('app')).status, 'running');
    } finally {
      await rt.close();
    }
  });
});
