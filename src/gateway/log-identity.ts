/**
 * A request log's identity (docs/gateway.md, "Log identity"): a random id made when the log is
 * created, kept in `<dir>/log-id`. Positions are {logId, seq}; one of another log is refused.
 */
import { randomBytes } from 'node:crypto';
import { open, readFile, rename } from 'node:fs/promises';
import { join } from 'node:path';
import { syncDirectory } from '../shared/durable.js';
import { LogMismatchError, StoreFailedError } from '../shared/errors.js';
import type { LogPosition } from './protocol.js';

const ID_FILE = 'log-id';
const LOG_ID = /^[0-9a-f]{16}$/;

/** The log's id from its id file, made (and synced) if the log has none yet. */
export async function logIdOf(dir: string): Promise<string> {
  const path = join(dir, ID_FILE);
  try {
    const id = (await readFile(path, 'utf8')).trim();
    if (!LOG_ID.test(id)) throw new StoreFailedError(`the request log id file ${path} is damaged (${JSON.stringify(id.slice(0, 40))}): move the route's log away to start a new one`);
    return id;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  const id = randomBytes(8).toString('hex');
  // Written aside and renamed: a crash leaves no id file or a whole one, never an empty one.
  const partial = `${path}.partial`;
  const file = await open(partial, 'w', 0o600);
  try {
    await file.writeFile(`${id}\n`);
    await file.sync();
  } finally {
    await file.close();
  }
  await rename(partial, path);
  await syncDirectory(dir);
  return id;
}

/** Refuses a position of another log than the route's current one. */
export function requireSameLog(name: string, logId: string, position: LogPosition, action: 'replay' | 'trim'): void {
  if (position.logId === logId) return;
  throw new LogMismatchError(
    `position ${position.seq} of request log ${position.logId} is not in container '${name}''s current log (${logId}): the route was unlogged or removed since, so there is nothing to ${action} from it (restore without replay, or take a new checkpoint)`,
    { name, logId, positionLogId: position.logId, seq: position.seq },
  );
}
