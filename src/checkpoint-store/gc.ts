/**
 * Garbage collection of the checkpoint store: deletes chunks no checkpoint or open upload
 * references, packs left without live chunks, and rewrites packs less than half live. It waits
 * for reads in progress (they hold pack files open): a pack retired meanwhile is deleted, and a
 * collection asked for meanwhile runs, when the last read ends.
 */
import type Database from 'better-sqlite3';
import type { Logger } from 'pino';
import { chunkHashes, decodeManifest, type PartManifest } from './manifest.js';
import type { PackFiles } from './packs.js';
import type { ChunkRow } from './schema.js';

export interface GcResult {
  deletedPacks: number;
  rewrittenPacks: number;
  /** Pack bytes on disk before minus after. */
  freedBytes: number;
}

export class PackCollector {
  /** Reads in progress: collection waits for them, and packs retired meanwhile are deleted after them. */
  private readers = 0;
  /** Packs no index row names any more, whose files a reader in progress may still read. */
  private readonly retiredPacks: string[] = [];
  private gcWanted = false;
  private gcRunning = false;

  constructor(
    private readonly db: Database.Database,
    private readonly packs: PackFiles,
    /** The manifests of uploads in progress: their chunks are live too. */
    private readonly uploading: () => Iterable<PartManifest>,
    private readonly log: Logger | undefined,
  ) {}

  /**
   * Deletes chunks no checkpoint or open upload references, packs left without live chunks,
   * and rewrites packs less than half live. Waits for reads in progress (runs when the last ends).
   */
  async collect(): Promise<GcResult> {
    const result: GcResult = { deletedPacks: 0, rewrittenPacks: 0, freedBytes: 0 };
    if (this.readers > 0 || this.gcRunning) {
      this.gcWanted = true;
      return result;
    }
    this.gcRunning = true;
    this.gcWanted = false;
    try {
      // One synchronous step from the live set to the deleted rows: no upload can begin in
      // between and be told a chunk is present that this then deletes.
      const packs = this.db.transaction(() => this.dropDeadChunks())();
      for (const pack of packs) {
        if (pack.liveBytes === 0) {
          await this.deletePack(pack.id);
          result.deletedPacks++;
          result.freedBytes += pack.bytes;
        } else if (pack.liveBytes < pack.bytes / 2 && (await this.rewritePack(pack.id))) {
          result.rewrittenPacks++;
          result.freedBytes += pack.bytes - pack.liveBytes;
        }
      }
    } finally {
      this.gcRunning = false;
    }
    if (result.deletedPacks + result.rewrittenPacks > 0) this.log?.info({ ...result }, 'checkpoint store garbage collected');
    // Asked for again while it ran (another commit): those changes are not collected yet.
    if (this.gcWanted && this.readers === 0) {
      const again = await this.collect();
      result.deletedPacks += again.deletedPacks;
      result.rewrittenPacks += again.rewrittenPacks;
      result.freedBytes += again.freedBytes;
    }
    return result;
  }


  /** Deletes index rows of dead chunks; answers each pack's size and live bytes. */
  private dropDeadChunks(): { id: string; bytes: number; liveBytes: number }[] {
    const live = new Set<string>();
    for (const manifest of this.db.prepare<[], Buffer>('SELECT manifest FROM parts').pluck().iterate()) {
      for (const hash of chunkHashes(decodeManifest(manifest))) live.add(hash.toString('hex'));
    }
    for (const manifest of this.uploading()) for (const hash of chunkHashes(manifest)) live.add(hash.toString('hex'));
    const liveBytes = new Map<string, number>();
    const dead: Buffer[] = [];
    for (const row of this.db.prepare<[], ChunkRow>('SELECT hash, pack, offset, length FROM chunks').iterate()) {
      if (live.has(row.hash.toString('hex'))) liveBytes.set(row.pack, (liveBytes.get(row.pack) ?? 0) + row.length);
      else dead.push(row.hash);
    }
    const remove = this.db.prepare('DELETE FROM chunks WHERE hash = ?');
    for (const hash of dead) remove.run(hash);
    return this.db
      .prepare<[], { id: string; bytes: number }>('SELECT id, bytes FROM packs')
      .all()
      .map((pack) => ({ ...pack, liveBytes: liveBytes.get(pack.id) ?? 0 }));
  }

  async deletePack(id: string): Promise<void> {
    this.db.prepare('DELETE FROM packs WHERE id = ?').run(id);
    if (this.readers > 0) this.retiredPacks.push(id);
    else await this.packs.remove(id);
  }

  /** Copies a pack's live chunks to a new pack. False (pack kept) if one of them is damaged. */
  private async rewritePack(oldId: string): Promise<boolean> {
    const rows = this.db.prepare<[string], ChunkRow>('SELECT hash, pack, offset, length FROM chunks WHERE pack = ? ORDER BY offset').all(oldId);
    const copy = await this.packs.copyVerified(oldId, rows);
    if (!copy) return false;
    this.db.transaction(() => {
      this.db.prepare('INSERT INTO packs (id, bytes) VALUES (?, ?)').run(copy.id, copy.bytes);
      const update = this.db.prepare('UPDATE chunks SET pack = ?, offset = ? WHERE hash = ? AND pack = ?');
      for (const chunk of copy.moved) update.run(copy.id, chunk.offset, chunk.hash, oldId);
    })();
    await this.deletePack(oldId);
    return true;
  }

  /** Runs a read with GC held off, and the GC it held off after it. */
  async *reading(source: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
    this.readers++;
    try {
      yield* source;
    } finally {
      this.readers--;
      if (this.readers === 0) void this.afterReads();
    }
  }

  private async afterReads(): Promise<void> {
    try {
      for (let id = this.retiredPacks.pop(); id !== undefined; id = this.retiredPacks.pop()) await this.packs.remove(id);
      if (this.gcWanted) await this.collect();
    } catch (err) {
      this.log?.error({ err }, 'checkpoint store garbage collection failed');
    }
  }

  /** Deletes the packs retired while reads ran. */
  async close(): Promise<void> {
    for (const id of this.retiredPacks.splice(0)) await this.packs.remove(id);
  }
}
