import Database from 'better-sqlite3';
import { openExclusiveSqlite } from '../../shared/durable.js';
import { StoreFailedError } from '../../shared/errors.js';
import { LocalStore, type Commit, type LeaseRecord, type LocalBackend, type LocalStoreOptions, type StoredEvent, type StoredKv } from './local.js';

/**
 * A StateStore in one SQLite file, for a single controller: keys, the revision counter, the event
 * history watches replay from, and leases all persist, so a restarted controller continues where
 * it stopped. Leases get a fresh TTL when the file is opened (see LocalStore's constructor for why).
 *
 * The file is opened in exclusive locking mode: LocalStore keeps the revision and the leases in
 * memory, so a second controller writing the same file would corrupt both views. A second open
 * fails at once instead.
 */
export class SqliteStore extends LocalStore {
  private constructor(backend: SqliteBackend, options: LocalStoreOptions) {
    super(backend, options);
  }

  static open(path: string, options: LocalStoreOptions = {}): SqliteStore {
    const db = openExclusiveSqlite(path, 'sqlite store (another controller?)', migrate);
    try {
      return new SqliteStore(new SqliteBackend(db, path), options);
    } catch (err) {
      db.close();
      throw err;
    }
  }
}

const SCHEMA_VERSION = 1;

function migrate(db: Database.Database): void {
  const version = db.pragma('user_version', { simple: true }) as number;
  if (version > SCHEMA_VERSION) {
    throw new Error(`the file has schema version ${version}, newer than this chipmunk understands (${SCHEMA_VERSION}); upgrade chipmunk`);
  }
  // IMMEDIATE takes the write lock now, which exclusive locking mode then keeps until close.
  db.transaction(() => {
    db.exec(`
      CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
      INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0), ('compacted_revision', 0);
      CREATE TABLE IF NOT EXISTS kv (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        create_revision INTEGER NOT NULL,
        mod_revision INTEGER NOT NULL,
        version INTEGER NOT NULL,
        lease TEXT
      ) WITHOUT ROWID;
      CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease) WHERE lease IS NOT NULL;
      -- body is the StoredEvent as JSON: events are only ever read back whole, in order.
      CREATE TABLE IF NOT EXISTS events (
        revision INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (revision, seq)
      ) WITHOUT ROWID;
      CREATE TABLE IF NOT EXISTS leases (id TEXT PRIMARY KEY, ttl_ms INTEGER NOT NULL, deadline_ms INTEGER NOT NULL) WITHOUT ROWID;
    `);
    db.pragma(`user_version = ${SCHEMA_VERSION}`);
  }).immediate();
}

interface KvRow {
  key: string;
  value: string;
  create_revision: number;
  mod_revision: number;
  version: number;
  lease: string | null;
}

class SqliteBackend implements LocalBackend {
  private readonly statements;

  constructor(
    private readonly db: Database.Database,
    private readonly path: string,
  ) {
    const kvColumns = 'key, value, create_revision, mod_revision, version, lease';
    this.statements = {
      meta: db.prepare<[string], { value: number }>('SELECT value FROM meta WHERE name = ?'),
      setMeta: db.prepare<[number, string]>('UPDATE meta SET value = ? WHERE name = ?'),
      leases: db.prepare<[], { id: string; ttl_ms: number; deadline_ms: number }>('SELECT id, ttl_ms, deadline_ms FROM leases'),
      saveLease: db.prepare<[string, number, number]>(
        'INSERT INTO leases (id, ttl_ms, deadline_ms) VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE SET ttl_ms = excluded.ttl_ms, deadline_ms = excluded.deadline_ms',
      ),
      removeLease: db.prepare<[string]>('DELETE FROM leases WHERE id = ?'),
      get: db.prepare<[string], KvRow>(`SELECT ${kvColumns} FROM kv WHERE key = ?`),
      // Keys sharing a prefix are contiguous in key order, so a prefix scan starts at the prefix and stops at the first key without it.
      scanFrom: db.prepare<[string], KvRow>(`SELECT ${kvColumns} FROM kv WHERE key >= ? ORDER BY key`),
      keysWithLease: db.prepare<[string], { key: string }>('SELECT key FROM kv WHERE lease = ?'),
      putKv: db.prepare<[string, string, number, number, number, string | null]>(
        `INSERT INTO kv (${kvColumns}) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET
           value = excluded.value, create_revision = excluded.create_revision, mod_revision = excluded.mod_revision,
           version = excluded.version, lease = excluded.lease`,
      ),
      deleteKv: db.prepare<[string]>('DELETE FROM kv WHERE key = ?'),
      eventsFrom: db.prepare<[number], { body: string }>('SELECT body FROM events WHERE revision >= ? ORDER BY revision, seq'),
      addEvent: db.prepare<[number, number, string]>('INSERT INTO events (revision, seq, body) VALUES (?, ?, ?)'),
      compact: db.prepare<[number]>('DELETE FROM events WHERE revision <= ?'),
    };
  }

