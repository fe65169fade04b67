import { InvalidInputError } from '../../shared/errors.js';
import type { LocalStoreOptions } from './local.js';
import { MemoryStore } from './memory.js';
import { SqliteStore } from './sqlite.js';
import type { StateStore } from './types.js';

export type * from './types.js';
export type { LocalStoreOptions } from './local.js';
export { MemoryStore } from './memory.js';
export { SqliteStore } from './sqlite.js';

/** Opens the store a spec names: `memory:` or `sqlite:/path/to/file.db`. */
export async function openStore(spec: string, options: LocalStoreOptions = {}): Promise<StateStore> {
  if (spec === 'memory:') return new MemoryStore(options);
  if (spec.startsWith('sqlite:') && spec.length > 'sqlite:'.length) return SqliteStore.open(spec.slice('sqlite:'.length), options);
  throw new InvalidInputError(`unknown state store "${spec}": use "memory:" or "sqlite:/path/to/file.db"`, { spec });
}
