/**
 * The checkpoint store's SQLite index across versions: an index written before request-log
 * positions named their log still opens, and its positions read with a null log id; checkpoints
 * stored before version 3 (no commit records then) are listed as legacy, later ones are not.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { CheckpointStore } from '../../src/checkpoint-store/index.js';
import { encodeManifest } from '../../src/checkpoint-store/manifest.js';

/** The checkpoints table as schema version 1 had it (no log_id). */
const VERSION_1 = `
  CREATE TABLE checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    container TEXT NOT NULL,
    id TEXT NOT NULL UNIQUE,
    time INTEGER NOT NULL,
    logical_bytes INTEGER NOT NULL,
    new_bytes INTEGER NOT NULL,
    log_position INTEGER,
    metadata TEXT NOT NULL,
    corrupt INTEGER NOT NULL DEFAULT 0
  );
  CREATE INDEX checkpoints_by_container ON checkpoints (container, seq);
  INSERT INTO checkpoints (container, id, time, logical_bytes, new_bytes, log_position, metadata) VALUES ('app1', '00000000000000aa', 1, 10, 10, 120, '{}');
  INSERT INTO checkpoints (container, id, time, logical_bytes, new_bytes, log_position, metadata) VALUES ('app1', '00000000000000bb', 2, 10, 0, NULL, '{}');
  PRAGMA user_version = 1;
`;

describe('checkpoint store index', () => {
  it('opens an index of schema version 1: old positions keep their seq with a null log id', async () => {
    const root = await mkdtemp(join(tmpdir(), 'chipmunk-ckpt-index-'));
    try {
      const old = new Database(join(root, 'index.sqlite'));
      old.exec(VERSION_1);
      old.close();
      const store = await CheckpointStore.open({ root });
      try {
        assert.deepEqual(
          store.list('app1').map((c) => [c.id, c.logPosition, c.legacy]),
          [
            ['00000000000000bb', null, true],
            ['00000000000000aa', { logId: null, seq: 120 }, true],
          ],
        );
        const { uploadId } = store.createUpload({ container: 'app1', parts: [{ name: 'files', manifest: encodeManifest({ entries: [], endBytes: 1024 }) }], time: 3, metadata: {} });
        const stored = await store.commit(uploadId);
        assert.equal(store.list('app1').find((c) => c.id === stored.id)?.legacy, undefined, 'a checkpoint stored by this version is not legacy');
      } finally {
        await store.close();
      }
      const migrated = new Database(join(root, 'index.sqlite'), { readonly: true });
      assert.equal(migrated.pragma('user_version', { simple: true }), 3);
      migrated.close();
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });
});
