/**
 * The checkpoint store: content-addressed 4 KiB chunks in append-only pack files, indexed in
 * SQLite with the checkpoints that reference them (format and commit protocol: docs/design.md,
 * "Checkpoint store").
 *
 * Commit protocol: an upload appends the chunks the store lacks to a pack of its own; commit
 * fsyncs that pack and the packs directory, then one SQLite transaction (WAL, synchronous=FULL)
 * adds the pack's index rows and the checkpoint. A crash before that transaction leaves a pack
 * no row names, which open() deletes; the previous checkpoints never depended on it.
 *
 * Every chunk read is checked against its sha256. A mismatch throws ChunkCorruptError and marks
 * the checkpoint being read corrupt, so listings show it and callers pick an older one.
 */
import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { mkdir, open, readdir, unlink, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import type { Logger } from 'pino';
import { CheckpointNotFoundError, ChunkCorruptError, ConflictError, InvalidInputError, NotFoundError, StoreFailedError } from '../shared/errors.js';
import { openExclusiveSqlite, syncDirectory } from '../shared/durable.js';
import { CHUNK_BYTES, HASH_BYTES, ManifestFormatError, chunkHashes, chunkLength, decodeManifest, sha256, type PartManifest } from './manifest.js';
import type { CheckpointDetail, CheckpointDiff, CheckpointInfo, CheckpointSummary, CreateUploadResponse, DirectoryListing, LogPosition, UploadChunksResponse } from './protocol.js';
import { ExactReader, expandSparse, paddingOf } from './tar.js';
import { ContainerTree, diffTrees, type VolumeMount } from './tree.js';

export const DEFAULT_KEEP = 5;
export const DEFAULT_UPLOAD_TIMEOUT_MS = 10 * 60_000;
/** Pack writes and reads are batched up to this many bytes (256 chunks). */
const IO_BATCH_BYTES = 1024 * 1024;
const FRAME_HEADER_BYTES = HASH_BYTES + 4;

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
  logPosition?: LogPosition | null;
  metadata: Record<string, unknown>;
}

export interface GcResult {
  deletedPacks: number;
  rewrittenPacks: number;
  /** Pack bytes on disk before minus after. */
  freedBytes: number;
}

/** A file of a checkpoint, ready to be streamed. */
export interface CheckpointFile {
  type: 'file';
  path: string;
  size: number;
  content: AsyncIterable<Buffer>;
}

interface Upload {
  id: string;
  container: string;
  time: number;
  logPosition: LogPosition | null;
  metadata: Record<string, unknown>;
  parts: { name: string; manifest: Buffer; decoded: PartManifest; logicalBytes: number }[];
  /** Hex hashes the store lacked when the upload began: the only chunks it accepts. */
  wanted: Set<string>;
  /** Chunks appended to this upload's pack, by hex hash. */
  written: Map<string, { offset: number; length: number }>;
  pack?: { id: string; file: FileHandle; bytes: number };
  /** A chunk request or a commit is running: the next one waits for it to end. */
  busy: boolean;
  /** Drops the upload when it stays idle for uploadTimeoutMs. */
  timer?: NodeJS.Timeout;
}

interface CheckpointRow {
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

interface ChunkRow {
  hash: Buffer;
  pack: string;
  offset: number;
  length: number;
}

/** Which checkpoint a read is for, for error details and corrupt marks. */
interface ReadContext {
  container: string;
  checkpoint: string;
}

/** 2: checkpoints.log_id, the request log a log_position is in. */
const SCHEMA_VERSION = 2;

export class CheckpointStore {
  private readonly uploads = new Map<string, Upload>();
  private readonly packFiles = new Map<string, Promise<FileHandle>>();
  /** Reads in progress: GC waits for them, and packs retired meanwhile are deleted after them. */
  private readers = 0;
  /** Packs no index row names any more, whose files a reader in progress may still read. */
  private readonly retiredPacks: string[] = [];
  private gcWanted = false;
  private gcRunning = false;

