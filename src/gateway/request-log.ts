/**
 * A route's durable request log (docs/gateway.md, "Request log"): every request of a logged
 * route is appended here, and synced to disk, before it is forwarded. After a node dies the
 * container is restored from a checkpoint taken at a known position of this log, and the
 * requests after that position are sent to it again, in order.
 *
 * Layout: `<dir>/` holds segment files named after the seq of their first record (20 digits,
 * so names sort like numbers). A record on disk is `u32 length | u32 crc32 | payload`, all
 * little-endian; the payload is `u32 metaLength | meta JSON {seq, time, method, url, headers} |
 * body bytes`. A crash can leave a torn record at the end of the newest segment: open() finds
 * it (short or bad crc) and truncates the file there. A bad record anywhere else is corruption
 * and stops open().
 *
 * Group commit: appends that arrive while a write+fdatasync runs are written and synced
 * together by the next one, so under load one fdatasync serves many requests.
 *
 * Seqs are monotonic per log and survive restarts, trims included: trim rolls to a new (empty)
 * segment named after the next seq before it deletes the old ones, so the name carries the seq on.
 *
 * Identity: `<dir>/log-id` holds a random id made when the log is created (or first opened by
 * this version). A position is {logId, seq}: a log deleted and created again starts its seqs
 * over, and its new id tells a position of the old one apart.
 */
