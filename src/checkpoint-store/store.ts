/**
 * The checkpoint store: content-addressed 4 KiB chunks in append-only pack files (packs.ts),
 * indexed in SQLite (schema.ts) with the checkpoints that reference them (format and commit
 * protocol: docs/design.md, "Checkpoint store").
 *
 * Commit protocol: an upload (upload-session.ts) appends the chunks the store lacks to a pack of
 * its own; commit fsyncs that pack and the packs directory, then one SQLite transaction (WAL,
 * synchronous=FULL) adds the pack's index rows and the checkpoint. A crash before that
 * transaction leaves a pack no row names, which open() deletes; the previous checkpoints never
 * depended on it.
 *
 * Every chunk read is checked against its sha256. A mismatch throws ChunkCorruptError and marks
 * the checkpoint being read corrupt, so listings show it and callers pick an older one.
 *
 * A checkpoint kept on several stores (replicas) has the same id on each: the uploader chooses
 * it, and copyCheckpoint (replicate.ts) copies one store's checkpoint to another with it.
 */
import { randomBytes } from 'node:crypto';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import type Database from 'better-sqlite3';
import type { Logger } from 'pino';
import { ConflictError, NotFoundError, StoreFailedError } from '../shared/errors.js';
import { openExclusiveSqlite } from '../shared/durable.js';
import { PackCollector, type GcResult } from './gc.js';
import { chunkHashes } from './manifest.js';
import { PackFiles } from './packs.js';
import type { CheckpointDetail, CheckpointDiff, CheckpointInfo, CheckpointSummary, CreateUploadRequest, CreateUploadResponse, DirectoryListing, StoreUsage, UploadChunksResponse } from './protocol.js';
import { CheckpointReads, type CheckpointFile } from './reads.js';
import { migrate, summaryOf, volumesOf, type CheckpointRow } from './schema.js';
import { decodeParts, missingChunks, receiveFrames, type Upload } from './upload-session.js';

export type { CheckpointFile } from './reads.js';
export type { GcResult } from './gc.js';

export const DEFAULT_KEEP = 5;
export const DEFAULT_UPLOAD_TIMEOUT_MS = 10 * 60_000;

export interface CheckpointStoreOptions {
  /** Directory holding index.sqlite and packs/; created if missing. */
  root: string;
  /** Checkpoints kept per container (newest first); older ones are dropped after each commit. */
  keep?: number;
  /** An upload with no request for this long is dropped with the chunks it received. */
  uploadTimeoutMs?: number;
  logger?: Logger;
}

export interface NewUpload {
  container: string;
  parts: { name: string; manifest: Buffer }[];
  time: number;
  logPosition?: CheckpointSummary['logPosition'];
  metadata: Record<string, unknown>;
  /** The checkpoint id to commit under (the same checkpoint on several replicas); a new one by default. */
  id?: string;
}

/** Newest first: by the time a checkpoint was taken (a copy from another replica arrives later than newer ones). */
const NEWEST_FIRST = 'ORDER BY time DESC, seq DESC';

export class CheckpointStore {
  private readonly uploads = new Map<string, Upload>();
  private readonly collector: PackCollector;
  private readonly reads: CheckpointReads;

  private constructor(
    private readonly db: Database.Database,
    private readonly packs: PackFiles,
    private readonly keep: number,
    private readonly uploadTimeoutMs: number,
    private readonly log: Logger | undefined,
  ) {
    this.collector = new PackCollector(db, packs, () => [...this.uploads.values()].flatMap((upload) => upload.parts.map((part) => part.decoded)), log);
    this.reads = new CheckpointReads(db, packs, this.collector, log);
  }

  /** Opens (creating if needed) the store at `root`, deletes packs no commit reached, and collects garbage. */
  static async open(opts: CheckpointStoreOptions): Promise<CheckpointStore> {
    const packsDir = join(opts.root, 'packs');
    await mkdir(packsDir, { recursive: true });
    const path = join(opts.root, 'index.sqlite');
    // One process only: the store keeps uploads in memory, so a second process on the same root
    // would delete their packs as orphans. It fails at once instead.
    const db = openExclusiveSqlite(path, 'checkpoint store', migrate);
    const packs = new PackFiles(packsDir, opts.logger);
    const store = new CheckpointStore(db, packs, opts.keep ?? DEFAULT_KEEP, opts.uploadTimeoutMs ?? DEFAULT_UPLOAD_TIMEOUT_MS, opts.logger);
    try {
      await packs.removeOrphans(new Set(db.prepare<[], string>('SELECT id FROM packs').pluck().all()));
      await store.gc();
    } catch (err) {
      db.close();
      throw new StoreFailedError(`cannot recover checkpoint store ${opts.root}: ${(err as Error).message}`, err);
    }
    return store;
  }

