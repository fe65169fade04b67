/**
 * The framing of a chunked body (RFC 9112 7.1), read from the bytes as they come, across reads,
 * by an upstream connection (upstream-connection.ts): chunk-size lines (hex, at most 12 digits,
 * then optional whitespace and an extension, which is skipped), the CRLF after each chunk's
 * data, the last chunk and the trailer section (skipped: node's server does not pass trailers on
 * either). Byte by byte, with no string or regex per line: this runs for most answers of node
 * servers, which chunk every answer that has no Content-Length.
 */
import { UpstreamSocketError } from './upstream-request.js';

/** A chunk-size line (extension included) or a trailer section longer than this is refused. */
const MAX_FRAMING_BYTES = 64 * 1024;
const CR = 0x0d;
const LF = 0x0a;

type Phase =
  /** Hex digits of a chunk size. */
  | 'digits'
  /** After the digits: whitespace, then `;` (an extension) or CR. */
  | 'after-digits'
  | 'extension'
  /** The CR that ends a chunk-size line came; LF must follow. */
  | 'size-lf'
  /** The chunk's data, `remaining` bytes of it. */
  | 'data'
  /** The CRLF after a chunk's data: `matched` bytes of it came. */
  | 'data-end'
  /** After the last chunk: skipped up to an empty line, `matched` bytes of CRLF CRLF came. */
  | 'trailers'
  | 'done';

export class ChunkedFraming {
  private phase: Phase = 'digits';
  /** Data bytes of the current chunk still to come. */
  remaining = 0;
  private digits = 0;
  private size = 0;
  private matched = 0;
  /** Bytes of the current chunk-size line or trailer section so far. */
  private lineBytes = 0;

  constructor(
    /** The upstream, for errors. */
    private readonly from: string,
  ) {}

  /** Chunk data is next (`remaining` bytes of it). */
  get inData(): boolean {
    return this.phase === 'data';
  }

  /** The last chunk and the trailers came: the body is complete. */
  get done(): boolean {
    return this.phase === 'done';
  }

  /** A new body begins. */
  reset(): void {
    this.phase = 'digits';
    this.remaining = 0;
    this.digits = 0;
    this.size = 0;
    this.matched = 0;
    this.lineBytes = 0;
  }

  /** `count` bytes of the current chunk's data were passed on. */
  consumed(count: number): void {
    this.remaining -= count;
    if (this.remaining === 0) {
      this.phase = 'data-end';
      this.matched = 0;
    }
  }

  /**
   * Reads framing bytes from `chunk` at `at`, up to the next chunk data, the end of the body, or
   * the end of `chunk`; returns the offset after what it read. Throws on bad framing.
   */
  read(chunk: Buffer, at: number): number {
    const end = chunk.length;
    while (at < end) {
      const c = chunk[at];
      switch (this.phase) {
        case 'digits': {
          const value = hexValue(c);
          if (value >= 0) {
            if (++this.digits > 12) throw this.bad('chunk size');
            this.size = this.size * 16 + value;
            break;
          }
          if (this.digits === 0) throw this.bad('chunk size');
          this.phase = 'after-digits';
          continue; // the same byte, read in the next phase
        }
        case 'after-digits':
          if (c === 0x3b) this.phase = 'extension';
          else if (c === CR) this.phase = 'size-lf';
          else if (c !== 0x20 && c !== 0x09) throw this.bad('chunk size');
          break;
        case 'extension':
          if (c === CR) this.phase = 'size-lf';
          else if (c === LF) throw this.bad('chunk extension');
          break;
        case 'size-lf':
          if (c !== LF) throw this.bad('chunk size');
          if (this.size === 0) {
            // Trailers, if any, end with an empty line; with none, that empty line comes at once.
            this.phase = 'trailers';
            this.matched = 2;
            this.lineBytes = -1;
            break;
          }
          at++;
          this.lineBytes = 0;
          this.phase = 'data';
          this.remaining = this.size;
          this.digits = 0;
          this.size = 0;
          return at;
        case 'data-end':
          if (c !== (this.matched === 0 ? CR : LF)) throw this.bad('chunk end');
          if (++this.matched === 2) {
            this.phase = 'digits';
            this.lineBytes = -1;
          }
          break;
        case 'trailers':
          if (c === (this.matched % 2 === 0 ? CR : LF)) this.matched++;
          else this.matched = c === CR ? 1 : 0;
          if (this.matched === 4) {
            this.phase = 'done';
            return at + 1;
          }
          break;
        default:
          // data, done: not framing.
          return at;
      }
      if (++this.lineBytes > MAX_FRAMING_BYTES) throw new UpstreamSocketError(`${this.from} sent a chunk-size line or trailer section over ${MAX_FRAMING_BYTES} bytes`, 'EPROTO');
      at++;
    }
    return at;
  }

  private bad(what: string): UpstreamSocketError {
    return new UpstreamSocketError(`bad ${what} in a chunked answer from ${this.from}`, 'EPROTO');
  }
}

function hexValue(c: number): number {
  if (c >= 0x30 && c <= 0x39) return c - 0x30;
  const lower = c | 0x20;
  return lower >= 0x61 && lower <= 0x66 ? lower - 0x61 + 10 : -1;
}
