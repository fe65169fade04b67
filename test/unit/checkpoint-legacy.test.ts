/**
 * Checkpoints stored before commit records existed: a store whose index is upgraded marks them
 * legacy, and the controller's catalog counts them on the replicas holding them (listed, read
 * from), records them in its re-replication pass and copies them up to N. A checkpoint stored
 * since without a record (an upload that failed half-way) still does not count.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { pino } from 'pino';
import { uploadCheckpoint } from '../../src/checkpoint-store/index.js';
import { ReplicatedCatalog } from '../../src/controller/checkpoint-replicas.js';
import { MemoryStore } from '../../src/controller/store/memory.js';
import { removeTree } from '../../src/shared/remove-tree.js';
import { Replica } from '../support/store-replica.js';

const TOKEN = 'checkpoint-legacy-token';

describe('checkpoints stored before commit records', () => {
  let work: string;
  let a: Replica;
  let b: Replica;
  const state = new MemoryStore();
  let catalog: ReplicatedCatalog;
  const ids: string[] = [];
  let halfDone: string;

  const upload = async (storeUrl: string) =>
    (
      await uploadCheckpoint({
        storeUrl,
        token: TOKEN,
        container: 'app',
        parts: [
          { name: 'criu', dir: join(work, 'app/criu') },
          { name: 'files', dir: join(work, 'app/files') },
        ],
        metadata: {},
      })
    ).id;

  before(async () => {
    work = await mkdtemp(join(tmpdir(), 'chipmunk-legacy-'));
    await mkdir(join(work, 'app/criu'), { recursive: true });
    await mkdir(join(work, 'app/files/upper'), { recursive: true });
    await writeFile(join(work, 'app/criu/pages-1.img'), randomBytes(64 * 1024));
    a = await new Replica(join(work, 'a'), TOKEN).start();
    b = await new Replica(join(work, 'b'), TOKEN).start();
    // The single controller of an older version: its own store, no commit records.
    ids.push(await upload(a.url));
    await writeFile(join(work, 'app/criu/pages-1.img'), randomBytes(64 * 1024));
    ids.push(await upload(a.url));
    // Its index as that version left it (schema 2, no legacy column); this version's store opens it.
    await a.kill();
    const db = new Database(join(work, 'a/index.sqlite'));
    db.exec('ALTER TABLE checkpoints DROP COLUMN legacy; PRAGMA user_version = 2');
    db.close();
    await a.start();
    // Stored by this version on b, never recorded: not a checkpoint that counts.
    halfDone = await upload(b.url);
    catalog = new ReplicatedCatalog({ state, replicaUrls: () => [a.url, b.url], replicas: 2, token: TOKEN, log: pino({ level: 'silent' }), containerNames: async () => ['app'] });
  });

  after(async () => {
    for (const replica of [a, b]) await replica?.kill().catch(() => undefined);
    await removeTree(work);
  });

  it('lists them on the replica holding them, reads them from it, and leaves out a copy stored since without a record', async () => {
    const listed = await catalog.list('app');
    assert.deepEqual(
      listed.map((c) => [c.id, c.replicas, c.legacy]),
      [...ids].reverse().map((id) => [id, [{ url: a.url, state: 'intact' }], undefined]),
    );
    assert.ok(!listed.some((c) => c.id === halfDone));
    assert.deepEqual(await catalog.readFrom('app', ids[1]!), [a.url]);
    assert.deepEqual(await state.list('/checkpoints/'), [], 'a read writes nothing');
  });

  it('records them in the re-replication pass and copies them up to N', async () => {
    await catalog.replicate();
    const records = await state.list<{ info: { id: string } }>('/checkpoints/app/');
    assert.deepEqual(records.map((r) => r.value.info.id).sort(), [...ids].sort());
    for (const c of await catalog.list('app')) {
      assert.deepEqual(c.replicas, [
        { url: a.url, state: 'intact' },
        { url: b.url, state: 'intact' },
      ]);
    }
    assert.deepEqual((await b.client().list('app')).filter((c) => ids.includes(c.id)).map((c) => c.legacy), [undefined, undefined], "b's copies are its own, not legacy");
    // a loses them: b's copies count (they were recorded).
    await a.kill();
    assert.deepEqual(await catalog.readFrom('app', ids[1]!), [b.url, a.url]);
  });
});
