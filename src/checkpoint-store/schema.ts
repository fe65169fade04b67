/**
 * The checkpoint store's SQLite index: its schema (and migrations from older versions), the
 * rows the store reads, and how a row is shown to clients.
 */
import type Database from 'better-sqlite3';
import { InvalidInputError } from '../shared/errors.js';
import type { CheckpointSummary } from './protocol.js';
import type { VolumeMount } from './tree.js';

export interface CheckpointRow {
  seq: number;
  container: string;
  id: string;
  time: number;
  logical_bytes: number;
  new_bytes: number;
  log_position: number | null;
  /** The request log log_position is in; null on rows from before schema version 2. */
  log_id: string | null;
  metadata: string;
  corrupt: number;
}

export interface ChunkRow {
  hash: Buffer;
  pack: string;
  offset: number;
  length: number;
}


/** 2: checkpoints.log_id, the request log a log_position is in. */
export const SCHEMA_VERSION = 2;

export function summaryOf(row: CheckpointRow): CheckpointSummary {
  return {
    id: row.id,
    time: row.time,
    logicalBytes: row.logical_bytes,
    newBytes: row.new_bytes,
    logPosition: row.log_position === null ? null : { logId: row.log_id, seq: row.log_position },
    ...(row.corrupt ? { corrupt: true } : {}),
  };
}

/** metadata.volumes: where each volumes/NAME/ of the files part is mounted in the container. */
export function volumesOf(metadata: Record<string, unknown>): VolumeMount[] {
  const volumes = metadata.volumes;
  if (volumes === undefined) return [];
  const valid =
    Array.isArray(volumes) &&
    volumes.every((v) => v && typeof v === 'object' && typeof (v as VolumeMount).name === 'string' && typeof (v as VolumeMount).path === 'string' && (v as VolumeMount).path.startsWith('/'));
  if (!valid) throw new InvalidInputError('metadata.volumes must be a list of {name, path} with absolute paths', { volumes });
  return volumes as VolumeMount[];
}


export function migrate(db: Database.Database): void {
  const version = db.pragma('user_version', { simple: true }) as number;
  if (version > SCHEMA_VERSION) {
    throw new Error(`the index has schema version ${version}, newer than this chipmunk understands (${SCHEMA_VERSION}); upgrade chipmunk`);
  }
  db.transaction(() => {
    db.exec(`
      CREATE TABLE IF NOT EXISTS packs (id TEXT PRIMARY KEY, bytes INTEGER NOT NULL) WITHOUT ROWID;
      CREATE TABLE IF NOT EXISTS chunks (
        hash BLOB PRIMARY KEY,
        pack TEXT NOT NULL,
        offset INTEGER NOT NULL,
        length INTEGER NOT NULL
      ) WITHOUT ROWID;
      CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks (pack);
      -- seq orders a container's checkpoints (newest = highest); id is what clients name.
      CREATE TABLE IF NOT EXISTS checkpoints (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        container TEXT NOT NULL,
        id TEXT NOT NULL UNIQUE,
        time INTEGER NOT NULL,
        logical_bytes INTEGER NOT NULL,
        new_bytes INTEGER NOT NULL,
        log_position INTEGER,
        log_id TEXT,
        metadata TEXT NOT NULL,
        corrupt INTEGER NOT NULL DEFAULT 0
      );
      CREATE INDEX IF NOT EXISTS checkpoints_by_container ON checkpoints (container, seq);
      -- manifest: the binary part manifest of src/checkpoint-store/manifest.ts.
      CREATE TABLE IF NOT EXISTS parts (
        checkpoint INTEGER NOT NULL,
        name TEXT NOT NULL,
        logical_bytes INTEGER NOT NULL,
        entries INTEGER NOT NULL,
        manifest BLOB NOT NULL,
        PRIMARY KEY (checkpoint, name)
      ) WITHOUT ROWID;
    `);
    // Version 1 indexes lack log_id: their positions keep a null log id (matching no log).
    const columns = db.prepare<[], { name: string }>("SELECT name FROM pragma_table_info('checkpoints')").all();
    if (!columns.some((c) => c.name === 'log_id')) db.exec('ALTER TABLE checkpoints ADD COLUMN log_id TEXT');
    db.pragma(`user_version = ${SCHEMA_VERSION}`);
  }).immediate();
}
