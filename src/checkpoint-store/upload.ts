/**
 * The agent's side of a checkpoint upload: tar each part directory (the flags of
 * src/agent/transfer.ts), hash its content into 4 KiB chunks, ask the store which chunks it
 * lacks, send only those, commit.
 *
 * Each part is read twice (hash pass, then send pass) rather than holding a 1 GB image in
 * memory; the part directories must not change in between (the container stays frozen or the
 * directories are a finished dump). A chunk whose bytes differ on the second pass fails the
 * upload instead of storing a checkpoint that mixes two states.
 */
import { spawn } from 'node:child_process';
import { Readable } from 'node:stream';
import { request } from 'undici';
import { TAR_FLAGS } from '../agent/transfer.js';
import { ChipmunkError, TransferFailedError, UnavailableError, errorFromJSON, type ErrorJSON } from '../shared/errors.js';
import { lastLines } from '../shared/exec.js';
import { ApiClient } from '../shared/http.js';
import { CHUNK_BYTES, HASH_BYTES, encodeManifest, scanTar, sha256, type PartManifest } from './manifest.js';
import type { CheckpointInfo, CreateUploadRequest, CreateUploadResponse, LogPosition } from './protocol.js';
import { TarReader } from './tar.js';

export interface UploadCheckpointOptions {
  /** Base URL of the server the store's routes are mounted on, e.g. http://controller:7000. */
  storeUrl: string;
  token: string;
  container: string;
  /** Directories to store, each as a named part (criu, files). */
  parts: { name: string; dir: string }[];
  /** When the checkpoint was taken, ms since the epoch; now by default. */
  time?: number;
  logPosition?: LogPosition | null;
  metadata: Record<string, unknown>;
  /** Called once every chunk is sent, right before the commit (fault injection hooks in here). */
  beforeCommit?: () => Promise<void>;
  /** Per request; the chunk request gets no timeout beyond undici's idle ones. */
  timeoutMs?: number;
}

export interface UploadedCheckpoint extends CheckpointInfo {
  /** Chunk bytes sent over the network (the rest the store already had). */
  sentBytes: number;
}

export async function uploadCheckpoint(opts: UploadCheckpointOptions): Promise<UploadedCheckpoint> {
  const api = new ApiClient({ baseUrl: opts.storeUrl, token: opts.token, timeoutMs: opts.timeoutMs, peer: 'checkpoint store' });
  const manifests: PartManifest[] = [];
  for (const part of opts.parts) manifests.push((await scanTar(tarOf(part.dir))).manifest);

  const body: CreateUploadRequest = {
    parts: opts.parts.map((part, index) => ({ name: part.name, manifest: encodeManifest(manifests[index]).toString('base64') })),
    time: opts.time ?? Date.now(),
    logPosition: opts.logPosition ?? null,
    metadata: opts.metadata,
  };
  const upload = await api.post<CreateUploadResponse>(`/v1/checkpoints/${opts.container}/uploads`, body);
  try {
    let sentBytes = 0;
    if (upload.missingChunks > 0) {
      const missing = Buffer.from(upload.missing, 'base64');
      const frames = missingFrames(opts.parts, manifests, missing, (bytes) => (sentBytes += bytes));
      await putChunks(`${api.baseUrl}/v1/checkpoints/uploads/${upload.uploadId}/chunks`, opts.token, frames);
    }
    await opts.beforeCommit?.();
    const info = await api.post<CheckpointInfo>(`/v1/checkpoints/uploads/${upload.uploadId}/commit`);
    return { ...info, sentBytes };
  } catch (err) {
    // Frees the chunks sent so far now rather than at the store's upload timeout.
    await api.delete(`/v1/checkpoints/uploads/${upload.uploadId}`).catch(() => {});
    throw err;
  }
}

/** Second pass: the frames of the chunks the bitmap asks for, checked against the first pass. */
async function* missingFrames(parts: { name: string; dir: string }[], manifests: PartManifest[], missing: Buffer, onSent: (bytes: number) => void): AsyncGenerator<Buffer> {
  let position = 0;
  for (const [index, part] of parts.entries()) {
    const reader = new TarReader(tarOf(part.dir));
    for (const { entry: recorded, hashes } of manifests[index].entries) {
      const entry = await reader.next();
      if (!entry || entry.path !== recorded.path || entry.size !== recorded.size) {
        throw new TransferFailedError(`${part.dir} changed during the checkpoint upload (at ${recorded.path}): upload a directory that stays as it is`, { dir: part.dir });
      }
      const chunks = hashes.length / HASH_BYTES;
      const wanted = (i: number) => (missing[(position + i) >> 3] & (0x80 >> ((position + i) & 7))) !== 0;
      let i = 0;
      for await (const chunk of reader.content(CHUNK_BYTES)) {
        if (wanted(i)) {
          const hash = hashes.subarray(i * HASH_BYTES, (i + 1) * HASH_BYTES);
          if (!sha256(chunk).equals(hash)) {
            throw new TransferFailedError(`${part.dir}/${entry.path} changed during the checkpoint upload: upload a directory that stays as it is`, { dir: part.dir, path: entry.path });
          }
          const head = Buffer.alloc(HASH_BYTES + 4);
          hash.copy(head);
          head.writeUInt32BE(chunk.length, HASH_BYTES);
          onSent(chunk.length);
          yield head;
          yield chunk;
        }
        i++;
      }
      position += chunks;
    }
    // Reads to the end of the archive, so tar's exit status is checked.
    if (await reader.next()) throw new TransferFailedError(`${part.dir} changed during the checkpoint upload (new entries): upload a directory that stays as it is`, { dir: part.dir });
  }
}

async function putChunks(url: string, token: string, frames: AsyncIterable<Buffer>): Promise<void> {
  let res;
  try {
    res = await request(url, {
      method: 'PUT',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/octet-stream' },
      body: Readable.from(frames),
    });
  } catch (err) {
    if (err instanceof ChipmunkError) throw err;
    throw new UnavailableError(`sending checkpoint chunks to ${url} failed: ${(err as Error).message}`, { url }, err);
  }
  const text = await res.body.text();
  if (res.statusCode < 400) return;
  let parsed: ErrorJSON | undefined;
  try {
    parsed = JSON.parse(text) as ErrorJSON;
  } catch {
    // not one of our error bodies: described below
  }
  if (parsed && typeof parsed.code === 'string') throw errorFromJSON(parsed, res.statusCode);
  throw new TransferFailedError(`checkpoint store answered HTTP ${res.statusCode} to the chunks: ${text.slice(0, 300)}`, { url });
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
