/**
 * Store-to-store copy of one checkpoint, to bring it back to its replica count after a replica
 * was lost. The copy is an ordinary upload to the receiving store, under the checkpoint's own
 * id: it asks for the chunks it lacks (its deduplication holds), the sending store streams them
 * verified against their hashes as it reads them, the receiving store verifies them again as it
 * stores them, and the commit makes the copy count there.
 */
import { Readable } from 'node:stream';
import { request } from 'undici';
import { ChipmunkError, TransferFailedError, UnavailableError, errorFromJSON, type ErrorJSON } from '../shared/errors.js';
import { ApiClient } from '../shared/http.js';
import type { CheckpointInfo, CreateUploadRequest, CreateUploadResponse } from './protocol.js';

export interface CopyCheckpointOptions {
  /** Base URLs of the sending and the receiving store. */
  from: string;
  to: string;
  token: string;
  container: string;
  id: string;
  /** Per request (not the chunk stream). */
  timeoutMs?: number;
}

export interface CopiedCheckpoint extends CheckpointInfo {
  /** Chunk bytes sent (the rest the receiving store already had). */
  sentBytes: number;
}

export async function copyCheckpoint(opts: CopyCheckpointOptions): Promise<CopiedCheckpoint> {
  const source = new ApiClient({ baseUrl: opts.from, token: opts.token, timeoutMs: opts.timeoutMs, peer: `checkpoint store ${opts.from}` });
  const target = new ApiClient({ baseUrl: opts.to, token: opts.token, timeoutMs: opts.timeoutMs, peer: `checkpoint store ${opts.to}` });
  const path = `/v1/checkpoints/${encodeURIComponent(opts.container)}/${encodeURIComponent(opts.id)}`;
  const body = await source.get<CreateUploadRequest>(`${path}/upload-request`);
  const upload = await target.post<CreateUploadResponse>(`/v1/checkpoints/${encodeURIComponent(opts.container)}/uploads`, body);
  try {
    if (upload.missingChunks > 0) {
      const frames = await source.stream('POST', `${path}/chunk-frames`, { missing: upload.missing });
      await sendFrames(`${target.baseUrl}/v1/checkpoints/uploads/${upload.uploadId}/chunks`, opts.token, frames.body);
    }
    const info = await target.post<CheckpointInfo>(`/v1/checkpoints/uploads/${upload.uploadId}/commit`);
    return { ...info, sentBytes: upload.missingBytes };
  } catch (err) {
    await target.delete(`/v1/checkpoints/uploads/${upload.uploadId}`).catch(() => {});
    throw err;
  }
}

/** PUT chunk frames to an upload of a store; its error answer is raised as ours. */
export async function sendFrames(url: string, token: string, frames: AsyncIterable<Buffer>): Promise<void> {
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
