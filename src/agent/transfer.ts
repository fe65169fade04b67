/**
 * Directory trees between agents: CRIU image directories and overlay upper layers travel
 * as GNU tar archives over HTTP, checksummed end to end.
 *
 * The source streams the archive as a chunked response and, only after tar has exited cleanly,
 * sends the sha256 and length of what it sent as HTTP trailers. The target extracts while
 * hashing into a `.partial-*` sibling and moves the tree into place only when its hash matches
 * the trailer. A failing source destroys the response instead of ending it, so a cut
 * connection, a source-side tar failure or corrupted bytes all surface as TransferFailedError,
 * never as a silently short tree.
 *
 * Trailers: undici fills `ResponseData.trailers` once the body has been consumed, and Node's
 * `res.addTrailers` sends them on chunked responses (checked by test/unit/transfer.test.ts).
 */
import { spawn, type ChildProcess, type StdioOptions } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { lstat, mkdir, readdir, rename, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Transform, type Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { FastifyReply } from 'fastify';
import { request, type Dispatcher } from 'undici';
import { ChipmunkError, InvalidInputError, NotFoundError, TransferFailedError, errorFromJSON, type ErrorJSON } from '../shared/errors.js';
import { lastLines } from '../shared/exec.js';
import { removeTree } from '../shared/remove-tree.js';
import { BYTES_TRAILER, SHA256_TRAILER, TAR_FLAGS } from '../shared/tree-archive.js';

const PROGRESS_EVERY_BYTES = 64 * 1024;
const PROGRESS_EVERY_MS = 100;
const DEFAULT_STALL_TIMEOUT_MS = 60_000;

export interface TransferResult {
  /** Bytes of the tar stream. */
  bytes: number;
  /** sha256 of the tar stream, hex. */
  sha256: string;
}

export interface ServeTreeOptions {
  /** Cumulative bytes sent so far. */
  onProgress?(bytes: number): void;
  /**
   * Fault injection for tests: destroy the connection once this many bytes have been sent.
   * The agent sets it from CHIPMUNK_FAULT_CUT_TRANSFER_AFTER.
   */
  cutAfterBytes?: number;
}

/**
 * Answers a request with the tar archive of `dir`. Resolves once the whole archive and its
 * checksum trailers have been sent; rejects with TransferFailedError when tar fails, the client
 * goes away or the fault-injection cut fires, after destroying the response. A missing `dir`
 * throws NotFoundError before anything is sent, so the client gets a proper error body.
 */
export async function serveTree(reply: FastifyReply, dir: string, opts: ServeTreeOptions = {}): Promise<TransferResult> {
  await requireDirectory(dir);
  reply.hijack();
  const res = reply.raw;
  const tar = startTar(['-C', dir, '-cf', '-', ...TAR_FLAGS, '.'], ['ignore', 'pipe', 'pipe']);
  const tally = new StreamTally(opts.onProgress);
  let sent: TransferResult | undefined;

  const meter = new Transform({
    transform(chunk: Buffer, _encoding, done) {
      const cutAt = opts.cutAfterBytes;
      if (cutAt !== undefined && tally.bytes + chunk.length >= cutAt) {
        const head = chunk.subarray(0, Math.max(0, cutAt - tally.bytes));
        tally.add(head);
        this.push(head);
        done(new TransferFailedError(`sending ${dir} cut after ${cutAt} bytes by fault injection`, { dir, bytes: tally.bytes }));
        return;
      }
      tally.add(chunk);
      done(null, chunk);
    },
    // tar's exit status is known only after its last byte; the trailers (and the response's
    // end) must wait for it, or a failing tar would look like a complete archive.
    flush(done) {
      void tar.exited.then((exit) => {
        if (!exit.ok) {
          done(new TransferFailedError(`tar of ${dir} failed: ${exit.why}`, { dir, bytes: tally.bytes }));
          return;
        }
        sent = tally.finish();
        res.addTrailers({ [SHA256_TRAILER]: sent.sha256, [BYTES_TRAILER]: String(sent.bytes) });
        done();
      });
    },
  });

  res.writeHead(200, { 'content-type': 'application/x-tar', trailer: `${SHA256_TRAILER}, ${BYTES_TRAILER}` });
  try {
    await pipeline(tar.child.stdout!, meter, res);
  } catch (err) {
    tar.child.kill('SIGKILL');
    if (err instanceof TransferFailedError) throw err;
    throw new TransferFailedError(`sending ${dir} stopped after ${tally.bytes} bytes: ${messageOf(err)}`, { dir, bytes: tally.bytes }, err);
  }
  return sent!;
}

export interface FetchTreeOptions {
  /** A serveTree endpoint, e.g. http://node2:7070/v1/migrations/ID/images.tar. */
  url: string;
  token: string;
  /** Must not exist or be an empty directory; its parents are created. */
  dest: string;
  /** Cumulative bytes received so far. */
  onProgress?(bytes: number): void;
  /**
   * Longest the source may stay silent (before the headers or between body chunks). Not a
   * limit on the whole transfer, which takes as long as the tree's size needs. Default 60 s.
   */
  timeoutMs?: number;
  signal?: AbortSignal;
}

/**
 * Downloads a tree served by serveTree into `dest`. Either the whole tree lands at `dest` with
 * a verified checksum, or TransferFailedError is thrown and nothing is left behind. A `dest`
 * that holds anything is refused up front with InvalidInputError.
 */
export async function fetchTree(opts: FetchTreeOptions): Promise<TransferResult> {
  await requireAbsentOrEmpty(opts.dest);
  const partial = `${opts.dest}.partial-${randomBytes(6).toString('hex')}`;
  await mkdir(partial, { recursive: true });
  try {
    const received = await receiveInto(partial, opts);
    // rename(2) replaces an empty directory, which is the only kind of dest allowed here.
    await rename(partial, opts.dest);
    return received;
  } catch (err) {
    await removeTree(partial);
    throw err;
  }
}

/**
 * fetchTree from each of `urls` in turn (a checkpoint's replicas) until one arrives whole: a
 * corrupt or missing chunk on one store, or a dead host, falls through to the next. A failed
 * fetch leaves nothing at dest, so the next starts clean. The last failure is thrown.
 */
export async function fetchTreeFromAny(urls: string[], opts: Omit<FetchTreeOptions, 'url'>, onFallThrough?: (url: string, err: TransferFailedError) => void): Promise<TransferResult & { url: string }> {
  for (const [index, url] of urls.entries()) {
    try {
      return { ...(await fetchTree({ ...opts, url })), url };
    } catch (err) {
      const failed = err instanceof TransferFailedError ? err : new TransferFailedError(`fetching ${url} failed: ${messageOf(err)}`, { url }, err);
      if (index === urls.length - 1) throw failed;
      onFallThrough?.(url, failed);
    }
  }
  throw new TransferFailedError('no URL to fetch the tree from', {});
}

async function receiveInto(dir: string, opts: FetchTreeOptions): Promise<TransferResult> {
  const { url } = opts;
  const timeoutMs = opts.timeoutMs ?? DEFAULT_STALL_TIMEOUT_MS;
  let res: Dispatcher.ResponseData;
  try {
    res = await request(url, {
      headers: { authorization: `Bearer ${opts.token}` },
      signal: opts.signal,
      headersTimeout: timeoutMs,
      bodyTimeout: timeoutMs,
    });
  } catch (err) {
    throw new TransferFailedError(`cannot fetch ${url}: ${messageOf(err)}`, { url }, err);
  }
  if (res.statusCode !== 200) {
    const remote = await remoteErrorOf(res);
    throw new TransferFailedError(`${url} answered HTTP ${res.statusCode}: ${remote.message}`, { url, status: res.statusCode }, remote);
  }

  const tar = startTar(['-C', dir, '-xf', '-', ...TAR_FLAGS], ['pipe', 'ignore', 'pipe']);
  const tarInput = tar.child.stdin!;
  // A write error (EPIPE) only means tar stopped reading; its exit status says why.
  tarInput.on('error', () => {});
  const tally = new StreamTally(opts.onProgress);
  let tarFailedEarly = false;
  let bodyError: unknown;
  try {
    for await (const chunk of res.body as AsyncIterable<Buffer>) {
      tally.add(chunk);
      if (tarInput.writable) {
        if (!tarInput.write(chunk)) await writableAgain(tarInput);
        continue;
      }
      // tar exits once it has read the end-of-archive record, which can be before the body
      // ends (trailers or padding still in flight); Node then closes its stdin. The rest still
      // counts for the checksum. A tar that failed ends the transfer here instead.
      if (!(await tar.exited).ok) {
        tarFailedEarly = true;
        break;
      }
    }
  } catch (err) {
    // Cut, stalled or aborted: the archive is incomplete, so tar has nothing left to do.
    bodyError = err;
    tar.child.kill('SIGKILL');
  }
  tarInput.end();
  const exit = await tar.exited;
  const received = tally.finish();
  const expected: string | undefined = res.trailers[SHA256_TRAILER];
  const details = { url, bytes: received.bytes, expected, actual: received.sha256 };

  if (bodyError !== undefined) {
    throw new TransferFailedError(`transfer from ${url} broke off after ${received.bytes} bytes: ${messageOf(bodyError)}`, details, bodyError);
  }
  if (tarFailedEarly) throw new TransferFailedError(`extracting the archive from ${url} into ${opts.dest} failed: ${exit.why}`, details);
  if (expected === undefined) {
    throw new TransferFailedError(`transfer from ${url} ended without its ${SHA256_TRAILER} trailer: the source did not finish the archive`, details);
  }
  // Checked before tar's exit status: corrupt bytes are the cause of a tar failure, not the reverse.
  if (expected !== received.sha256 || res.trailers[BYTES_TRAILER] !== String(received.bytes)) {
    throw new TransferFailedError(
      `transfer from ${url} is corrupt: received ${received.bytes} bytes with sha256 ${received.sha256}, the source sent ${res.trailers[BYTES_TRAILER]} bytes with sha256 ${expected}`,
      details,
    );
  }
  if (!exit.ok) throw new TransferFailedError(`extracting the archive from ${url} into ${opts.dest} failed: ${exit.why}`, details);
  return received;
}

/**
 * Bytes of the regular files below `dir`: the expected size of a transfer, for progress in
 * percent. A sparse file counts its allocated bytes only, as that is what tar -S sends.
 */
export async function treeSize(dir: string): Promise<number> {
  const entries = await readdir(dir, { withFileTypes: true });
  const sizes = await Promise.all(
    entries.map(async (entry) => {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) return treeSize(path);
      if (!entry.isFile()) return 0;
      const st = await lstat(path);
      return Math.min(st.size, st.blocks * 512);
    }),
  );
  return sizes.reduce((sum, size) => sum + size, 0);
}

