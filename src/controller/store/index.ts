import { randomBytes } from 'node:crypto';
import { InvalidInputError } from '../../shared/errors.js';
import { EtcdStore } from './etcd.js';
import { parseEtcdSpec } from './etcd-spec.js';
import { MemoryStore } from './memory.js';
import { SqliteStore } from './sqlite.js';
import type { StateStore } from './types.js';

export type * from './types.js';
export type { LocalStoreOptions } from './local.js';
export { EtcdStore, type EtcdStoreOptions } from './etcd.js';
export { parseEtcdSpec } from './etcd-spec.js';
export { MemoryStore } from './memory.js';
export { SqliteStore } from './sqlite.js';

export interface StoreOptions {
  /** How many revisions of change history watches can replay. */
  historyRevisions?: number;
}

/**
 * Opens the store a spec names: `memory:`, `sqlite:/path/to/file.db`, or
 * `etcd://host:port[,host:port...][/namespace]` (fails at once when no member answers).
 */
export async function openStore(spec: string, options: StoreOptions = {}): Promise<StateStore> {
  if (spec === 'memory:') return new MemoryStore(options);
  if (spec.startsWith('sqlite:') && spec.length > 'sqlite:'.length) return SqliteStore.open(spec.slice('sqlite:'.length), options);
  if (spec.startsWith('etcd:')) {
    const { endpoints, namespace } = parseEtcdSpec(spec);
    return EtcdStore.open(endpoints, { ...options, namespace });
  }
  throw new InvalidInputError(`unknown state store "${spec}": use "memory:", "sqlite:/path/to/file.db" or "etcd://host:2379[,host:2379...]"`, { spec });
}

const IDENTITY_KEY = '/identity';

/**
 * The store's identity: a random id made once, the first time a controller opens the store, and
 * kept in it. It names what this controller owns outside the store (its gateway routes and their
 * request logs), so that a controller on another store, or on a fresh one, never takes those for
 * its own leftovers.
 */
export async function storeIdentity(store: StateStore): Promise<string> {
  for (;;) {
    const existing = await store.get<{ id: string }>(IDENTITY_KEY);
    if (existing) return existing.value.id;
    const id = `store-${randomBytes(8).toString('hex')}`;
    const res = await store.txn({ compare: [{ key: IDENTITY_KEY, modRevision: 0 }], ops: [{ type: 'put', key: IDENTITY_KEY, value: { id, createdAt: new Date().toISOString() } }] });
    if (res.succeeded) return id;
  }
}
