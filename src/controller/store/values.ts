import { InvalidInputError } from '../../shared/errors.js';

/** Checks every store shares, so each store refuses the same bad input with the same error. */

export function assertKey(key: string): void {
  if (typeof key !== 'string' || key.length === 0) throw new InvalidInputError('store keys must be non-empty strings');
}

/** Values are kept as JSON text: every read then hands out a fresh copy. */
export function encodeValue(key: string, value: unknown): string {
  let json: string | undefined;
  try {
    json = JSON.stringify(value);
  } catch (err) {
    throw new InvalidInputError(`value for store key ${key} is not JSON-serialisable: ${(err as Error).message}`);
  }
  if (json === undefined) throw new InvalidInputError(`value for store key ${key} is not JSON-serialisable (got ${typeof value})`);
  return json;
}

/** A txn may name each key in at most one op (etcd refuses duplicates too, less clearly). */
export function assertDistinctTxnKeys(keys: string[]): void {
  const seen = new Set<string>();
  for (const key of keys) {
    assertKey(key);
    if (seen.has(key)) throw new InvalidInputError(`txn names key ${key} in more than one op; give each key at most one op`);
    seen.add(key);
  }
}

export function assertWatchFrom(from: number | undefined): void {
  if (from !== undefined && (!Number.isInteger(from) || from < 1)) {
    throw new InvalidInputError(`watch fromRevision must be an integer >= 1, got ${from}`);
  }
}

export function compactedHistoryMessage(prefix: string, from: number, compactedThrough: number): string {
  return (
    `cannot watch ${prefix} from revision ${from}: history up to revision ${compactedThrough} has been compacted; ` +
    `list ${prefix} again and watch from the revision after the list`
  );
}

export function leaseNotFoundMessage(leaseId: string): string {
  return `lease ${leaseId} not found: it expired or was revoked; grant a new lease and put its keys again`;
}

export function assertHistoryRevisions(historyRevisions: number): void {
  if (!Number.isInteger(historyRevisions) || historyRevisions < 1) {
    throw new InvalidInputError(`historyRevisions must be a positive integer, got ${historyRevisions}`);
  }
}

export function assertLeaseTtl(ttlMs: number): void {
  if (!Number.isFinite(ttlMs) || ttlMs <= 0) throw new InvalidInputError(`lease TTL must be a positive number of milliseconds, got ${ttlMs}`);
}
