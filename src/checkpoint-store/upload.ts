/**
 * The agent's side of a checkpoint upload: tar each part directory (the flags of
 * src/shared/tree-archive.ts), hash its content into 4 KiB chunks, ask the store which chunks it
 * lacks, send only those, commit: on every replica of the store, or on none.
 *
 * Each part is read twice (hash pass, then send pass) rather than holding a 1 GB image in
 * memory; the part directories must not change in between (the container stays frozen or the
 * directories are a finished dump). A chunk whose bytes differ on the second pass fails the
 * upload instead of storing a checkpoint that mixes two states.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { PassThrough } from 'node:stream';
import { TAR_FLAGS } from '../shared/tree-archive.js';
import { TransferFailedError } from '../shared/errors.js';
import { lastLines } from '../shared/exec.js';
import { CHUNK_BYTES, HASH_BYTES, encodeManifest, scanTar, sha256, type PartManifest } from './manifest.js';
import { CheckpointStoreClient } from './client.js';
import type { CheckpointInfo, CheckpointReplica, CreateUploadRequest, LogPosition } from './protocol.js';
import { TarReader } from './tar.js';

export interface UploadCheckpointOptions {
  /** Base URL of the server the store's routes are mounted on, e.g. http://controller:7000. */
  storeUrl: string;
  /** Further store replicas: the checkpoint is committed on storeUrl and on each of these, or on none. */
  replicaUrls?: string[];
  token: string;
  container: string;
  /** Directories to store, each as a named part (criu, files). */
  parts: { name: string; dir: string }[];
  /** When the checkpoint was taken, ms since the epoch; now by default. */
  time?: number;
  logPosition?: LogPosition | null;
  metadata: Record<string, unknown>;
  /** Called once every chunk is sent to every replica, right before the commits (fault injection hooks in here). */
  beforeCommit?: () => Promise<void>;
  /** Per request; the chunk request gets no timeout beyond undici's idle ones. */
  timeoutMs?: number;
}

export interface UploadedCheckpoint extends CheckpointInfo {
  /** Chunk bytes sent over the network, to every replica together (the rest they already had). */
  sentBytes: number;
  /** The stores that committed it: storeUrl, then replicaUrls. */
  replicas: CheckpointReplica[];
}

/** An upload begun on one replica. */
interface ReplicaUpload {
  url: string;
  store: CheckpointStoreClient;
  uploadId: string;
  /** The chunks this replica lacks (CreateUploadResponse.missing), and how many. */
  missing: Buffer;
  missingChunks: number;
  sentBytes: number;
}

/**
 * Hashes the parts once, begins an upload on every replica (each answers which chunks it lacks:
 * its own deduplication), reads the parts a second time and once only, sending each chunk to the
 * replicas that lack it, all at the same time, and commits on all of them once all have every
 * chunk. A replica that fails undoes the others (uploads aborted, commits removed): the
 * checkpoint is on every replica or on none.
 */
export async function uploadCheckpoint(opts: UploadCheckpointOptions): Promise<UploadedCheckpoint> {
  const urls = [opts.storeUrl, ...(opts.replicaUrls ?? [])];
  const manifests: PartManifest[] = [];
  for (const part of opts.parts) manifests.push((await scanTar(tarOf(part.dir))).manifest);

  // One id on every replica: they hold the same checkpoint.
  const id = randomBytes(8).toString('hex');
  const body: CreateUploadRequest = {
    parts: opts.parts.map((part, index) => ({ name: part.name, manifest: encodeManifest(manifests[index]).toString('base64') })),
    time: opts.time ?? Date.now(),
    logPosition: opts.logPosition ?? null,
    metadata: opts.metadata,
    id,
  };
  const begin = async (url: string): Promise<ReplicaUpload> => {
    const store = new CheckpointStoreClient({ baseUrl: url, token: opts.token, timeoutMs: opts.timeoutMs });
    const upload = await store.beginUpload(opts.container, body);
    return { url, store, uploadId: upload.uploadId, missing: Buffer.from(upload.missing, 'base64'), missingChunks: upload.missingChunks, sentBytes: 0 };
  };
  // Frees the chunks sent so far now rather than at the store's upload timeout.
  const abort = (session: ReplicaUpload) => session.store.abortUpload(session.uploadId).catch(() => {});

  const begun = await Promise.allSettled(urls.map(begin));
  const sessions = begun.flatMap((outcome) => (outcome.status === 'fulfilled' ? [outcome.value] : []));
  const failed = begun.find((outcome) => outcome.status === 'rejected');
  if (failed) {
    await Promise.all(sessions.map(abort));
    throw failed.reason;
  }
  try {
    await sendMissing(opts, manifests, sessions);
    await opts.beforeCommit?.();
  } catch (err) {
    await Promise.all(sessions.map(abort));
    throw err;
  }
  const commits = await Promise.allSettled(sessions.map((session) => session.store.commitUpload(session.uploadId)));
  const refused = commits.find((outcome) => outcome.status === 'rejected');
  if (refused) {
    // Committed on some replicas only: it must count nowhere, so those copies go.
    await Promise.all(
      sessions.map((session, index) =>
        commits[index]!.status === 'fulfilled'
          ? session.store.remove(opts.container, id).catch(() => {})
          : abort(session),
      ),
    );
    throw refused.reason;
  }
  const info = (commits[0] as PromiseFulfilledResult<CheckpointInfo>).value;
  return { ...info, sentBytes: sessions.reduce((sum, session) => sum + session.sentBytes, 0), replicas: urls.map((url) => ({ url, state: 'intact' as const })) };
}

