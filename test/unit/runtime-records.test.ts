/**
 * The real runtime's per-container record (containers/NAME/state.json): written durably with a
 * previous copy, and a damaged one reads as damaged, never as "no such container". The runtime
 * here has no runc (`false` stands in for it), which is all reading records needs.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { NodeLayout } from '../../src/agent/runtime/layout.js';
import { RecordStore, type ContainerRecord } from '../../src/agent/runtime/records.js';
import { RuncRuntime } from '../../src/agent/runtime/runc-runtime.js';
import { NotFoundError, StateCorruptError } from '../../src/shared/errors.js';
import { removeTree } from '../../src/shared/remove-tree.js';

function record(name: string, generation = 0): ContainerRecord {
  return {
    spec: { name, image: 'chipmunk/busybox', command: [], env: {}, ports: [], memoryBytes: 0 },
    image: { id: 'sha256:1', entrypoint: [], cmd: ['sh'], env: [], workingDir: '/' },
    generation,
    netns: `chmk-n1-${name}-${generation}`,
    ip: '198.19.1.2',
    createdAt: '2026-12-01T00:00:00.000Z',
  };
}

describe('container records on disk', () => {
  const roots: string[] = [];
  after(async () => {
    for (const r of roots) await removeTree(r);
  });

  async function setup() {
    const dataDir = await mkdtemp(join(tmpdir(), 'chipmunk-records-'));
    roots.push(dataDir);
    const layout = new NodeLayout('n1', dataDir, join(dataDir, 'run'));
    const warnings: string[] = [];
    const store = new RecordStore(layout, 'n1', (message) => warnings.push(message));
    const put = async (name: string, text: string, file = 'state.json') => {
      await mkdir(layout.containerDir(name), { recursive: true });
      await writeFile(join(layout.containerDir(name), file), text);
    };
    return { dataDir, layout, store, warnings, put };
  }

  it('writes the record whole, keeping the previous one as state.json.prev', async () => {
    const { layout, store } = await setup();
    await mkdir(layout.containerDir('web'), { recursive: true });
    await store.write(record('web', 0));
    assert.equal((await store.read('web')).generation, 0);
    assert.ok(!existsSync(`${store.path('web')}.prev`), 'no previous copy of a first record');
    await store.write(record('web', 1));
    assert.equal((await store.read('web')).generation, 1);
    assert.equal(JSON.parse(await readFile(`${store.path('web')}.prev`, 'utf8')).generation, 0);
    assert.deepEqual((await readdir(layout.containerDir('web'))).sort(), ['state.json', 'state.json.prev'], 'no temporary file left');
  });

  it('no file is no such container', async () => {
    const { store } = await setup();
    await assert.rejects(store.read('ghost'), NotFoundError);
    assert.equal(await store.find('ghost'), undefined);
  });

  for (const [what, damage] of [
    ['unparsable JSON', (put: (n: string, t: string) => Promise<void>) => put('web', '{"spec": {"name": "we')],
    ['a record of the wrong shape', (put: (n: string, t: string) => Promise<void>) => put('web', JSON.stringify({ ...record('web'), generation: 'one' }))],
    ["another container's record", (put: (n: string, t: string) => Promise<void>) => put('web', JSON.stringify(record('db')))],
  ] as const) {
    it(`${what} without a good previous copy is a damaged record, with a stable code, the file and what to do`, async () => {
      const { store, put } = await setup();
      await damage(put);
      const err = await store.read('web').then(() => assert.fail('a damaged record must not read'), (e: unknown) => e);
      assert.ok(err instanceof StateCorruptError, `StateCorruptError, got ${String(err)}`);
      assert.equal(err.code, 'CHIPMUNK_STATE_CORRUPT');
      assert.equal(err.details.path, store.path('web'));
      assert.match(err.message, /state\.json/);
      assert.match(err.message, /repair the file from a backup, or stop the container/);
      await assert.rejects(store.find('web'), StateCorruptError, 'find does not take damage for absence');
    });
  }

  it('a file that cannot be read (not ENOENT) is damaged too', async () => {
    const { layout, store } = await setup();
    // A directory where the file should be: the read fails with EISDIR, as an I/O error would.
    await mkdir(join(layout.containerDir('web'), 'state.json'), { recursive: true });
    await assert.rejects(store.read('web'), (err: unknown) => err instanceof StateCorruptError && /cannot be read \(EISDIR\)/.test(err.message));
  });

  it('a damaged record falls back to the previous good copy, with one warning', async () => {
    const { store, put, warnings } = await setup();
    await put('web', JSON.stringify(record('web', 3)), 'state.json.prev');
    await put('web', 'garbage');
    assert.equal((await store.read('web')).generation, 3);
    assert.equal((await store.read('web')).generation, 3);
    assert.equal(warnings.length, 1);
    assert.match(warnings[0], /record of container 'web' is damaged .*previous copy/);
  });

  it('writing over a damaged record keeps the good previous copy', async () => {
    const { store, put } = await setup();
    await put('web', JSON.stringify(record('web', 3)), 'state.json.prev');
    await put('web', 'garbage');
    await store.write(record('web', 4));
    assert.equal((await store.read('web')).generation, 4);
    assert.equal(JSON.parse(await readFile(`${store.path('web')}.prev`, 'utf8')).generation, 3);
  });

  it('the runtime lists a container with a damaged record as unknown, with the error; get says why', async () => {
    const { dataDir, put } = await setup();
    await put('good', JSON.stringify(record('good')));
    await put('bad', '{');
    const runtime = new RuncRuntime({
      node: 'n1',
      dataDir,
      runDir: join(dataDir, 'run'),
      subnet: '198.19.250.0/24',
      criuPath: 'false',
      runcPath: 'false',
      capabilities: { lazyMigration: false, softDirty: false, cgroupMode: 'v2' },
      onWarning: () => undefined,
    });
    const listed = await runtime.list();
    assert.deepEqual(listed.map((c) => [c.name, c.status]), [['bad', 'unknown'], ['good', 'stopped']], 'nothing left out');
    assert.equal(listed[0].error?.code, 'CHIPMUNK_STATE_CORRUPT');
    await assert.rejects(runtime.get('bad'), StateCorruptError);
    await assert.rejects(runtime.get('none'), NotFoundError);
  });
});