  async close(): Promise<void> {
    for (const upload of [...this.uploads.values()]) await this.dropUpload(upload);
    await this.collector.close();
    await this.packs.closeAll();
    this.db.close();
  }

  // ---------------------------------------------------------------- uploads

  /** Starts an upload: decodes the manifests and answers which chunks the store lacks. */
  createUpload(req: NewUpload): CreateUploadResponse {
    const parts = decodeParts(req.parts);
    // Checked now: a bad volumes list would otherwise only show when the files are browsed.
    volumesOf(req.metadata);
    if (req.id !== undefined) {
      const holder = this.db.prepare<[string], string>('SELECT container FROM checkpoints WHERE id = ?').pluck().get(req.id);
      if (holder !== undefined) throw new ConflictError(`this store already has checkpoint ${req.id} (of container ${holder}): a checkpoint is stored once per replica`, { checkpoint: req.id, container: holder });
    }
    const has = this.db.prepare<[Buffer], number>('SELECT 1 FROM chunks WHERE hash = ?').pluck();
    const missing = missingChunks(parts, (hash) => has.get(hash) !== undefined && !this.reads.damaged.has(hash.toString('hex')));
    const upload: Upload = {
      id: randomBytes(16).toString('hex'),
      ...(req.id !== undefined ? { checkpointId: req.id } : {}),
      container: req.container,
      time: req.time,
      logPosition: req.logPosition ?? null,
      metadata: req.metadata,
      parts,
      wanted: missing.wanted,
      written: new Map(),
      busy: false,
    };
    this.uploads.set(upload.id, upload);
    this.armTimer(upload);
    return { uploadId: upload.id, missing: missing.bitmap.toString('base64'), missingChunks: missing.wanted.size, missingBytes: missing.bytes };
  }

  /** Stores chunk frames (upload-session.ts), each checked against its hash before it is kept. */
  async receiveChunks(uploadId: string, body: AsyncIterable<Buffer>): Promise<UploadChunksResponse> {
    const upload = this.upload(uploadId);
    if (upload.busy) throw new ConflictError(`upload ${uploadId} is busy with another chunk request or its commit: send chunks in one request at a time, before the commit`, { uploadId });
    upload.busy = true;
    this.armTimer(upload);
    try {
      return await receiveFrames(upload, body, async () => {
        upload.pack ??= { ...(await this.packs.create()), bytes: 0 };
        return upload.pack;
      });
    } finally {
      upload.busy = false;
      this.armTimer(upload);
    }
  }

  /**
   * Makes the upload a checkpoint, once every chunk it references is durable. Refused with
   * ConflictError (the upload stays open) while chunks are missing.
   */
  async commit(uploadId: string): Promise<CheckpointInfo> {
    const upload = this.upload(uploadId);
    if (upload.busy) throw new ConflictError(`upload ${uploadId} is busy with a chunk request or another commit: commit once, after the chunks are sent`, { uploadId });
    upload.busy = true;
    try {
      if (upload.pack) {
        await upload.pack.file.sync();
        await this.packs.syncDirectory();
      }
      const has = this.db.prepare<[Buffer], number>('SELECT 1 FROM chunks WHERE hash = ?').pluck();
      let lacking = 0;
      let example = '';
      for (const part of upload.parts) {
        for (const hash of chunkHashes(part.decoded)) {
          if (upload.written.has(hash.toString('hex')) || has.get(hash) !== undefined) continue;
          lacking++;
          example ||= hash.toString('hex');
        }
      }
      if (lacking > 0) {
        throw new ConflictError(`upload ${uploadId} lacks ${lacking} chunk(s) (e.g. ${example}): send them with PUT /v1/checkpoints/uploads/${uploadId}/chunks, then commit again`, {
          uploadId,
          lacking,
          example,
        });
      }
      const info = this.insertCheckpoint(upload);
      this.forgetUpload(upload);
      if (upload.pack) {
        await upload.pack.file.close();
        // Every chunk was already stored by another commit: nothing refers to this pack.
        if (info.newBytes === 0) await this.collector.deletePack(upload.pack.id);
      }
      this.applyRetention(upload.container);
      await this.gc();
      return info;
    } finally {
      upload.busy = false;
    }
  }