/** One read of the parts; each chunk goes to every replica that lacks it, one chunk request per replica. */
async function sendMissing(opts: UploadCheckpointOptions, manifests: PartManifest[], sessions: ReplicaUpload[]): Promise<void> {
  const pipes = sessions.map((session) => (session.missingChunks > 0 ? new PassThrough() : undefined));
  const sends = sessions.map((session, i) => (pipes[i] ? session.store.sendChunks(session.uploadId, pipes[i]) : Promise.resolve()));
  // Rejects as soon as one replica's request fails: the read must not wait on that replica's pipe.
  const anyFailed = Promise.race(sends.map((send) => send.then(() => new Promise<never>(() => {}))));
  anyFailed.catch(() => {});
  try {
    if (pipes.some(Boolean)) {
      for await (const frame of missingFrames(opts.parts, manifests, sessions.map((session) => session.missing))) {
        for (const i of frame.to) {
          const pipe = pipes[i]!;
          sessions[i]!.sentBytes += frame.chunk.length;
          const roomForHead = pipe.write(frame.head);
          if (!pipe.write(frame.chunk) || !roomForHead) await Promise.race([once(pipe, 'drain'), anyFailed]);
        }
      }
    }
    for (const pipe of pipes) pipe?.end();
  } catch (err) {
    for (const pipe of pipes) pipe?.destroy(err as Error);
    await Promise.allSettled(sends);
    throw err;
  }
  await Promise.all(sends);
}

/**
 * Second pass: each chunk some bitmap asks for, with its frame header and the replicas (bitmap
 * indices) that want it, checked against the first pass.
 */
async function* missingFrames(parts: { name: string; dir: string }[], manifests: PartManifest[], bitmaps: Buffer[]): AsyncGenerator<{ head: Buffer; chunk: Buffer; to: number[] }> {
  let position = 0;
  for (const [index, part] of parts.entries()) {
    const reader = new TarReader(tarOf(part.dir));
    for (const { entry: recorded, hashes } of manifests[index].entries) {
      const entry = await reader.next();
      if (!entry || entry.path !== recorded.path || entry.size !== recorded.size) {
        throw new TransferFailedError(`${part.dir} changed during the checkpoint upload (at ${recorded.path}): upload a directory that stays as it is`, { dir: part.dir });
      }
      const chunks = hashes.length / HASH_BYTES;
      let i = 0;
      for await (const chunk of reader.content(CHUNK_BYTES)) {
        const at = position + i;
        const to = bitmaps.flatMap((bitmap, replica) => ((bitmap[at >> 3]! & (0x80 >> (at & 7))) !== 0 ? [replica] : []));
        if (to.length > 0) {
          const hash = hashes.subarray(i * HASH_BYTES, (i + 1) * HASH_BYTES);
          if (!sha256(chunk).equals(hash)) {
            throw new TransferFailedError(`${part.dir}/${entry.path} changed during the checkpoint upload: upload a directory that stays as it is`, { dir: part.dir, path: entry.path });
          }
          const head = Buffer.alloc(HASH_BYTES + 4);
          hash.copy(head);
          head.writeUInt32BE(chunk.length, HASH_BYTES);
          yield { head, chunk, to };
        }
        i++;
      }
      position += chunks;
    }
    // Reads to the end of the archive, so tar's exit status is checked.
    if (await reader.next()) throw new TransferFailedError(`${part.dir} changed during the checkpoint upload (new entries): upload a directory that stays as it is`, { dir: part.dir });
  }
}

/** `dir` as the GNU tar stream transfer.ts would send; a failing tar throws at the end of the stream. */
async function* tarOf(dir: string): AsyncGenerator<Buffer> {
  const child = spawn('tar', ['-C', dir, '-cf', '-', ...TAR_FLAGS, '.'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (data: Buffer) => {
    stderr = (stderr + data.toString()).slice(-4096);
  });
  const exited = new Promise<string | undefined>((resolve) => {
    child.once('error', (err) => resolve(`cannot run tar: ${err.message}`));
    child.once('close', (code) => resolve(code === 0 ? undefined : lastLines(stderr, 6) || `exit code ${code}`));
  });
  try {
    yield* child.stdout as AsyncIterable<Buffer>;
    const failure = await exited;
    if (failure !== undefined) throw new TransferFailedError(`tar of ${dir} failed: ${failure}`, { dir });
  } finally {
    // A reader that stops early (an error elsewhere) must not leave tar blocked on its pipe.
    if (child.exitCode === null) child.kill('SIGKILL');
  }
}
