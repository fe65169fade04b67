/**
 * One upload in progress in the checkpoint store: its decoded manifests, the chunks the store
 * asked for, and the chunk frames as they arrive ([32-byte sha256][uint32 BE length][bytes]),
 * each checked against its hash and appended to the upload's own pack.
 */
import type { FileHandle } from 'node:fs/promises';
import { ChunkCorruptError, InvalidInputError } from '../shared/errors.js';
import { CHUNK_BYTES, HASH_BYTES, ManifestFormatError, chunkLength, decodeManifest, sha256, type PartManifest } from './manifest.js';
import type { StoredLogPosition, UploadChunksResponse } from './protocol.js';
import { ExactReader } from './tar.js';

/** Pack writes are batched up to this many bytes (256 chunks). */
export const IO_BATCH_BYTES = 1024 * 1024;
const FRAME_HEADER_BYTES = HASH_BYTES + 4;

export interface UploadPartDecoded {
  name: string;
  manifest: Buffer;
  decoded: PartManifest;
  logicalBytes: number;
}

export interface Upload {
  id: string;
  /** The checkpoint id the commit gives, when the uploader chose it (the same checkpoint on several replicas). */
  checkpointId?: string;
  container: string;
  time: number;
  logPosition: StoredLogPosition;
  metadata: Record<string, unknown>;
  parts: UploadPartDecoded[];
  /** Hex hashes the store lacked when the upload began: the only chunks it accepts. */
  wanted: Set<string>;
  /** Chunks appended to this upload's pack, by hex hash. */
  written: Map<string, { offset: number; length: number }>;
  pack?: { id: string; file: FileHandle; bytes: number };
  /** A chunk request or a commit is running: the next one waits for it to end. */
  busy: boolean;
  /** Drops the upload when it stays idle for the upload timeout. */
  timer?: NodeJS.Timeout;
}

/** The parts of an upload request, manifests decoded; malformed or repeated parts are refused. */
export function decodeParts(parts: { name: string; manifest: Buffer }[]): UploadPartDecoded[] {
  const names = new Set<string>();
  return parts.map(({ name, manifest }) => {
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
}

/**
 * The chunks of `parts` the store lacks (`has` says which it holds): their hex hashes, and the
 * bitmap over every chunk position (only a missing hash's first position set) the client reads.
 */
export function missingChunks(parts: UploadPartDecoded[], has: (hash: Buffer) => boolean): { wanted: Set<string>; bitmap: Buffer; bytes: number } {
  const wanted = new Set<string>();
  const seen = new Set<string>();
  const positions = parts.reduce((sum, part) => sum + part.decoded.entries.reduce((n, { hashes }) => n + hashes.length / HASH_BYTES, 0), 0);
  const bitmap = Buffer.alloc(Math.ceil(positions / 8));
  let position = 0;
  let bytes = 0;
  for (const part of parts) {
    for (const { entry, hashes } of part.decoded.entries) {
      for (let index = 0; index * HASH_BYTES < hashes.length; index++, position++) {
        const hash = hashes.subarray(index * HASH_BYTES, (index + 1) * HASH_BYTES);
        const hex = hash.toString('hex');
        if (seen.has(hex)) continue;
        seen.add(hex);
        if (has(hash)) continue;
        wanted.add(hex);
        bitmap[position >> 3] |= 0x80 >> (position & 7);
        bytes += chunkLength(entry.size, index);
      }
    }
  }
  return { wanted, bitmap, bytes };
}

/**
 * Appends the chunk frames of `body` to the upload's pack (made by `packOf` on first need).
 * Chunks written before a failure stay with the upload; those not yet written are forgotten,
 * so the client's retry sends them again.
 */
export async function receiveFrames(upload: Upload, body: AsyncIterable<Buffer>, packOf: () => Promise<NonNullable<Upload['pack']>>): Promise<UploadChunksResponse> {
  const uploadId = upload.id;
  const reader = new ExactReader(body);
  const batch: Buffer[] = [];
  let batchBytes = 0;
  let chunks = 0;
  let bytes = 0;
  const flush = async () => {
    if (batchBytes === 0) return;
    const pack = await packOf();
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
      const pack = await packOf();
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
    for (const [hex, at] of upload.written) if (upload.pack && at.offset >= upload.pack.bytes - batchBytes) upload.written.delete(hex);
    if (upload.pack) upload.pack.bytes -= batchBytes;
    throw err;
  }
  return { chunks, bytes };
}
