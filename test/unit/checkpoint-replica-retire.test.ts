/**
 * Retiring a checkpoint store replica for good (checkpoint-replica-admin.ts), over real stores
 * (temp dirs, real HTTP on loopback) and the catalog's commit records in a memory state store:
 * the listing, refusals that change nothing, a retirement that copies what lived on the replica
 * to the others first, a dead replica retired from the other copies, and one that stays retiring
 * until its only copy can be read, then finishes when the same command is run again.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { uploadCheckpoint } from '../../src/checkpoint-store/index.js';
import { ReplicaAdmin } from '../../src/controller/checkpoint-replica-admin.js';
import { ReplicatedCatalog } from '../../src/controller/checkpoint-replicas.js';
import { MemoryStore } from '../../src/controller/store/memory.js';
import { ConflictError, NotFoundError, UnavailableError } from '../../src/shared/errors.js';
import { removeTree } from '../../src/shared/remove-tree.js';
import { Replica } from '../support/store-replica.js';

const TOKEN = 'replica-retire-test-token';

describe('retiring a checkpoint store replica', () => {
  let work: string;
  let criu: string;
  const replicas: Record<'a' | 'b' | 'c' | 'd' | 'e', Replica> = {} as never;
  const state = new MemoryStore();
  let candidates: string[];
  let catalog: ReplicatedCatalog;
  let admin: ReplicaAdmin;

  /** What CheckpointService does: targets from the catalog, the agent's upload, the commit record. */
  async function checkpoint(container: string): Promise<string> {
    await writeFile(join(criu, 'pages-2.img'), randomBytes(8192));
    const [storeUrl, ...rest] = await catalog.uploadTargets();
    const info = await uploadCheckpoint({ storeUrl: storeUrl!, replicaUrls: rest, token: TOKEN, container, parts: [{ name: 'criu', dir: criu }], metadata: {} });
    await catalog.committed(info, [storeUrl!, ...rest]);
    return info.id;
  }

  /** Every key and value of the state store: what a refused retirement must leave as it was. */
  async function snapshot(): Promise<string> {
    return JSON.stringify((await state.list('/')).map((kv) => [kv.key, kv.value]));
  }

  const url = (name: keyof typeof replicas) => replicas[name].url;

  before(async () => {
    work = await mkdtemp(join(tmpdir(), 'chipmunk-retire-'));
    criu = join(work, 'criu');
    await mkdir(criu, { recursive: true });
    await writeFile(join(criu, 'pages-1.img'), randomBytes(256 * 1024));
    for (const name of ['a', 'b', 'c', 'd', 'e'] as const) replicas[name] = await new Replica(join(work, name), TOKEN).start();
    candidates = [url('a'), url('b'), url('c')];
    catalog = new ReplicatedCatalog({ state, replicaUrls: () => candidates, replicas: 2, token: TOKEN, log: pino({ level: 'silent' }), replicaTimeoutMs: 1_000 });
    admin = new ReplicaAdmin({ catalog, hosts: () => [{ checkpointStore: url('a'), id: 'controller-a', node: 'node1' }] });
  });

  after(async () => {
    for (const replica of Object.values(replicas)) await replica.kill().catch(() => undefined);
    await removeTree(work);
  });

  it('lists every replica: its controller, whether it answers, the checkpoints recorded on it and what its store holds', async () => {
    await checkpoint('app');
    await checkpoint('app');
    await checkpoint('db');
    const listed = await admin.list();
    assert.deepEqual(
      listed.map(({ url, status, controller, node, reachable, checkpoints, stored }) => ({ url, status, controller, node, reachable, checkpoints, stored })),
      [
        { url: url('a'), status: 'active', controller: 'controller-a', node: 'node1', reachable: true, checkpoints: 3, stored: 3 },
        { url: url('b'), status: 'active', controller: undefined, node: undefined, reachable: true, checkpoints: 3, stored: 3 },
        { url: url('c'), status: 'active', controller: undefined, node: undefined, reachable: true, checkpoints: 0, stored: 0 },
      ],
    );
    assert.ok(listed[0]!.bytes! >= 256 * 1024, `a's packs hold the image (${listed[0]!.bytes} bytes)`);
    assert.equal(listed[2]!.bytes, 0);
  });

  it('refuses an unknown URL, and a retirement whose remaining replicas do not answer, changing nothing', async () => {
    const before = await snapshot();
    await assert.rejects(admin.retire('http://127.0.0.1:1'), (err: unknown) => err instanceof NotFoundError && /is no checkpoint replica of this cluster/.test(err.message) && err.message.includes(url('b')));
    await replicas.c.kill();
    await assert.rejects(admin.retire(url('b')), (err: unknown) => err instanceof UnavailableError && /only 1 of the remaining checkpoint replicas answer/.test(err.message) && err.message.includes(url('c')));
    await replicas.c.start();
    assert.equal(await snapshot(), before, 'no retirement recorded, no record changed');
    assert.deepEqual((await replicas.c.client().list('app')).length, 0, 'nothing was copied');
  });

  it('copies every checkpoint on the retired replica to the others first, then never lists, reads or uploads to it again', async () => {
    const app = (await catalog.list('app')).map((c) => c.id);
    const retired = await admin.retire(`${url('b')}/`);
    assert.deepEqual(retired, { url: url('b'), status: 'retired', alreadyRetired: false, checkpoints: 3, copies: 3 });
    assert.deepEqual((await replicas.c.client().list('app')).map((c) => c.id), app, 'c holds what b held');
    assert.equal((await replicas.b.client().list('app')).length, 2, "b still answers and still has its copies: they are just never used");
    for (const container of ['app', 'db']) {
      for (const listed of await catalog.list(container)) {
        assert.deepEqual(listed.replicas, [{ url: url('a'), state: 'intact' }, { url: url('c'), state: 'intact' }]);
        assert.deepEqual(await catalog.readFrom(container, listed.id), [url('a'), url('c')], 'a restore is never handed b');
      }
    }
    assert.deepEqual(await catalog.uploadTargets(), [url('a'), url('c')]);
    assert.equal(await catalog.replicate(), 0, 'nothing is copied to b by a later pass');
    const b = (await admin.list()).find((r) => r.url === url('b'))!;
    assert.equal(b.status, 'retired');
    assert.equal(b.checkpoints, 0, 'no record names it any more');
    assert.ok(b.since! > 0);

    // Idempotent.
    assert.deepEqual(await admin.retire(url('b')), { url: url('b'), status: 'retired', alreadyRetired: true, checkpoints: 0, copies: 0 });
  });

  it('refuses a retirement that would leave fewer than N active replicas, naming what to do, changing nothing', async () => {
    const before = await snapshot();
    await assert.rejects(
      admin.retire(url('a')),
      (err: unknown) => err instanceof ConflictError && /would leave 1 active checkpoint replica/.test(err.message) && /add a replica first/.test(err.message) && /lower --checkpoint-replicas/.test(err.message),
    );
    assert.equal(await snapshot(), before);
  });

  it('retires a dead replica from the other copies of what it held', async () => {
    candidates = [url('a'), url('b'), url('c'), url('d'), url('e')];
    await replicas.a.kill();
    const retired = await admin.retire(url('a'));
    assert.equal(retired.checkpoints, 3);
    for (const listed of await catalog.list('app')) {
      assert.deepEqual(listed.replicas, [{ url: url('c'), state: 'intact' }, { url: url('d'), state: 'intact' }], 'copied from c to d; a is gone from the listing');
    }
  });

  it('keeps a replica retiring while it holds the only copy of a checkpoint and cannot be read; the same command finishes it once it is back', async () => {
    const id = await checkpoint('db');
    // c loses its copy, then d (the other holder) dies: d's copy is the only one.
    await replicas.c.client().remove('db', id);
    await replicas.d.kill();
    await assert.rejects(admin.retire(url('d')), (err: unknown) => err instanceof UnavailableError && /stays retiring/.test(err.message) && err.message.includes(id) && /run the same command again/.test(err.message));
    assert.equal((await admin.list()).find((r) => r.url === url('d'))!.status, 'retiring');
    assert.ok(!(await catalog.uploadTargets()).includes(url('d')), 'a retiring replica takes no new checkpoint');

    await replicas.d.start();
    const retired = await admin.retire(url('d'));
    assert.equal(retired.alreadyRetired, false);
    const listed = (await catalog.list('db')).find((c) => c.id === id)!;
    assert.deepEqual(listed.replicas, [{ url: url('c'), state: 'intact' }, { url: url('e'), state: 'intact' }], "copied from the retiring replica's copy before it was retired");
  });
});
