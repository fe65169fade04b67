/**
 * Durable files, the way the controller's state store, the checkpoint store and the gateway's
 * request log all need them: an acknowledged write survives power loss, not only a crash.
 */
import { open, rename } from 'node:fs/promises';
import { dirname } from 'node:path';
import Database from 'better-sqlite3';
import { StoreFailedError } from './errors.js';

/**
 * Opens a SQLite file for one process only (exclusive locking, no busy wait: a locked file means
 * another process owns it, and waiting would not help), WAL, synchronous=FULL (the WAL is synced
 * on every commit), and runs `migrate` on it. `what` names the file in errors ("sqlite store").
 */
export function openExclusiveSqlite(path: string, what: string, migrate: (db: Database.Database) => void): Database.Database {
  let db: Database.Database | undefined;
  try {
    db = new Database(path, { timeout: 0 });
    db.pragma('locking_mode = EXCLUSIVE');
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = FULL');
    migrate(db);
    return db;
  } catch (err) {
    db?.close();
    const locked = String((err as { code?: unknown }).code).startsWith('SQLITE_BUSY');
    throw new StoreFailedError(
      locked ? `${what} ${path} is in use by another process; stop it or use another file` : `cannot open ${what} ${path}: ${(err as Error).message}`,
      err,
    );
  }
}

/** Makes file creations and deletions in `dir` durable. */
export async function syncDirectory(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * Replaces `path` with `data` so that a crash or power loss leaves the old content or the new,
 * never a mix: written to a temporary sibling and synced, renamed over `path`, then the directory
 * synced so the rename itself is durable.
 */
export async function writeFileDurably(path: string, data: string): Promise<void> {
  const temp = `${path}.tmp`;
  const handle = await open(temp, 'w', 0o600);
  try {
    await handle.writeFile(data);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await rename(temp, path);
  await syncDirectory(dirname(path));
}
