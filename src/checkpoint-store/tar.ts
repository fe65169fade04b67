/**
 * Streaming tar reading and re-writing for the checkpoint store.
 *
 * The store keeps each entry's header blocks verbatim (with the pax, global pax and GNU
 * longname/longlink records before it) and only splits the content into chunks, so the archive
 * it serves back is byte-for-byte the one the agent's tar produced, and the agent's tar
 * extracts it with everything tar itself recorded (owners, modes, xattrs, ACLs).
 *
 * Formats: ustar, GNU ('L'/'K' long names, base-256 numbers) and pax ('x', 'g'). The agent runs
 * GNU tar with `--xattrs`, which makes GNU tar (1.34 checked) write the pax format; `-S` then
 * stores sparse files as pax "GNU.sparse 1.0": an ordinary regular-file entry whose content is
 * the sparse map (decimal text, padded to 512 bytes) followed by the data of the non-hole
 * segments. Such entries need no special parsing to round-trip; `sparse` marks them so that
 * file reads can expand the holes (see expandSparse). The old GNU sparse type 'S' (format gnu
 * without --xattrs) is refused with a clear error.
 */

export const BLOCK = 512;

export type TarEntryType = 'file' | 'hardlink' | 'symlink' | 'char' | 'block' | 'dir' | 'fifo';

export interface TarEntry {
  /** Every header block of the entry, pax/longname records before it included, verbatim. */
  header: Buffer;
  /** Normalised: no leading `./` or `/`, no trailing `/`; the archive's root is ''. */
  path: string;
  type: TarEntryType;
  /** Content bytes in the archive (for a sparse file: map + data segments). */
  size: number;
  /** Size of the file once extracted (differs from `size` for sparse files). */
  realSize: number;
  mode: number;
  /** Seconds since the epoch (pax may give fractions). */
  mtime: number;
  uid: number;
  gid: number;
  /** Symlink target, or for a hard link the path (normalised) of the entry it links to. */
  linkTarget?: string;
  devMajor: number;
  devMinor: number;
  /** pax SCHILY.xattr.* records, by attribute name (e.g. trusted.overlay.opaque). */
  xattrs: Record<string, string>;
  /** A pax GNU.sparse 1.0 entry: content starts with the sparse map. */
  sparse: boolean;
}

/** Header types that describe the next entry rather than being one. */
const META_TYPES = new Set(['x', 'g', 'L', 'K']);

const TYPES: Record<string, TarEntryType> = {
  '0': 'file',
  '\0': 'file',
  '7': 'file',
  '1': 'hardlink',
  '2': 'symlink',
  '3': 'char',
  '4': 'block',
  '5': 'dir',
  '6': 'fifo',
};

export class TarFormatError extends Error {}

/** Global pax records ('g') stay in force for every later entry of the archive. */
export type PaxGlobals = Map<string, Buffer>;

/**
 * Describes an entry from its complete header bytes (as TarEntry.header holds them). `globals`
 * carries 'g' records from one entry to the next; pass the same map for a whole archive.
 */
export function describeHeader(header: Buffer, globals: PaxGlobals = new Map()): TarEntry {
  if (header.length % BLOCK !== 0 || header.length === 0) throw new TarFormatError(`a tar header must be whole 512-byte blocks, got ${header.length} bytes`);
  const pax = new Map<string, Buffer>();
  let longName: string | undefined;
  let longLink: string | undefined;
  let at = 0;
  for (;;) {
    const block = header.subarray(at, at + BLOCK);
    verifyChecksum(block, at);
    const flag = String.fromCharCode(block[156]);
    if (!META_TYPES.has(flag)) {
      if (at + BLOCK !== header.length) throw new TarFormatError('tar header has blocks after its entry block');
      break;
    }
    const size = readNumber(block, 124, 12);
    const data = header.subarray(at + BLOCK, at + BLOCK + size);
    if (flag === 'x') parsePax(data, pax);
    else if (flag === 'g') parsePax(data, globals);
    else if (flag === 'L') longName = cString(data);
    else longLink = cString(data);
    at += BLOCK + padded(size);
    if (at >= header.length) throw new TarFormatError(`tar record '${flag}' is not followed by an entry`);
  }

  const block = header.subarray(at, at + BLOCK);
  const flag = String.fromCharCode(block[156]);
  if (flag === 'S') throw new TarFormatError('old GNU sparse entries (type S) are not supported: create the archive with --xattrs or --format=pax');
  const type = TYPES[flag];
  if (type === undefined) throw new TarFormatError(`unsupported tar entry type '${flag}'`);
  const paxValue = (key: string): string | undefined => {
    const v = pax.get(key) ?? globals.get(key);
    return v === undefined ? undefined : v.toString('utf8');
  };
  const isUstar = block.subarray(257, 263).toString('latin1') === 'ustar\0';
  const prefix = isUstar ? cString(block.subarray(345, 500)) : '';
  const headerName = cString(block.subarray(0, 100));
  const rawPath = paxValue('GNU.sparse.name') ?? paxValue('path') ?? longName ?? (prefix ? `${prefix}/${headerName}` : headerName);
  const rawLink = paxValue('linkpath') ?? longLink ?? cString(block.subarray(157, 257));
  const size = numberOr(paxValue('size'), () => readNumber(block, 124, 12));
  const sparse = paxValue('GNU.sparse.major') === '1' && paxValue('GNU.sparse.minor') === '0';
  const xattrs: Record<string, string> = {};
  for (const [key, value] of [...globals, ...pax]) {
    if (key.startsWith('SCHILY.xattr.')) xattrs[key.slice('SCHILY.xattr.'.length)] = value.toString('utf8');
  }
  return {
    header,
    path: normalizeTarPath(rawPath),
    type,
    size: type === 'file' ? size : 0,
    realSize: sparse ? numberOr(paxValue('GNU.sparse.realsize'), () => size) : type === 'file' ? size : 0,
    mode: readNumber(block, 100, 8) & 0o7777,
    mtime: numberOr(paxValue('mtime'), () => readNumber(block, 136, 12)),
    uid: numberOr(paxValue('uid'), () => readNumber(block, 108, 8)),
    gid: numberOr(paxValue('gid'), () => readNumber(block, 116, 8)),
    linkTarget: type === 'symlink' ? rawLink : type === 'hardlink' ? normalizeTarPath(rawLink) : undefined,
    devMajor: type === 'char' || type === 'block' ? readNumber(block, 329, 8) : 0,
    devMinor: type === 'char' || type === 'block' ? readNumber(block, 337, 8) : 0,
    xattrs,
    sparse,
  };
}