/** Counts and hashes a stream's bytes and reports progress, throttled. */
class StreamTally {
  bytes = 0;
  private readonly hash = createHash('sha256');
  private reportedBytes = 0;
  private reportedAt = Date.now();

  constructor(private readonly onProgress?: (bytes: number) => void) {}

  add(chunk: Buffer): void {
    this.hash.update(chunk);
    this.bytes += chunk.length;
    const now = Date.now();
    if (this.bytes - this.reportedBytes >= PROGRESS_EVERY_BYTES || now - this.reportedAt >= PROGRESS_EVERY_MS) this.report(now);
  }

  /** Reports the final total (so the last progress call equals the result) and digests. */
  finish(): TransferResult {
    if (this.bytes !== this.reportedBytes) this.report(Date.now());
    return { bytes: this.bytes, sha256: this.hash.digest('hex') };
  }

  private report(now: number): void {
    this.reportedBytes = this.bytes;
    this.reportedAt = now;
    this.onProgress?.(this.bytes);
  }
}

interface TarProcess {
  child: ChildProcess;
  /** Never rejects: a tar that cannot start or fails is `ok: false` with its complaint. */
  exited: Promise<{ ok: boolean; why: string }>;
}

/** Resolves when `stream` takes writes again, or is gone (tar exited). */
function writableAgain(stream: Writable): Promise<void> {
  return new Promise((resolve) => {
    const settle = () => {
      stream.off('drain', settle);
      stream.off('close', settle);
      resolve();
    };
    stream.on('drain', settle);
    stream.on('close', settle);
  });
}

