/**
 * A part's manifest: what is needed, besides the chunks, to re-create the part's tar archive
 * byte for byte. Binary and compact because a 1 GB memory image is 262,144 chunk hashes.
 *
 *   "CKM1"
 *   per entry: u32 BE header length (> 0), header bytes (TarEntry.header),
 *              u64 BE content size, ceil(size / 4096) chunk hashes of 32 bytes
 *   u32 BE 0, u32 BE end bytes (zeros after the last entry)
 *
 * Chunks are fixed 4096-byte slices of each entry's content (the last one shorter): CRIU's
 * pages-*.img hold the dumped pages in address order and keep that order from one dump to the
 * next, so page-size slices line up with memory pages and an unchanged page is an unchanged
 * chunk. Content-defined chunking would only add boundaries where pages already give them.
 */
import { createHash } from 'node:crypto';
import { describeHeader, TarReader, type PaxGlobals, type TarEntry } from './tar.js';

export const CHUNK_BYTES = 4096;
export const HASH_BYTES = 32;
const MAGIC = Buffer.from('CKM1');

export interface ManifestEntry {
  entry: TarEntry;
  /** ceil(entry.size / CHUNK_BYTES) hashes of HASH_BYTES each, in content order. */
  hashes: Buffer;
}

export interface PartManifest {
  entries: ManifestEntry[];
  endBytes: number;
}

export function chunkCount(size: number): number {
  return Math.ceil(size / CHUNK_BYTES);
}

/** Length of chunk `index` of content of `size` bytes. */
export function chunkLength(size: number, index: number): number {
  return Math.min(CHUNK_BYTES, size - index * CHUNK_BYTES);
}

export function sha256(data: Buffer): Buffer {
  return createHash('sha256').update(data).digest();
}

export function encodeManifest(part: PartManifest): Buffer {
  const pieces: Buffer[] = [MAGIC];
  for (const { entry, hashes } of part.entries) {
    const lengths = Buffer.alloc(12);
    lengths.writeUInt32BE(entry.header.length, 0);
    lengths.writeBigUInt64BE(BigInt(entry.size), 4);
    pieces.push(lengths.subarray(0, 4), entry.header, lengths.subarray(4), hashes);
  }
  const end = Buffer.alloc(8);
  end.writeUInt32BE(part.endBytes, 4);
  pieces.push(end);
  return Buffer.concat(pieces);
}

export class ManifestFormatError extends Error {}

/** Parses and checks a manifest: every header must describe the size the manifest records. */
export function decodeManifest(data: Buffer): PartManifest {
  if (!data.subarray(0, 4).equals(MAGIC)) throw new ManifestFormatError('not a checkpoint part manifest (bad magic)');
  const entries: ManifestEntry[] = [];
  const globals: PaxGlobals = new Map();
  let at = 4;
  const need = (bytes: number) => {
    if (at + bytes > data.length) throw new ManifestFormatError(`manifest ends early at byte ${at}`);
  };
  for (;;) {
    need(4);
    const headerBytes = data.readUInt32BE(at);
    at += 4;
    if (headerBytes === 0) break;
    need(headerBytes + 8);
    const header = data.subarray(at, at + headerBytes);
    at += headerBytes;
    const size = Number(data.readBigUInt64BE(at));
    at += 8;
    let entry: TarEntry;
    try {
      entry = describeHeader(header, globals);
    } catch (err) {
      throw new ManifestFormatError(`manifest entry at byte ${at} has a bad tar header: ${(err as Error).message}`);
    }
    if (entry.size !== size) throw new ManifestFormatError(`manifest entry ${entry.path} records ${size} bytes, its header says ${entry.size}`);
    const hashBytes = chunkCount(size) * HASH_BYTES;
    need(hashBytes);
    entries.push({ entry, hashes: data.subarray(at, at + hashBytes) });
    at += hashBytes;
  }
  need(4);
  const endBytes = data.readUInt32BE(at);
  if (at + 4 !== data.length) throw new ManifestFormatError('manifest has bytes after its end');
  return { entries, endBytes };
}

/** Every chunk hash of the manifest, in order (duplicates included). */
export function* chunkHashes(part: PartManifest): Generator<Buffer> {
  for (const { hashes } of part.entries) {
    for (let at = 0; at < hashes.length; at += HASH_BYTES) yield hashes.subarray(at, at + HASH_BYTES);
  }
}

export interface ScannedPart {
  manifest: PartManifest;
  /** Content bytes of all entries (what the part stores without dedup, headers aside). */
  logicalBytes: number;
}

/** Reads a tar stream and hashes its content into 4 KiB chunks. */
export async function scanTar(source: AsyncIterable<Buffer>): Promise<ScannedPart> {
  const reader = new TarReader(source);
  const entries: ManifestEntry[] = [];
  let logicalBytes = 0;
  for (let entry = await reader.next(); entry; entry = await reader.next()) {
    const hashes = Buffer.alloc(chunkCount(entry.size) * HASH_BYTES);
    let index = 0;
    for await (const chunk of reader.content(CHUNK_BYTES)) sha256(chunk).copy(hashes, HASH_BYTES * index++);
    logicalBytes += entry.size;
    entries.push({ entry, hashes });
  }
  return { manifest: { entries, endBytes: reader.endBytes }, logicalBytes };
}