  private constructor(
    private readonly db: Database.Database,
    private readonly packsDir: string,
    private readonly keep: number,
    private readonly uploadTimeoutMs: number,
    private readonly log: Logger | undefined,
  ) {}

  /** Opens (creating if needed) the store at `root`, deletes packs no commit reached, and collects garbage. */
  static async open(opts: CheckpointStoreOptions): Promise<CheckpointStore> {
    const packsDir = join(opts.root, 'packs');
    await mkdir(packsDir, { recursive: true });
    const path = join(opts.root, 'index.sqlite');
    // One process only: the store keeps uploads in memory, so a second process on the same root
    // would delete their packs as orphans. It fails at once instead.
    const db = openExclusiveSqlite(path, 'checkpoint store', migrate);
    const store = new CheckpointStore(db, packsDir, opts.keep ?? DEFAULT_KEEP, opts.uploadTimeoutMs ?? DEFAULT_UPLOAD_TIMEOUT_MS, opts.logger);
    try {
      await store.removeOrphanPacks();
      await store.gc();
    } catch (err) {
      db.close();
      throw new StoreFailedError(`cannot recover checkpoint store ${opts.root}: ${(err as Error).message}`, err);
    }
    return store;
  }

  async close(): Promise<void> {
    for (const upload of [...this.uploads.values()]) await this.dropUpload(upload);
    for (const id of this.retiredPacks.splice(0)) await this.removePackFile(id);
    for (const file of this.packFiles.values()) await (await file).close();
    this.packFiles.clear();
    this.db.close();
  }

  // ---------------------------------------------------------------- uploads

  /** Starts an upload: decodes the manifests and answers which chunks the store lacks. */
  createUpload(req: NewUpload): CreateUploadResponse {
    const names = new Set<string>();
    const parts = req.parts.map(({ name, manifest }) => {
      if (names.has(name)) throw new InvalidInputError(`part ${name} appears twice in the upload: send each part once`, { part: name });
      names.add(name);
      let decoded: PartManifest;
      try {
        decoded = decodeManifest(manifest);
      } catch (err) {
        if (err instanceof ManifestFormatError) throw new InvalidInputError(`manifest of part ${name} is malformed: ${err.message}`, { part: name });
        throw err;
      }
      const logicalBytes = decoded.entries.reduce((sum, { entry }) => sum + entry.size, 0);
      return { name, manifest, decoded, logicalBytes };
    });
    // Checked now: a bad volumes list would otherwise only show when the files are browsed.
    volumesOf(req.metadata);

    const has = this.db.prepare<[Buffer], number>('SELECT 1 FROM chunks WHERE hash = ?').pluck();
    const wanted = new Set<string>();
    const seen = new Set<string>();
    const positions = parts.reduce((sum, part) => sum + part.decoded.entries.reduce((n, { hashes }) => n + hashes.length / HASH_BYTES, 0), 0);
    const missing = Buffer.alloc(Math.ceil(positions / 8));
    let position = 0;
    let missingBytes = 0;
    for (const part of parts) {
      for (const { entry, hashes } of part.decoded.entries) {
        for (let index = 0; index * HASH_BYTES < hashes.length; index++, position++) {
          const hash = hashes.subarray(index * HASH_BYTES, (index + 1) * HASH_BYTES);
          const hex = hash.toString('hex');
          if (seen.has(hex)) continue;
          seen.add(hex);
          if (has.get(hash) !== undefined) continue;
          wanted.add(hex);
          missing[position >> 3] |= 0x80 >> (position & 7);
          missingBytes += chunkLength(entry.size, index);
        }
      }
    }

    const upload: Upload = {
      id: randomBytes(16).toString('hex'),
      container: req.container,
      time: req.time,
      logPosition: req.logPosition ?? null,
      metadata: req.metadata,
      parts,
      wanted,
      written: new Map(),
      busy: false,
    };
    this.uploads.set(upload.id, upload);
    this.armTimer(upload);
    return { uploadId: upload.id, missing: missing.toString('base64'), missingChunks: wanted.size, missingBytes };
  }

