/**
 * Reading checkpoints back from the store: part archives, files and directories of the
 * container, diffs, and the raw chunks a copy to another replica needs. Every chunk read is
 * checked against its sha256; a mismatch (or a missing chunk) throws ChunkCorruptError and marks
 * the checkpoint being read corrupt on this store.
 */
import type Database from 'better-sqlite3';
import type { Logger } from 'pino';
import { CheckpointNotFoundError, ChunkCorruptError, InvalidInputError, NotFoundError } from '../shared/errors.js';
import type { PackCollector } from './gc.js';
import { HASH_BYTES, chunkHashes, decodeManifest, sha256, type PartManifest } from './manifest.js';
import type { PackFiles } from './packs.js';
import type { CheckpointDiff, DirectoryListing } from './protocol.js';
import { volumesOf, type CheckpointRow, type ChunkRow } from './schema.js';
import { expandSparse, paddingOf } from './tar.js';
import { ContainerTree, diffTrees } from './tree.js';
import { IO_BATCH_BYTES } from './upload-session.js';

/** A file of a checkpoint, ready to be streamed. */
export interface CheckpointFile {
  type: 'file';
  path: string;
  size: number;
  content: AsyncIterable<Buffer>;
}

/** Which checkpoint a read is for, for error details and corrupt marks. */
interface ReadContext {
  container: string;
  checkpoint: string;
}

export class CheckpointReads {
  /**
   * Hex hashes of chunks a read found damaged since the store opened: an upload holding one is
   * asked for it again and its good copy replaces the damaged one (a replica heals from another).
   */
  readonly damaged = new Set<string>();

  constructor(
    private readonly db: Database.Database,
    private readonly packs: PackFiles,
    private readonly collector: PackCollector,
    private readonly log: Logger | undefined,
  ) {}

  /**
   * Part `part` of a checkpoint re-created as the tar archive the agent made, chunks verified as
   * they are read. An unknown checkpoint or part throws here, before any byte.
   */
  partArchive(container: string, id: string, part: string): AsyncIterable<Buffer> {
    const manifest = this.partManifest(this.checkpointRow(container, id), part);
    const ctx = { container, checkpoint: id };
    const reads = this;
    async function* archive(): AsyncGenerator<Buffer> {
      for (const { entry, hashes } of manifest.entries) {
        yield entry.header;
        yield* reads.readChunks(hashes, ctx);
        if (entry.size % 512 !== 0) yield paddingOf(entry.size);
      }
      yield Buffer.alloc(manifest.endBytes);
    }
    return this.collector.reading(archive());
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
    const stored = this.collector.reading(this.readChunks(file.hashes, ctx));
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
        await this.packs.damage(chunk.pack, chunk.offset);
        return hash.toString('hex');
      }
    }
    throw new InvalidInputError(`checkpoint ${id} of ${container} has no chunk of its own to damage`, { container, checkpoint: id });
  }

  private partNames(row: CheckpointRow): string[] {
    return this.db.prepare<[number], string>('SELECT name FROM parts WHERE checkpoint = ? ORDER BY name').pluck().all(row.seq);
  }

  /**
   * Frames ([sha256][uint32 BE length][bytes]) of the chunks at the positions `bitmap` sets,
   * positions counted over the checkpoint's parts by name, entries, chunks (the order of the
   * store's uploadRequest): what another replica asked for to hold a copy. Each chunk verified.
   */
  chunkFrames(container: string, id: string, bitmap: Buffer): AsyncIterable<Buffer> {
    const row = this.checkpointRow(container, id);
    const wanted: Buffer[] = [];
    let position = 0;
    for (const part of this.partNames(row)) {
      for (const hash of chunkHashes(this.partManifest(row, part))) {
        if ((bitmap[position >> 3] ?? 0) & (0x80 >> (position & 7))) wanted.push(hash);
        position++;
      }
    }
    const lengthOf = this.db.prepare<[Buffer], number>('SELECT length FROM chunks WHERE hash = ?').pluck();
    const reads = this;
    async function* frames(): AsyncGenerator<Buffer> {
      let next = 0;
      for await (const run of reads.readChunks(Buffer.concat(wanted), { container, checkpoint: id })) {
        // A run is whole chunks, in order: cut it back into them.
        for (let at = 0; at < run.length; next++) {
          const hash = wanted[next]!;
          const length = lengthOf.get(hash)!;
          const head = Buffer.alloc(HASH_BYTES + 4);
          hash.copy(head);
          head.writeUInt32BE(length, HASH_BYTES);
          yield head;
          yield run.subarray(at, at + length);
          at += length;
        }
      }
    }
    return this.collector.reading(frames());
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
      let file;
      try {
        file = await this.packs.reader(run[0].pack);
      } catch {
        throw this.corrupt(ctx, run[0].hash.toString('hex'), run[0].pack, 'is in a pack file that cannot be opened');
      }
      const { bytesRead } = await file.read(data, 0, runBytes, run[0].offset);
      let at = 0;
      for (const row of run) {
        const chunk = data.subarray(at, at + row.length);
        at += row.length;
        if (at > bytesRead || !sha256(chunk).equals(row.hash)) {
          this.damaged.add(row.hash.toString('hex'));
          throw this.corrupt(ctx, row.hash.toString('hex'), row.pack, 'has damaged content');
        }
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

  checkpointRow(container: string, id: string): CheckpointRow {
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

}