function startTar(args: string[], stdio: StdioOptions): TarProcess {
  const child = spawn('tar', args, { stdio });
  let stderr = '';
  child.stderr!.on('data', (data: Buffer) => {
    stderr = (stderr + data.toString()).slice(-4096);
  });
  const exited = new Promise<{ ok: boolean; why: string }>((resolve) => {
    child.once('error', (err) => resolve({ ok: false, why: `cannot run tar: ${err.message}` }));
    child.once('close', (code, signal) => {
      resolve({ ok: code === 0, why: lastLines(stderr, 6) || (signal ? `killed by ${signal}` : `exit code ${code}`) });
    });
  });
  return { child, exited };
}

async function requireDirectory(dir: string): Promise<void> {
  const st = await stat(dir).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') throw new NotFoundError(`no directory ${dir} to send`, { dir });
    throw err;
  });
  if (!st.isDirectory()) throw new InvalidInputError(`${dir} is not a directory, cannot send it as a tree`, { dir });
}

async function requireAbsentOrEmpty(dest: string): Promise<void> {
  let entries: string[];
  try {
    entries = await readdir(dest);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return;
    if (code === 'ENOTDIR') throw new InvalidInputError(`${dest} exists and is not a directory: pick a new destination`, { dest });
    throw err;
  }
  if (entries.length > 0) {
    throw new InvalidInputError(`${dest} is not empty: a fetched tree replaces its destination and is never merged; remove it or pick a new one`, {
      dest,
      entries: entries.length,
    });
  }
}

async function remoteErrorOf(res: Dispatcher.ResponseData): Promise<ChipmunkError> {
  const text = await res.body.text().catch(() => '');
  try {
    const parsed = JSON.parse(text) as ErrorJSON;
    if (parsed && typeof parsed.code === 'string') return errorFromJSON(parsed, res.statusCode);
  } catch {
    // not one of our error bodies: kept as text below
  }
  return new ChipmunkError('CHIPMUNK_INTERNAL', text.slice(0, 300) || `HTTP ${res.statusCode}`, { status: res.statusCode });
}

function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
