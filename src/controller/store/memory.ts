import { LocalStore, type Commit, type LeaseRecord, type LocalBackend, type LocalStoreOptions, type StoredEvent, type StoredKv } from './local.js';

/** A StateStore that keeps everything in memory and loses it on close: for tests and throw-away controllers. */
export class MemoryStore extends LocalStore {
  constructor(options: LocalStoreOptions = {}) {
    super(new MemoryBackend(), options);
  }
}

class MemoryBackend implements LocalBackend {
  private readonly kvs = new Map<string, StoredKv>();
  /** In revision order: commits append. */
  private events: StoredEvent[] = [];

  load(): { revision: number; compactedRevision: number; leases: LeaseRecord[] } {
    return { revision: 0, compactedRevision: 0, leases: [] };
  }

  get(key: string): StoredKv | undefined {
    return this.kvs.get(key);
  }

  list(prefix: string): StoredKv[] {
    return [...this.kvs.values()].filter((kv) => kv.key.startsWith(prefix)).sort((a, b) => compareBytes(a.key, b.key));
  }

  keysWithLease(leaseId: string): string[] {
    return [...this.kvs.values()].filter((kv) => kv.lease === leaseId).map((kv) => kv.key);
  }

  eventsFrom(revision: number): StoredEvent[] {
    return this.events.filter((ev) => ev.revision >= revision);
  }

  // Leases need no copy here: LocalStore keeps the live ones itself, and memory has nothing to reload them from.
  commit(change: Commit): void {
    for (const kv of change.puts ?? []) this.kvs.set(kv.key, kv);
    for (const key of change.deletes ?? []) this.kvs.delete(key);
    this.events.push(...(change.events ?? []));
    if (this.events.length > 0 && this.events[0].revision <= change.compactedRevision) {
      this.events = this.events.filter((ev) => ev.revision > change.compactedRevision);
    }
  }

  close(): void {
    this.kvs.clear();
    this.events = [];
  }
}

/** etcd orders keys by their bytes; for UTF-8 that is code point order, which JS's default UTF-16 order is not. */
function compareBytes(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a), Buffer.from(b));
}