  /**
   * Stores chunks sent as frames: 32-byte sha256, uint32 BE length, the bytes. Each is checked
   * against its hash before it is kept. Chunks stored before a failure stay with the upload.
   */
  async receiveChunks(uploadId: string, body: AsyncIterable<Buffer>): Promise<UploadChunksResponse> {
    const upload = this.upload(uploadId);
    if (upload.busy) throw new ConflictError(`upload ${uploadId} is busy with another chunk request or its commit: send chunks in one request at a time, before the commit`, { uploadId });
    upload.busy = true;
    this.armTimer(upload);
    const reader = new ExactReader(body);
    const batch: Buffer[] = [];
    let batchBytes = 0;
    let chunks = 0;
    let bytes = 0;
    const flush = async () => {
      if (batchBytes === 0) return;
      const pack = await this.uploadPack(upload);
      const data = Buffer.concat(batch);
      await pack.file.write(data, 0, data.length, pack.bytes - batchBytes);
      batch.length = 0;
      batchBytes = 0;
    };
    try {
      for (;;) {
        const head = await reader.read(FRAME_HEADER_BYTES);
        if (head.length === 0) break;
        if (head.length < FRAME_HEADER_BYTES) throw new InvalidInputError(`chunk frame cut short after ${chunks} chunks: send [32-byte sha256][uint32 BE length][bytes] frames`, { uploadId });
        const hash = head.subarray(0, HASH_BYTES);
        const hex = hash.toString('hex');
        const length = head.readUInt32BE(HASH_BYTES);
        if (length === 0 || length > CHUNK_BYTES) throw new InvalidInputError(`chunk ${hex} is ${length} bytes; chunks are 1 to ${CHUNK_BYTES} bytes`, { uploadId, chunk: hex });
        const data = await reader.read(length);
        if (data.length < length) throw new InvalidInputError(`chunk ${hex} cut short: ${data.length} of ${length} bytes`, { uploadId, chunk: hex });
        if (!upload.wanted.has(hex)) throw new InvalidInputError(`chunk ${hex} is not one upload ${uploadId} asked for: send only the chunks the missing bitmap names`, { uploadId, chunk: hex });
        if (!sha256(data).equals(hash)) {
          throw new ChunkCorruptError(`chunk sent as ${hex} has other content (sha256 ${sha256(data).toString('hex')}): damaged in flight, send it again`, { chunk: hex, container: upload.container, uploadId }, 400);
        }
        if (upload.written.has(hex)) continue;
        const pack = await this.uploadPack(upload);
        upload.written.set(hex, { offset: pack.bytes, length });
        pack.bytes += length;
        batch.push(data);
        batchBytes += length;
        chunks++;
        bytes += length;
        if (batchBytes >= IO_BATCH_BYTES) await flush();
      }
      await flush();
    } catch (err) {
      // What was not written is not stored: forget it so the client's retry sends it again.
      for (const [hex, at] of upload.written) if (upload.pack && at.offset >= upload.pack.bytes - batchBytes) upload.written.delete(hex);
      if (upload.pack) upload.pack.bytes -= batchBytes;
      throw err;
    } finally {
      upload.busy = false;
      this.armTimer(upload);
    }
    return { chunks, bytes };
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
        await syncDirectory(this.packsDir);
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
        if (info.newBytes === 0) await this.deletePack(upload.pack.id);
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
    const rows = this.db.prepare<[string], CheckpointRow>('SELECT * FROM checkpoints WHERE container = ? ORDER BY seq DESC').all(container);
    return rows.map(summaryOf);
  }