  async abort(uploadId: string): Promise<void> {
    await this.dropUpload(this.upload(uploadId));
  }

  // ---------------------------------------------------------------- checkpoints

  /** Newest first. */
  list(container: string): CheckpointSummary[] {
    const rows = this.db.prepare<[string], CheckpointRow>(`SELECT * FROM checkpoints WHERE container = ? ${NEWEST_FIRST}`).all(container);
    return rows.map(summaryOf);
  }

  /** How many checkpoints it holds, of how many containers, and the bytes of its packs. */
  usage(): StoreUsage {
    const counts = this.db.prepare<[], { checkpoints: number; containers: number }>('SELECT COUNT(*) AS checkpoints, COUNT(DISTINCT container) AS containers FROM checkpoints').get()!;
    const bytes = this.db.prepare<[], number>('SELECT COALESCE(SUM(bytes), 0) FROM packs').pluck().get()!;
    return { ...counts, bytes };
  }

  get(container: string, id: string): CheckpointDetail {
    const row = this.reads.checkpointRow(container, id);
    return { ...this.infoOf(row), metadata: JSON.parse(row.metadata) as Record<string, unknown> };
  }

  /** Drops every checkpoint of `container`, then the chunks only they used. */
  async forget(container: string): Promise<number> {
    const removed = this.db.transaction(() => {
      const seqs = this.db.prepare<[string], number>('SELECT seq FROM checkpoints WHERE container = ?').pluck().all(container);
      for (const seq of seqs) this.deleteCheckpoint(seq);
      return seqs.length;
    })();
    await this.gc();
    return removed;
  }

  /** Drops one checkpoint, then the chunks only it used (a copy a replicated upload could not finish everywhere). */
  async remove(container: string, id: string): Promise<void> {
    const row = this.reads.checkpointRow(container, id);
    this.deleteCheckpoint(row.seq);
    await this.gc();
  }

  /** Part `part` of a checkpoint as the tar archive the agent made, chunks verified as they are read. */
  partArchive(container: string, id: string, part: string): AsyncIterable<Buffer> {
    return this.reads.partArchive(container, id, part);
  }

  /** A path of the container at the checkpoint: a directory listing, or a file to stream. */
  readPath(container: string, id: string, path: string): DirectoryListing | CheckpointFile {
    return this.reads.readPath(container, id, path);
  }

  diff(container: string, from: string, to: string): CheckpointDiff {
    return this.reads.diff(container, from, to);
  }

  /** The upload request that stores this checkpoint again, id included: what a copy to another replica sends. */
  uploadRequest(container: string, id: string): CreateUploadRequest & { id: string } {
    const row = this.reads.checkpointRow(container, id);
    const parts = this.db.prepare<[number], { name: string; manifest: Buffer }>('SELECT name, manifest FROM parts WHERE checkpoint = ? ORDER BY name').all(row.seq);
    const summary = summaryOf(row);
    return {
      id,
      parts: parts.map((part) => ({ name: part.name, manifest: part.manifest.toString('base64') })),
      time: summary.time,
      logPosition: summary.logPosition,
      metadata: JSON.parse(row.metadata) as Record<string, unknown>,
    };
  }

  /** Chunk frames of a checkpoint for the positions a bitmap names (another replica's missing bitmap for uploadRequest's parts), each verified. */
  chunkFrames(container: string, id: string, bitmap: Buffer): AsyncIterable<Buffer> {
    return this.reads.chunkFrames(container, id, bitmap);
  }

  /** Fault injection: damages a chunk only this checkpoint references (reads.ts). */
  damageUniqueChunk(container: string, id: string): Promise<string> {
    return this.reads.damageUniqueChunk(container, id);
  }

  /** Garbage collection (gc.ts); runs after every commit and forget. */
  gc(): Promise<GcResult> {
    return this.collector.collect();
  }

  // ---------------------------------------------------------------- internals

  private upload(uploadId: string): Upload {
    const upload = this.uploads.get(uploadId);
    if (!upload) throw new NotFoundError(`no upload ${uploadId} in progress (committed, aborted, or dropped after ${this.uploadTimeoutMs} ms idle): start a new one`, { uploadId });
    return upload;
  }