  load(): { revision: number; compactedRevision: number; leases: LeaseRecord[] } {
    return this.guard('loading', () => ({
      revision: this.statements.meta.get('revision')!.value,
      compactedRevision: this.statements.meta.get('compacted_revision')!.value,
      leases: this.statements.leases.all().map((row) => ({ id: row.id, ttlMs: row.ttl_ms, deadlineMs: row.deadline_ms })),
    }));
  }

  get(key: string): StoredKv | undefined {
    return this.guard(`reading ${key}`, () => {
      const row = this.statements.get.get(key);
      return row && fromRow(row);
    });
  }

  list(prefix: string): StoredKv[] {
    return this.guard(`listing ${prefix}`, () => {
      const kvs: StoredKv[] = [];
      for (const row of this.statements.scanFrom.iterate(prefix)) {
        if (!row.key.startsWith(prefix)) break;
        kvs.push(fromRow(row));
      }
      return kvs;
    });
  }

  keysWithLease(leaseId: string): string[] {
    return this.guard(`reading keys of lease ${leaseId}`, () => this.statements.keysWithLease.all(leaseId).map((row) => row.key));
  }

  eventsFrom(revision: number): StoredEvent[] {
    return this.guard(`reading history from revision ${revision}`, () =>
      this.statements.eventsFrom.all(revision).map((row) => JSON.parse(row.body) as StoredEvent),
    );
  }

  commit(change: Commit): void {
    const s = this.statements;
    this.guard(`committing revision ${change.revision}`, () =>
      this.db.transaction(() => {
        for (const kv of change.puts ?? []) s.putKv.run(kv.key, kv.valueJson, kv.createRevision, kv.modRevision, kv.version, kv.lease ?? null);
        for (const key of change.deletes ?? []) s.deleteKv.run(key);
        (change.events ?? []).forEach((ev, seq) => s.addEvent.run(ev.revision, seq, JSON.stringify(ev)));
        s.compact.run(change.compactedRevision);
        s.setMeta.run(change.revision, 'revision');
        s.setMeta.run(change.compactedRevision, 'compacted_revision');
        for (const lease of change.saveLeases ?? []) s.saveLease.run(lease.id, lease.ttlMs, lease.deadlineMs);
        for (const id of change.removeLeases ?? []) s.removeLease.run(id);
      })(),
    );
  }

  close(): void {
    this.guard('closing', () => this.db.close());
  }

  private guard<T>(what: string, run: () => T): T {
    try {
      return run();
    } catch (err) {
      throw new StoreFailedError(`sqlite store ${this.path}: ${what} failed: ${(err as Error).message}`, err);
    }
  }
}

function fromRow(row: KvRow): StoredKv {
  return {
    key: row.key,
    valueJson: row.value,
    createRevision: row.create_revision,
    modRevision: row.mod_revision,
    version: row.version,
    ...(row.lease !== null ? { lease: row.lease } : {}),
  };
}