  get(container: string, id: string): CheckpointDetail {
    const row = this.checkpointRow(container, id);
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

  /**
   * Part `part` of a checkpoint re-created as the tar archive the agent made, chunks verified as
   * they are read. An unknown checkpoint or part throws here, before any byte.
   */
  partArchive(container: string, id: string, part: string): AsyncIterable<Buffer> {
    const manifest = this.partManifest(this.checkpointRow(container, id), part);
    const ctx = { container, checkpoint: id };
    const store = this;
    async function* archive(): AsyncGenerator<Buffer> {
      for (const { entry, hashes } of manifest.entries) {
        yield entry.header;
        yield* store.readChunks(hashes, ctx);
        if (entry.size % 512 !== 0) yield paddingOf(entry.size);
      }
      yield Buffer.alloc(manifest.endBytes);
    }
    return this.reading(archive());
  }

  /**
   * A path of the container as it was at the checkpoint: a directory listing, or a file to
   * stream. Symlinks resolve inside the container; escapes are refused (PathEscapesError).
   */
  readPath(container: string, id: string, path: string): DirectoryListing | CheckpointFile {
    const tree = this.treeOf(this.checkpointRow(container, id));
    const resolved = tree.resolve(path);
    const node = tree.get(resolved);
    if (!node) throw new NotFoundError(`no ${path} in checkpoint ${id} of container ${container}`, { container, checkpoint: id, path });
    if (node.entry.type === 'dir') return { type: 'dir', path: resolved, entries: tree.list(resolved) };
    const file = tree.contentOf(node);
    if (!file) throw new InvalidInputError(`${path} in checkpoint ${id} is a ${node.entry.type}, not a file or directory`, { container, checkpoint: id, path });
    const ctx = { container, checkpoint: id };
    const stored = this.reading(this.readChunks(file.hashes, ctx));
    return { type: 'file', path: resolved, size: file.entry.realSize, content: file.entry.sparse ? expandSparse(stored, file.entry.realSize) : stored };
  }

  diff(container: string, from: string, to: string): CheckpointDiff {
    return diffTrees(this.treeOf(this.checkpointRow(container, from)), this.treeOf(this.checkpointRow(container, to)));
  }

  /**
   * Fault injection (the controller's debug route): flips one byte of a chunk that only this
   * checkpoint references, as bit rot would, so reading it fails its hash check while older
   * checkpoints stay readable. Returns the damaged chunk's hash.
   */
  async damageUniqueChunk(container: string, id: string): Promise<string> {
    const target = this.checkpointRow(container, id);
    const sharedWith = new Set<string>();
    for (const row of this.db.prepare<[string], CheckpointRow>('SELECT * FROM checkpoints WHERE container = ?').all(container)) {
      if (row.seq === target.seq) continue;
      for (const part of this.partNames(row)) for (const h of chunkHashes(this.partManifest(row, part))) sharedWith.add(h.toString('hex'));
    }
    for (const part of this.partNames(target)) {
      for (const hash of chunkHashes(this.partManifest(target, part))) {
        if (sharedWith.has(hash.toString('hex'))) continue;
        const chunk = this.db.prepare<[Buffer], ChunkRow>('SELECT hash, pack, offset, length FROM chunks WHERE hash = ?').get(hash);
        if (!chunk || chunk.length === 0) continue;
        const file = await open(this.packPath(chunk.pack), 'r+');
        try {
          const byte = Buffer.alloc(1);
          await file.read(byte, 0, 1, chunk.offset);
          byte[0] = byte[0]! ^ 0xff;
          await file.write(byte, 0, 1, chunk.offset);
          await file.sync();
        } finally {
          await file.close();
        }
        return hash.toString('hex');
      }
    }
    throw new InvalidInputError(`checkpoint ${id} of ${container} has no chunk of its own to damage`, { container, checkpoint: id });
  }

  private partNames(row: CheckpointRow): string[] {
    return this.db.prepare<[number], string>('SELECT name FROM parts WHERE checkpoint = ? ORDER BY name').pluck().all(row.seq);
  }

  // ---------------------------------------------------------------- garbage collection

  /**
   * Deletes chunks no checkpoint or open upload references, packs left without live chunks,
   * and rewrites packs less than half live. Waits for reads in progress (runs when the last ends).
   */
  async gc(): Promise<GcResult> {
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
      const again = await this.gc();
      result.deletedPacks += again.deletedPacks;
      result.rewrittenPacks += again.rewrittenPacks;
      result.freedBytes += again.freedBytes;
    }
    return result;
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

  private async uploadPack(upload: Upload): Promise<NonNullable<Upload['pack']>> {
    if (!upload.pack) {
      const id = randomBytes(16).toString('hex');
      upload.pack = { id, file: await open(this.packPath(id), fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_WRONLY), bytes: 0 };
    }
    return upload.pack;
  }

  private forgetUpload(upload: Upload): void {
    clearTimeout(upload.timer);
    this.uploads.delete(upload.id);
  }

  private async dropUpload(upload: Upload): Promise<void> {
    this.forgetUpload(upload);
    if (upload.pack) {
      await upload.pack.file.close().catch(() => {});
      await unlink(this.packPath(upload.pack.id)).catch(() => {});
    }
  }

  private insertCheckpoint(upload: Upload): CheckpointInfo {
    const id = randomBytes(8).toString('hex');
    const logicalBytes = upload.parts.reduce((sum, part) => sum + part.logicalBytes, 0);
    const seq = this.db.transaction(() => {
      let newBytes = 0;
      if (upload.pack && upload.written.size > 0) {
        this.db.prepare('INSERT INTO packs (id, bytes) VALUES (?, ?)').run(upload.pack.id, upload.pack.bytes);
        // OR IGNORE: another upload may have committed the same chunk meanwhile; its copy wins.
        const insert = this.db.prepare('INSERT OR IGNORE INTO chunks (hash, pack, offset, length) VALUES (?, ?, ?, ?)');
        for (const [hex, at] of upload.written) {
          if (insert.run(Buffer.from(hex, 'hex'), upload.pack.id, at.offset, at.length).changes > 0) newBytes += at.length;
        }
      }
      const inserted = this.db
        .prepare('INSERT INTO checkpoints (container, id, time, logical_bytes, new_bytes, log_position, log_id, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?)')
        .run(upload.container, id, upload.time, logicalBytes, newBytes, upload.logPosition?.seq ?? null, upload.logPosition?.logId ?? null, JSON.stringify(upload.metadata));
      const insertPart = this.db.prepare('INSERT INTO parts (checkpoint, name, logical_bytes, entries, manifest) VALUES (?, ?, ?, ?, ?)');
      for (const part of upload.parts) insertPart.run(inserted.lastInsertRowid, part.name, part.logicalBytes, part.decoded.entries.length, part.manifest);
      return Number(inserted.lastInsertRowid);
    })();
    return this.infoOf(this.db.prepare<[number], CheckpointRow>('SELECT * FROM checkpoints WHERE seq = ?').get(seq)!);
  }

  /**
   * Keeps the newest `keep` intact checkpoints of the container. Corrupt ones do not count, so
   * damage never pushes out the last good checkpoint; those older than it go too.
   */
  private applyRetention(container: string): void {
    this.db.transaction(() => {
      const rows = this.db.prepare<[string], { seq: number; corrupt: number }>('SELECT seq, corrupt FROM checkpoints WHERE container = ? ORDER BY seq DESC').all(container);
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

  /** Deletes index rows of dead chunks; answers each pack's size and live bytes. */
  private dropDeadChunks(): { id: string; bytes: number; liveBytes: number }[] {
    const live = new Set<string>();
    for (const manifest of this.db.prepare<[], Buffer>('SELECT manifest FROM parts').pluck().iterate()) {
      for (const hash of chunkHashes(decodeManifest(manifest))) live.add(hash.toString('hex'));
    }
    for (const upload of this.uploads.values()) {
      for (const part of upload.parts) for (const hash of chunkHashes(part.decoded)) live.add(hash.toString('hex'));
    }
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

  private async deletePack(id: string): Promise<void> {
    this.db.prepare('DELETE FROM packs WHERE id = ?').run(id);
    if (this.readers > 0) this.retiredPacks.push(id);
    else await this.removePackFile(id);
  }

  private async removePackFile(id: string): Promise<void> {
    await this.closePackFile(id);
    await unlink(this.packPath(id)).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'ENOENT') throw err;
    });
  }

  /** Copies a pack's live chunks to a new pack. False (pack kept) if one of them is damaged. */
  private async rewritePack(oldId: string): Promise<boolean> {
    const rows = this.db.prepare<[string], ChunkRow>('SELECT hash, pack, offset, length FROM chunks WHERE pack = ? ORDER BY offset').all(oldId);
    const newId = randomBytes(16).toString('hex');
    const target = await open(this.packPath(newId), fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_WRONLY);
    const moved: { hash: Buffer; offset: number }[] = [];
    let bytes = 0;
    try {
      const source = await this.packFile(oldId);
      for (const row of rows) {
        const data = Buffer.alloc(row.length);
        await source.read(data, 0, row.length, row.offset);
        if (!sha256(data).equals(row.hash)) {
          this.log?.error({ pack: oldId, chunk: row.hash.toString('hex') }, 'damaged chunk found while compacting a pack; the pack is kept as it is');
          await target.close();
          await unlink(this.packPath(newId));
          return false;
        }
        await target.write(data, 0, data.length, bytes);
        moved.push({ hash: row.hash, offset: bytes });
        bytes += data.length;
      }
      await target.sync();
    } finally {
      await target.close().catch(() => {});
    }
    await syncDirectory(this.packsDir);
    this.db.transaction(() => {
      this.db.prepare('INSERT INTO packs (id, bytes) VALUES (?, ?)').run(newId, bytes);
      const update = this.db.prepare('UPDATE chunks SET pack = ?, offset = ? WHERE hash = ? AND pack = ?');
      for (const chunk of moved) update.run(newId, chunk.offset, chunk.hash, oldId);
    })();
    await this.deletePack(oldId);
    return true;
  }

  private async removeOrphanPacks(): Promise<void> {
    const known = new Set(this.db.prepare<[], string>('SELECT id FROM packs').pluck().all());
    for (const name of await readdir(this.packsDir)) {
      const id = name.replace(/\.pack$/, '');
      if (known.has(id)) {
        known.delete(id);
        continue;
      }
      this.log?.info({ pack: name }, 'deleting a checkpoint pack no commit reached (an upload that was interrupted)');
      await unlink(join(this.packsDir, name));
    }
    for (const id of known) this.log?.error({ pack: id }, 'checkpoint pack file is missing: checkpoints using its chunks will fail to read and be marked corrupt');
  }

  /** Runs a read with GC held off, and the GC it held off after it. */
  private async *reading(source: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
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
      for (let id = this.retiredPacks.pop(); id !== undefined; id = this.retiredPacks.pop()) await this.removePackFile(id);
      if (this.gcWanted) await this.gc();
    } catch (err) {
      this.log?.error({ err }, 'checkpoint store garbage collection failed');
    }
  }

  /** The chunks named by `hashes`, each verified; consecutive chunks of a pack are read at once. */
  private async *readChunks(hashes: Buffer, ctx: ReadContext): AsyncGenerator<Buffer> {
    const lookup = this.db.prepare<[Buffer], ChunkRow>('SELECT hash, pack, offset, length FROM chunks WHERE hash = ?');
    const count = hashes.length / HASH_BYTES;
    for (let first = 0; first < count; ) {
      // A run: chunks stored back to back in one pack, up to IO_BATCH_BYTES.
      const run: ChunkRow[] = [];
      let runBytes = 0;
      for (let index = first; index < count && runBytes < IO_BATCH_BYTES; index++) {
        const hash = hashes.subarray(index * HASH_BYTES, (index + 1) * HASH_BYTES);
        const row = lookup.get(hash);
        if (!row) {
          if (run.length > 0) break;
          throw this.corrupt(ctx, hash.toString('hex'), undefined, 'is missing from the store');
        }
        const previous = run[run.length - 1];
        if (previous && (row.pack !== previous.pack || row.offset !== previous.offset + previous.length)) break;
        run.push(row);
        runBytes += row.length;
      }
      const data = Buffer.alloc(runBytes);
      let file: FileHandle;
      try {
        file = await this.packFile(run[0].pack);
      } catch {
        throw this.corrupt(ctx, run[0].hash.toString('hex'), run[0].pack, 'is in a pack file that cannot be opened');
      }
      const { bytesRead } = await file.read(data, 0, runBytes, run[0].offset);
      let at = 0;
      for (const row of run) {
        const chunk = data.subarray(at, at + row.length);
        at += row.length;
        if (at > bytesRead || !sha256(chunk).equals(row.hash)) throw this.corrupt(ctx, row.hash.toString('hex'), row.pack, 'has damaged content');
      }
      // The whole verified run at once: one write downstream per megabyte, not per page.
      yield data.subarray(0, at);
      first += run.length;
    }
  }

  private corrupt(ctx: ReadContext, chunk: string, pack: string | undefined, what: string): ChunkCorruptError {
    this.db.prepare('UPDATE checkpoints SET corrupt = 1 WHERE container = ? AND id = ?').run(ctx.container, ctx.checkpoint);
    const error = new ChunkCorruptError(
      `chunk ${chunk} of checkpoint ${ctx.checkpoint} (container ${ctx.container}) ${what}${pack ? ` (pack ${pack})` : ''}: the checkpoint is marked corrupt, use an older one`,
      { ...ctx, chunk, ...(pack ? { pack } : {}) },
    );
    this.log?.error({ err: error.toJSON() }, error.message);
    return error;
  }

  private packFile(id: string): Promise<FileHandle> {
    let file = this.packFiles.get(id);
    if (!file) {
      file = open(this.packPath(id), 'r');
      this.packFiles.set(id, file);
      file.catch(() => this.packFiles.delete(id));
    }
    return file;
  }

  private async closePackFile(id: string): Promise<void> {
    const file = this.packFiles.get(id);
    this.packFiles.delete(id);
    if (file) await (await file.catch(() => undefined))?.close();
  }

  private packPath(id: string): string {
    return join(this.packsDir, `${id}.pack`);
  }

  private checkpointRow(container: string, id: string): CheckpointRow {
    const row = this.db.prepare<[string, string], CheckpointRow>('SELECT * FROM checkpoints WHERE container = ? AND id = ?').get(container, id);
    if (!row) throw new CheckpointNotFoundError(container, id);
    return row;
  }

  private partManifest(row: CheckpointRow, part: string): PartManifest {
    const manifest = this.db.prepare<[number, string], Buffer>('SELECT manifest FROM parts WHERE checkpoint = ? AND name = ?').pluck().get(row.seq, part);
    if (!manifest) throw new NotFoundError(`checkpoint ${row.id} of container ${row.container} has no part ${part}`, { container: row.container, checkpoint: row.id, part });
    return decodeManifest(manifest);
  }

  private treeOf(row: CheckpointRow): ContainerTree {
    return new ContainerTree(this.partManifest(row, 'files'), volumesOf(JSON.parse(row.metadata) as Record<string, unknown>));
  }

  private infoOf(row: CheckpointRow): CheckpointInfo {
    const parts = this.db
      .prepare<[number], { name: string; logicalBytes: number; entries: number }>('SELECT name, logical_bytes AS logicalBytes, entries FROM parts WHERE checkpoint = ? ORDER BY name')
      .all(row.seq);
    return { ...summaryOf(row), container: row.container, parts };
  }
}

function summaryOf(row: CheckpointRow): CheckpointSummary {
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
function volumesOf(metadata: Record<string, unknown>): VolumeMount[] {
  const volumes = metadata.volumes;
  if (volumes === undefined) return [];
  const valid =
    Array.isArray(volumes) &&
    volumes.every((v) => v && typeof v === 'object' && typeof (v as VolumeMount).name === 'string' && typeof (v as VolumeMount).path === 'string' && (v as VolumeMount).path.startsWith('/'));
  if (!valid) throw new InvalidInputError('metadata.volumes must be a list of {name, path} with absolute paths', { volumes });
  return volumes as VolumeMount[];
}


function migrate(db: Database.Database): void {
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
