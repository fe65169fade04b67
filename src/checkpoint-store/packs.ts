/**
 * The checkpoint store's pack files: append-only files of chunks, named by a random id, in one
 * directory. This module owns the files (create, open for reading, copy, delete); which chunk
 * lives where is the SQLite index's business (store.ts).
 */
import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { open, readdir, unlink, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { syncDirectory } from '../shared/durable.js';
import { sha256 } from './manifest.js';
import type { ChunkRow } from './schema.js';

export class PackFiles {
  /** Read handles, opened once per pack and shared by every reader. */
  private readonly readers = new Map<string, Promise<FileHandle>>();

  constructor(
    readonly dir: string,
    private readonly log: Logger | undefined,
  ) {}

  /** A new, empty pack for writing. */
  async create(): Promise<{ id: string; file: FileHandle }> {
    const id = randomBytes(16).toString('hex');
    return { id, file: await open(this.path(id), fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_WRONLY) };
  }

  /** Makes new pack files' directory entries durable. */
  syncDirectory(): Promise<void> {
    return syncDirectory(this.dir);
  }

  reader(id: string): Promise<FileHandle> {
    let file = this.readers.get(id);
    if (!file) {
      file = open(this.path(id), 'r');
      this.readers.set(id, file);
      file.catch(() => this.readers.delete(id));
    }
    return file;
  }

  /** Deletes a pack's file (gone already is fine). */
  async remove(id: string): Promise<void> {
    await this.closeReader(id);
    await unlink(this.path(id)).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'ENOENT') throw err;
    });
  }

  async closeAll(): Promise<void> {
    for (const file of this.readers.values()) await (await file.catch(() => undefined))?.close();
    this.readers.clear();
  }

  /** Deletes pack files the index does not name (uploads no commit reached); logs packs it names that are missing. */
  async removeOrphans(known: Set<string>): Promise<void> {
    const missing = new Set(known);
    for (const name of await readdir(this.dir)) {
      const id = name.replace(/\.pack$/, '');
      if (missing.delete(id)) continue;
      this.log?.info({ pack: name }, 'deleting a checkpoint pack no commit reached (an upload that was interrupted)');
      await unlink(join(this.dir, name));
    }
    for (const id of missing) this.log?.error({ pack: id }, 'checkpoint pack file is missing: checkpoints using its chunks will fail to read and be marked corrupt');
  }

  /**
   * Copies the chunks `rows` (all in pack `oldId`, by offset) to a new durable pack, each
   * verified. Undefined (no new pack left behind) if one of them is damaged.
   */
  async copyVerified(oldId: string, rows: ChunkRow[]): Promise<{ id: string; bytes: number; moved: { hash: Buffer; offset: number }[] } | undefined> {
    const target = await this.create();
    const moved: { hash: Buffer; offset: number }[] = [];
    let bytes = 0;
    try {
      const source = await this.reader(oldId);
      for (const row of rows) {
        const data = Buffer.alloc(row.length);
        await source.read(data, 0, row.length, row.offset);
        if (!sha256(data).equals(row.hash)) {
          this.log?.error({ pack: oldId, chunk: row.hash.toString('hex') }, 'damaged chunk found while compacting a pack; the pack is kept as it is');
          await target.file.close();
          await unlink(this.path(target.id));
          return undefined;
        }
        await target.file.write(data, 0, data.length, bytes);
        moved.push({ hash: row.hash, offset: bytes });
        bytes += data.length;
      }
      await target.file.sync();
    } finally {
      await target.file.close().catch(() => {});
    }
    await this.syncDirectory();
    return { id: target.id, bytes, moved };
  }

  /** Flips one byte at `offset` of a pack, as bit rot would (fault injection only). */
  async damage(id: string, offset: number): Promise<void> {
    const file = await open(this.path(id), 'r+');
    try {
      const byte = Buffer.alloc(1);
      await file.read(byte, 0, 1, offset);
      byte[0] = byte[0]! ^ 0xff;
      await file.write(byte, 0, 1, offset);
      await file.sync();
    } finally {
      await file.close();
    }
  }

  private async closeReader(id: string): Promise<void> {
    const file = this.readers.get(id);
    this.readers.delete(id);
    if (file) await (await file.catch(() => undefined))?.close();
  }

  private path(id: string): string {
    return join(this.dir, `${id}.pack`);
  }
}