export function normalizeTarPath(raw: string): string {
  return raw
    .split('/')
    .filter((part) => part !== '' && part !== '.')
    .join('/');
}

/** Zero bytes that pad `size` content bytes to a whole block. */
export function paddingOf(size: number): Buffer {
  return Buffer.alloc(padded(size) - size);
}

export function padded(size: number): number {
  return Math.ceil(size / BLOCK) * BLOCK;
}

/**
 * Reads a tar stream entry by entry. After next() returned an entry, its content can be read
 * with content(); whatever is left unread is skipped by the following next().
 */
export class TarReader {
  /** Zero bytes after the last entry (end-of-archive blocks and record padding), once next() returned null. */
  endBytes = 0;
  private readonly source: ExactReader;
  private unread = 0;
  private unreadPadding = 0;
  private readonly globals: PaxGlobals = new Map();

  constructor(source: AsyncIterable<Buffer>) {
    this.source = new ExactReader(source);
  }

  async next(): Promise<TarEntry | null> {
    await this.skip(this.unread + this.unreadPadding);
    this.unread = 0;
    this.unreadPadding = 0;
    const blocks: Buffer[] = [];
    for (;;) {
      const block = await this.read(BLOCK);
      if (block.length === 0 && blocks.length === 0) throw new TarFormatError('tar stream ended without its end-of-archive blocks');
      if (block.length < BLOCK) throw new TarFormatError('tar stream ended inside a header');
      if (blocks.length === 0 && isZero(block)) {
        this.endBytes = BLOCK + (await this.drainZeros());
        return null;
      }
      blocks.push(block);
      const flag = String.fromCharCode(block[156]);
      if (!META_TYPES.has(flag)) break;
      const size = readNumber(block, 124, 12);
      const data = await this.read(padded(size));
      if (data.length < padded(size)) throw new TarFormatError(`tar stream ended inside a '${flag}' record`);
      blocks.push(data);
    }
    const entry = describeHeader(Buffer.concat(blocks), this.globals);
    this.unread = entry.size;
    this.unreadPadding = padded(entry.size) - entry.size;
    return entry;
  }

  /** The current entry's content in pieces of `pieceBytes` (the last may be shorter). */
  async *content(pieceBytes: number): AsyncGenerator<Buffer> {
    while (this.unread > 0) {
      const piece = await this.read(Math.min(pieceBytes, this.unread));
      if (piece.length === 0) throw new TarFormatError('tar stream ended inside an entry');
      this.unread -= piece.length;
      yield piece;
    }
  }

  private async drainZeros(): Promise<number> {
    let bytes = 0;
    for (;;) {
      const chunk = await this.read(64 * 1024);
      if (chunk.length === 0) return bytes;
      if (!isZero(chunk)) throw new TarFormatError('tar stream has data after its end-of-archive blocks');
      bytes += chunk.length;
    }
  }

  private async skip(bytes: number): Promise<void> {
    while (bytes > 0) {
      const chunk = await this.read(Math.min(bytes, 1024 * 1024));
      if (chunk.length === 0) throw new TarFormatError('tar stream ended inside an entry');
      bytes -= chunk.length;
    }
  }

  private read(bytes: number): Promise<Buffer> {
    return this.source.read(bytes);
  }
}

/** Reads a byte stream in pieces of the sizes asked for, however the stream is cut. */
export class ExactReader {
  private readonly source: AsyncIterator<Buffer>;
  private buffered: Buffer[] = [];
  private bufferedBytes = 0;
  private sourceDone = false;