import { mkdir, open, readdir, rm, unlink, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { syncDirectory } from '../shared/durable.js';
import { StoreFailedError } from '../shared/errors.js';
import { logIdOf } from './log-identity.js';

/** A request as it is forwarded upstream. */
export interface LoggedRequest {
  method: string;
  /** Path and query. */
  url: string;
  /** Raw header list [name, value, ...] as sent upstream (hop-by-hop headers removed). */
  headers: string[];
  body: Buffer | null;
}

export interface LogRecord extends LoggedRequest {
  seq: number;
  /** When it was appended, ms since the epoch. */
  time: number;
}

export interface RequestLogOptions {
  /** A segment is closed and a new one started once it is this large (64 MiB). */
  segmentBytes?: number;
  /** Told after every synced batch: how many records it carried and how long write+sync took. */
  onBatch?: (records: number, seconds: number) => void;
  /** Makes a segment's written bytes durable; the tests slow it down or count it. */
  datasync?: (file: FileHandle) => Promise<void>;
}

/** What GET /v1/routes/:name shows of a log. Records firstSeq..lastSeq are readable (none if firstSeq > lastSeq). */
export interface RequestLogState {
  logId: string;
  firstSeq: number;
  lastSeq: number;
  bytes: number;
}

const FRAME_HEADER = 8;
const META_LENGTH = 4;
/** A length field beyond this is garbage, not a record (bodies are bounded far below). */
const MAX_RECORD_BYTES = 1024 * 1024 * 1024;
const DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024;
const SEGMENT_NAME = /^(\d{20})\.log$/;

interface Segment {
  /** Seq of its first record (or of the next record appended, if it is empty). */
  firstSeq: number;
  path: string;
  /** Bytes written and synced. */
  bytes: number;
}

interface PendingAppend {
  seq: number;
  frame: Buffer;
  resolve(seq: number): void;
  reject(err: Error): void;
}

export class RequestLog {
  /** Oldest first; the last one is the one appended to. */
  private readonly segments: Segment[];
  private active: FileHandle;
  private nextSeq: number;
  private durableSeq: number;
  /** Records up to this seq were trimmed (some may still sit in a segment shared with newer ones). */
  private trimmedThrough: number;
  private pending: PendingAppend[] = [];
  private flushing?: Promise<void>;
  /** Batches and segment changes (roll, trim) run one at a time: a batch is written and synced to one file. */
  private exclusive: Promise<unknown> = Promise.resolve();
  /** A write or sync failed: what is on disk past the last good batch is unknown until a restart truncates it. */
  private failure?: StoreFailedError;
  private closed = false;

  private constructor(
    readonly dir: string,
    /** This log's identity, part of every position in it. */
    readonly id: string,
    private readonly opts: Required<RequestLogOptions>,
    segments: Segment[],
    active: FileHandle,
    lastSeq: number,
  ) {
    this.segments = segments;
    this.active = active;
    this.nextSeq = lastSeq + 1;
    this.durableSeq = lastSeq;
    this.trimmedThrough = segments[0].firstSeq - 1;
  }

  /** Opens the log in `dir` (created if absent), truncating a torn record at its end. */
  static async open(dir: string, options: RequestLogOptions = {}): Promise<RequestLog> {
    const opts: Required<RequestLogOptions> = {
      segmentBytes: options.segmentBytes ?? DEFAULT_SEGMENT_BYTES,
      onBatch: options.onBatch ?? (() => undefined),
      datasync: options.datasync ?? ((file) => file.datasync()),
    };
    try {
      await mkdir(dir, { recursive: true });
      const id = await logIdOf(dir);
      const segments = (await readdir(dir))
        .map((name) => SEGMENT_NAME.exec(name))
        .filter((match): match is RegExpExecArray => match !== null)
        .map((match) => ({ firstSeq: Number(match[1]), path: join(dir, match[0]), bytes: 0 }))
        .sort((a, b) => a.firstSeq - b.firstSeq);
      let lastSeq = 0;
      for (const [index, segment] of segments.entries()) {
        const newest = index === segments.length - 1;
        const scan = await scanSegment(segment, lastSeq);
        if (scan.tornAt !== undefined && !newest) {
          throw new StoreFailedError(`request log segment ${segment.path} is corrupt at byte ${scan.tornAt} (not at the end of the log): move the route's log away to start a new one`);
        }
        segment.bytes = scan.tornAt ?? scan.bytes;
        lastSeq = Math.max(scan.lastSeq, segment.firstSeq - 1);
      }
      if (segments.length === 0) segments.push({ firstSeq: 1, path: join(dir, segmentName(1)), bytes: 0 });
      const newest = segments[segments.length - 1];
      const active = await open(newest.path, 'a+');
      // A torn tail is cut off, and the cut synced, before anything is appended after it.
      await active.truncate(newest.bytes);
      await active.datasync();
      await syncDirectory(dir);
      return new RequestLog(dir, id, opts, segments, active, lastSeq);
    } catch (err) {
      if (err instanceof StoreFailedError) throw err;
      throw new StoreFailedError(`cannot open the request log in ${dir}`, err);
    }
  }

  /** Why appends are refused, if a write or sync failed. */
  get failed(): StoreFailedError | undefined {
    return this.failure;
  }

  /** The highest seq on disk (0 if nothing was ever logged). */
  get lastSeq(): number {
    return this.durableSeq;
  }

  state(): RequestLogState {
    return { logId: this.id, firstSeq: this.trimmedThrough + 1, lastSeq: this.durableSeq, bytes: this.segments.reduce((sum, s) => sum + s.bytes, 0) };
  }

  /**
   * Appends `request` with the next seq; resolves with that seq once the record is on disk
   * (fdatasync'ed). Seqs follow the order of the calls.
   */
  append(request: LoggedRequest): Promise<number> {
    if (this.closed) return Promise.reject(new StoreFailedError(`the request log in ${this.dir} is closed`));
    if (this.failure) return Promise.reject(this.failure);
    const seq = this.nextSeq++;
    const frame = encodeRecord({ ...request, seq, time: Date.now() });
    return new Promise((resolve, reject) => {
      this.pending.push({ seq, frame, resolve, reject });
      this.flushing ??= this.flush();
    });
  }

  /** Resolves once every append made so far has settled. */
  async flushed(): Promise<void> {
    while (this.flushing) await this.flushing;
  }

  /** Records with seq > afterSeq, in seq order, up to what was on disk when each segment was reached. */
  async *read(afterSeq: number): AsyncGenerator<LogRecord> {
    const from = Math.max(afterSeq, this.trimmedThrough);
    const segments = [...this.segments];
    for (let i = 0; i < segments.length; i++) {
      const segment = segments[i];
      const next = segments[i + 1];
      if (next && next.firstSeq <= from + 1) continue;
      for await (const record of readSegment(segment.path, segment.bytes)) {
        if (record.seq > from) yield record;
      }
    }
  }

  /**
   * Drops every record with seq <= upToSeq: the segments holding only such records are deleted
   * (the one being appended to first gives way to a new one if it holds any of them: so a
   * segment holds the records between two trims, and goes one trim later).
   */
  async trim(upToSeq: number): Promise<void> {
    await this.flushed();
    await this.oneAtATime(async () => {
      const through = Math.min(upToSeq, this.durableSeq);
      if (through <= this.trimmedThrough) return;
      try {
        // The segment being appended to gives way to a new one whenever it holds records up to
        // `through`: it goes at the next trim past its end. Rolled only at the log's end, a log
        // under steady load (a checkpoint's position is always behind it) would never shrink,
        // and every replay would read it from its first record.
        const active = this.segments[this.segments.length - 1];
        if (active.bytes > 0 && active.firstSeq <= through) await this.roll();
        const doomed: Segment[] = [];
        while (this.segments.length > 1 && this.segments[1].firstSeq - 1 <= through) doomed.push(this.segments.shift() as Segment);
        for (const segment of doomed) await unlink(segment.path);
        if (doomed.length) await syncDirectory(this.dir);
      } catch (err) {
        throw new StoreFailedError(`cannot trim the request log in ${this.dir}`, err);
      }
      this.trimmedThrough = through;
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.flushed();
    this.closed = true;
    await this.active.close();
  }

  /** Closes the log and deletes its folder (the route was removed). */
  async destroy(): Promise<void> {
    await this.close();
    await rm(this.dir, { recursive: true, force: true });
  }

  /** Writes and syncs batches until nothing is pending: what arrives during one batch forms the next. */
  private async flush(): Promise<void> {
    while (this.pending.length) {
      const batch = this.pending;
      this.pending = [];
      const started = process.hrtime.bigint();
      try {
        await this.oneAtATime(async () => {
          if (this.failure) throw this.failure;
          const segment = this.segments[this.segments.length - 1];
          const bytes = Buffer.concat(batch.map((p) => p.frame));
          await writeFully(this.active, bytes, segment.bytes);
          await this.opts.datasync(this.active);
          segment.bytes += bytes.length;
          this.durableSeq = batch[batch.length - 1].seq;
        });
      } catch (err) {
        this.failure ??= new StoreFailedError(`cannot write the request log in ${this.dir}: requests on this route are refused until the gateway restarts`, err);
        for (const p of batch) p.reject(this.failure);
        continue;
      }
      this.opts.onBatch(batch.length, Number(process.hrtime.bigint() - started) / 1e9);
      for (const p of batch) p.resolve(p.seq);
      if (this.segments[this.segments.length - 1].bytes >= this.opts.segmentBytes) {
        await this.oneAtATime(() => this.roll()).catch((err: unknown) => {
          this.failure ??= new StoreFailedError(`cannot start a new request log segment in ${this.dir}: requests on this route are refused until the gateway restarts`, err);
        });
      }
    }
    this.flushing = undefined;
  }

  private oneAtATime<T>(step: () => Promise<T>): Promise<T> {
    const next = this.exclusive.then(step);
    this.exclusive = next.catch(() => undefined);
    return next;
  }

  /** Starts a new segment for the next seq; the old one is complete and synced. */
  private async roll(): Promise<void> {
    const segment: Segment = { firstSeq: this.durableSeq + 1, path: join(this.dir, segmentName(this.durableSeq + 1)), bytes: 0 };
    const file = await open(segment.path, 'a+');
    // The new name must be durable before any older segment is deleted: it carries the seq on.
    await syncDirectory(this.dir);
    const previous = this.active;
    this.active = file;
    this.segments.push(segment);
    await previous.close();
  }
}

function segmentName(firstSeq: number): string {
  return `${String(firstSeq).padStart(20, '0')}.log`;
}

function encodeRecord(record: LogRecord): Buffer {
  const meta = Buffer.from(JSON.stringify({ seq: record.seq, time: record.time, method: record.method, url: record.url, headers: record.headers }));
  const body = record.body ?? Buffer.alloc(0);
  const payloadLength = META_LENGTH + meta.length + body.length;
  const frame = Buffer.allocUnsafe(FRAME_HEADER + payloadLength);
  frame.writeUInt32LE(payloadLength, 0);
  frame.writeUInt32LE(meta.length, FRAME_HEADER);
  meta.copy(frame, FRAME_HEADER + META_LENGTH);
  body.copy(frame, FRAME_HEADER + META_LENGTH + meta.length);
  frame.writeUInt32LE(crc32(frame.subarray(FRAME_HEADER)), 4);
  return frame;
}

function decodePayload(payload: Buffer): LogRecord {
  const metaLength = payload.readUInt32LE(0);
  const meta = JSON.parse(payload.subarray(META_LENGTH, META_LENGTH + metaLength).toString()) as Omit<LogRecord, 'body'>;
  const body = payload.subarray(META_LENGTH + metaLength);
  return { seq: meta.seq, time: meta.time, method: meta.method, url: meta.url, headers: meta.headers, body: body.length ? Buffer.from(body) : null };
}

/** Reads the frame at `position`: the record, or undefined if it is short or fails its crc. */
async function readFrame(file: FileHandle, position: number, end: number): Promise<{ record: LogRecord; size: number } | undefined> {
  if (position + FRAME_HEADER > end) return undefined;
  const header = Buffer.alloc(FRAME_HEADER);
  await readFully(file, header, position);
  const length = header.readUInt32LE(0);
  if (length < META_LENGTH || length > MAX_RECORD_BYTES || position + FRAME_HEADER + length > end) return undefined;
  const payload = Buffer.alloc(length);
  await readFully(file, payload, position + FRAME_HEADER);
  if (crc32(payload) !== header.readUInt32LE(4)) return undefined;
  try {
    return { record: decodePayload(payload), size: FRAME_HEADER + length };
  } catch {
    return undefined;
  }
}

/** Checks every record of a segment: where the good records end, and where a bad one starts. */
async function scanSegment(segment: Segment, previousSeq: number): Promise<{ bytes: number; lastSeq: number; tornAt?: number }> {
  const file = await open(segment.path, 'r');
  try {
    const end = (await file.stat()).size;
    let position = 0;
    let lastSeq = previousSeq;
    while (position < end) {
      const frame = await readFrame(file, position, end);
      // A record whose seq does not follow is as bad as a torn one.
      if (!frame || frame.record.seq <= lastSeq) return { bytes: position, lastSeq, tornAt: position };
      lastSeq = frame.record.seq;
      position += frame.size;
    }
    return { bytes: position, lastSeq };
  } finally {
    await file.close();
  }
}

async function* readSegment(path: string, end: number): AsyncGenerator<LogRecord> {
  let file: FileHandle;
  try {
    file = await open(path, 'r');
  } catch (err) {
    // Trimmed away while this read was going: its records are no longer wanted.
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw new StoreFailedError(`cannot read the request log segment ${path}`, err);
  }
  try {
    for (let position = 0; position < end; ) {
      const frame = await readFrame(file, position, end);
      if (!frame) throw new StoreFailedError(`request log segment ${path} is corrupt at byte ${position}`);
      yield frame.record;
      position += frame.size;
    }
  } finally {
    await file.close();
  }
}

async function writeFully(file: FileHandle, bytes: Buffer, position: number): Promise<void> {
  for (let written = 0; written < bytes.length; ) {
    const { bytesWritten } = await file.write(bytes, written, bytes.length - written, position + written);
    written += bytesWritten;
  }
}

async function readFully(file: FileHandle, into: Buffer, position: number): Promise<void> {
  for (let read = 0; read < into.length; ) {
    const { bytesRead } = await file.read(into, read, into.length - read, position + read);
    if (bytesRead === 0) throw new StoreFailedError('request log segment ended early');
    read += bytesRead;
  }
}

