import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { InvalidInputError, StoreFailedError } from '../../src/shared/errors.js';
import { MemoryStore, SqliteStore, openStore, parseEtcdSpec } from '../../src/controller/store/index.js';
import { describeStoreContract } from '../contract/store.contract.js';

describeStoreContract('MemoryStore', async (opts) => {
  const store = new MemoryStore(opts);
  return { store, cleanup: () => store.close() };
});

describeStoreContract('SqliteStore', async (opts) => {
  const dir = await mkdtemp(join(tmpdir(), 'chipmunk-store-'));
  const path = join(dir, 'state.db');
  let store = SqliteStore.open(path, opts);
  return {
    store,
    reopen: async () => {
      await store.close();
      store = SqliteStore.open(path, opts);
      return store;
    },
    cleanup: async () => {
      await store.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
});

async function withTempDir(run: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'chipmunk-store-'));
  try {
    await run(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

describe('SqliteStore', () => {
  it('refuses a second open of a file that is in use', () =>
    withTempDir(async (dir) => {
      const path = join(dir, 'state.db');
      const first = SqliteStore.open(path);
      try {
        assert.throws(() => SqliteStore.open(path), (err) => err instanceof StoreFailedError && /in use/.test(err.message));
      } finally {
        await first.close();
      }
      const second = SqliteStore.open(path);
      await second.close();
    }));

  it('keeps an acknowledged write when the process is killed without closing', () =>
    withTempDir(async (dir) => {
      const path = join(dir, 'state.db');
      const sqliteModule = fileURLToPath(new URL('../../src/controller/store/sqlite.ts', import.meta.url));
      const script = `
        const { SqliteStore } = await import(${JSON.stringify(sqliteModule)});
        const store = SqliteStore.open(${JSON.stringify(path)});
        await store.put('/crash/a', { acknowledged: true });
        process.kill(process.pid, 'SIGKILL');`;
      const child = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { encoding: 'utf8' });
      assert.equal(child.signal, 'SIGKILL', `the writer should have been killed; stderr: ${child.stderr}`);

      const store = SqliteStore.open(path);
      try {
        assert.deepEqual((await store.get('/crash/a'))?.value, { acknowledged: true });
        assert.equal(await store.currentRevision(), 1);
      } finally {
        await store.close();
      }
    }));
});

describe('openStore', () => {
  it('opens memory: and sqlite: specs', () =>
    withTempDir(async (dir) => {
      for (const spec of ['memory:', `sqlite:${join(dir, 'state.db')}`]) {
        const store = await openStore(spec);
        try {
          assert.equal(await store.put('/spec', spec), 1);
          assert.equal((await store.get('/spec'))?.value, spec);
        } finally {
          await store.close();
        }
      }
    }));

  it('rejects other specs, naming the accepted forms', async () => {
    for (const spec of ['sqlite:', 'memory', '/var/lib/chipmunk/state.db', 'etcd2://127.0.0.1:2379']) {
      await assert.rejects(
        openStore(spec),
        (err) =>
          err instanceof InvalidInputError && ['"memory:"', '"sqlite:/path/to/file.db"', '"etcd://host:2379'].every((form) => err.message.includes(form)),
        spec,
      );
    }
  });

  it('rejects a bad etcd spec, naming what is wrong and the form to use', async () => {
    const cases: [string, RegExp][] = [
      ['etcd:127.0.0.1:2379', /must start with etcd:\/\//],
      ['etcd://', /names no etcd member/],
      ['etcd://127.0.0.1', /member "127.0.0.1" is not HOST:PORT/],
      ['etcd://h1:2379,,h2:2379', /member "" is not HOST:PORT/],
      ['etcd://h1:70000', /port 70000, outside 1-65535/],
      ['etcd://h1:2379/ns with space', /namespace/],
    ];
    for (const [spec, why] of cases) {
      await assert.rejects(openStore(spec), (err) => err instanceof InvalidInputError && why.test(err.message) && err.message.includes('etcd://HOST:PORT'), spec);
    }
  });

  it('parses the members and the namespace of an etcd spec', () => {
    assert.deepEqual(parseEtcdSpec('etcd://10.0.0.1:2379,node-2.example:2379,[::1]:2379'), {
      endpoints: ['10.0.0.1:2379', 'node-2.example:2379', '[::1]:2379'],
      namespace: '',
    });
    assert.deepEqual(parseEtcdSpec('etcd://h1:2379/chipmunk/prod/'), { endpoints: ['h1:2379'], namespace: '/chipmunk/prod' });
  });
});