  private armTimer(upload: Upload): void {
    clearTimeout(upload.timer);
    upload.timer = setTimeout(() => {
      if (upload.busy) return this.armTimer(upload);
      this.log?.warn({ uploadId: upload.id, container: upload.container }, 'checkpoint upload dropped: no request within the upload timeout');
      void this.dropUpload(upload);
    }, this.uploadTimeoutMs);
    upload.timer.unref();
  }

  private forgetUpload(upload: Upload): void {
    clearTimeout(upload.timer);
    this.uploads.delete(upload.id);
  }

  private async dropUpload(upload: Upload): Promise<void> {
    this.forgetUpload(upload);
    if (upload.pack) {
      await upload.pack.file.close().catch(() => {});
      await this.packs.remove(upload.pack.id).catch(() => {});
    }
  }

  private insertCheckpoint(upload: Upload): CheckpointInfo {
    const id = upload.checkpointId ?? randomBytes(8).toString('hex');
    const logicalBytes = upload.parts.reduce((sum, part) => sum + part.logicalBytes, 0);
    const seq = this.db.transaction(() => {
      let newBytes = 0;
      if (upload.pack && upload.written.size > 0) {
        this.db.prepare('INSERT INTO packs (id, bytes) VALUES (?, ?)').run(upload.pack.id, upload.pack.bytes);
        // OR IGNORE: another upload may have committed the same chunk meanwhile; its copy wins.
        const insert = this.db.prepare('INSERT OR IGNORE INTO chunks (hash, pack, offset, length) VALUES (?, ?, ?, ?)');
        // A chunk found damaged is replaced by this upload's good copy.
        const replace = this.db.prepare('INSERT OR REPLACE INTO chunks (hash, pack, offset, length) VALUES (?, ?, ?, ?)');
        for (const [hex, at] of upload.written) {
          const statement = this.reads.damaged.has(hex) ? replace : insert;
          if (statement.run(Buffer.from(hex, 'hex'), upload.pack.id, at.offset, at.length).changes > 0) newBytes += at.length;
        }
      }
      const inserted = this.db
        .prepare('INSERT INTO checkpoints (container, id, time, logical_bytes, new_bytes, log_position, log_id, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?)')
        .run(upload.container, id, upload.time, logicalBytes, newBytes, upload.logPosition?.seq ?? null, upload.logPosition?.logId ?? null, JSON.stringify(upload.metadata));
      const insertPart = this.db.prepare('INSERT INTO parts (checkpoint, name, logical_bytes, entries, manifest) VALUES (?, ?, ?, ?, ?)');
      for (const part of upload.parts) insertPart.run(inserted.lastInsertRowid, part.name, part.logicalBytes, part.decoded.entries.length, part.manifest);
      return Number(inserted.lastInsertRowid);
    })();
    for (const hex of upload.written.keys()) this.reads.damaged.delete(hex);
    return this.infoOf(this.db.prepare<[number], CheckpointRow>('SELECT * FROM checkpoints WHERE seq = ?').get(seq)!);
  }

  /**
   * Keeps the newest `keep` intact checkpoints of the container. Corrupt ones do not count, so
   * damage never pushes out the last good checkpoint; those older than it go too.
   */
  private applyRetention(container: string): void {
    this.db.transaction(() => {
      const rows = this.db.prepare<[string], { seq: number; corrupt: number }>(`SELECT seq, corrupt FROM checkpoints WHERE container = ? ${NEWEST_FIRST}`).all(container);
      let intact = 0;
      for (const row of rows) {
        if (intact >= this.keep) this.deleteCheckpoint(row.seq);
        else if (!row.corrupt) intact++;
      }
    })();
  }

  private deleteCheckpoint(seq: number): void {
    this.db.prepare('DELETE FROM parts WHERE checkpoint = ?').run(seq);
    this.db.prepare('DELETE FROM checkpoints WHERE seq = ?').run(seq);
  }

  private infoOf(row: CheckpointRow): CheckpointInfo {
    const parts = this.db
      .prepare<[number], { name: string; logicalBytes: number; entries: number }>('SELECT name, logical_bytes AS logicalBytes, entries FROM parts WHERE checkpoint = ? ORDER BY name')
      .all(row.seq);
    return { ...summaryOf(row), container: row.container, parts };
  }
}