  constructor(source: AsyncIterable<Buffer>) {
    this.source = source[Symbol.asyncIterator]();
  }

  /** Up to `bytes` bytes: fewer only at the end of the stream. */
  async read(bytes: number): Promise<Buffer> {
    while (this.bufferedBytes < bytes && !this.sourceDone) {
      const { value, done } = await this.source.next();
      if (done) this.sourceDone = true;
      else if (value.length > 0) {
        this.buffered.push(value);
        this.bufferedBytes += value.length;
      }
    }
    const take = Math.min(bytes, this.bufferedBytes);
    const all = this.buffered.length === 1 ? this.buffered[0] : Buffer.concat(this.buffered);
    const out = all.subarray(0, take);
    const rest = all.subarray(take);
    this.buffered = rest.length > 0 ? [rest] : [];
    this.bufferedBytes = rest.length;
    return out;
  }
}

/**
 * Expands a pax GNU.sparse 1.0 entry's stored content (map + data segments) into the file's
 * bytes, holes as zeros. `stored` yields the stored content in order.
 */
export async function* expandSparse(stored: AsyncIterable<Buffer>, realSize: number): AsyncGenerator<Buffer> {
  const iterator = stored[Symbol.asyncIterator]();
  let pending: Buffer = Buffer.alloc(0);
  const pull = async (): Promise<boolean> => {
    const { value, done } = await iterator.next();
    if (done) return false;
    pending = pending.length ? Buffer.concat([pending, value]) : value;
    return true;
  };
  // The map: decimal numbers, one per line: count, then offset and size of each segment.
  const numbers: number[] = [];
  let consumed = 0;
  let want = 1;
  while (numbers.length < want) {
    const newline = pending.indexOf(10, consumed);
    if (newline < 0) {
      if (!(await pull())) throw new TarFormatError('sparse map ends early');
      continue;
    }
    numbers.push(Number(pending.subarray(consumed, newline).toString('latin1')));
    consumed = newline + 1;
    if (numbers.length === 1) want = 1 + 2 * numbers[0];
  }
  const mapBytes = padded(consumed);
  while (pending.length < mapBytes) if (!(await pull())) throw new TarFormatError('sparse map ends early');
  pending = pending.subarray(mapBytes);

  let position = 0;
  for (let i = 0; i < numbers[0]; i++) {
    const offset = numbers[1 + 2 * i];
    let left = numbers[2 + 2 * i];
    if (offset > position) yield* zeros(offset - position);
    position = offset + left;
    while (left > 0) {
      if (pending.length === 0 && !(await pull())) throw new TarFormatError('sparse data ends early');
      const take = pending.subarray(0, left);
      pending = pending.subarray(take.length);
      left -= take.length;
      yield take;
    }
  }
  if (realSize > position) yield* zeros(realSize - position);
}

function* zeros(bytes: number): Generator<Buffer> {
  const piece = Buffer.alloc(Math.min(bytes, 1024 * 1024));
  for (let left = bytes; left > 0; left -= piece.length) yield left >= piece.length ? piece : piece.subarray(0, left);
}

function verifyChecksum(block: Buffer, at: number): void {
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 32 : block[i];
  const recorded = readNumber(block, 148, 8);
  if (recorded !== sum) throw new TarFormatError(`tar header at byte ${at} has a wrong checksum (${recorded}, computed ${sum}): not a tar stream, or damaged`);
}

/** Octal ASCII, or GNU base-256 (high bit of the first byte set) for values too big for octal. */
function readNumber(block: Buffer, offset: number, length: number): number {
  const field = block.subarray(offset, offset + length);
  if (field[0] & 0x80) {
    let value = field[0] & 0x7f;
    for (let i = 1; i < length; i++) value = value * 256 + field[i];
    return value;
  }
  const text = cString(field).trim();
  return text === '' ? 0 : parseInt(text, 8);
}

/** pax records: "LENGTH KEY=VALUE\n", LENGTH in bytes counting the whole record. */
function parsePax(data: Buffer, into: Map<string, Buffer>): void {
  let at = 0;
  while (at < data.length && data[at] !== 0) {
    const space = data.indexOf(32, at);
    const length = Number(data.subarray(at, space).toString('latin1'));
    if (space < 0 || !Number.isInteger(length) || length <= 0) throw new TarFormatError('malformed pax record');
    const record = data.subarray(space + 1, at + length - 1);
    const equals = record.indexOf(61);
    into.set(record.subarray(0, equals).toString('utf8'), Buffer.from(record.subarray(equals + 1)));
    at += length;
  }
}

function numberOr(text: string | undefined, fallback: () => number): number {
  return text === undefined ? fallback() : Number(text);
}

function cString(field: Buffer): string {
  const end = field.indexOf(0);
  return field.subarray(0, end < 0 ? field.length : end).toString('utf8');
}

function isZero(buffer: Buffer): boolean {
  for (let i = 0; i < buffer.length; i++) if (buffer[i] !== 0) return false;
  return true;
}
