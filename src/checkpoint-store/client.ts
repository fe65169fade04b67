/**
 * Typed calls to the checkpoint store's API (src/checkpoint-store/routes.ts): reads for the
 * controller and the CLI, and the steps of an upload, which uploadCheckpoint (./upload.ts, the
 * agent's) and copyCheckpoint (./replicate.ts, store to store) put together.
 */
import { Readable } from 'node:stream';
import { request, type Dispatcher } from 'undici';
import { ChipmunkError, TransferFailedError, UnavailableError, errorFromJSON, type ErrorJSON } from '../shared/errors.js';
import { ApiClient, type ApiClientOptions } from '../shared/http.js';
import type {
  CheckpointDetail,
  CheckpointDiff,
  CheckpointInfo,
  CheckpointSummary,
  CreateUploadRequest,
  CreateUploadResponse,
  DirectoryListing,
  StoreUsage,
} from './protocol.js';

/** A file's content, as the files route answers it. */
export interface CheckpointFileContent {
  type: 'file';
  bytes: Buffer;
}

export class CheckpointStoreClient {
  private readonly api: ApiClient;
  private readonly token: string;

  constructor(opts: ApiClientOptions) {
    this.api = new ApiClient({ peer: `checkpoint store ${opts.baseUrl}`, ...opts });
    this.token = opts.token;
  }

  get baseUrl(): string {
    return this.api.baseUrl;
  }

  /** Newest first. */
  list(container: string): Promise<CheckpointSummary[]> {
    return this.api.get(`/v1/checkpoints/${enc(container)}`);
  }

  /** What this store holds: checkpoints, containers, bytes on disk. */
  usage(): Promise<StoreUsage> {
    return this.api.get('/v1/checkpoint-store');
  }

  get(container: string, id: string): Promise<CheckpointDetail> {
    return this.api.get(`/v1/checkpoints/${enc(container)}/${enc(id)}`);
  }

  /** A directory's listing or a file's bytes, as the container saw them at the checkpoint. */
  async files(container: string, id: string, path: string): Promise<DirectoryListing | CheckpointFileContent> {
    const res = await this.filesResponse(container, id, path);
    const type = String(res.headers['content-type'] ?? '');
    if (type.startsWith('application/json')) return (await res.body.json()) as DirectoryListing;
    return { type: 'file', bytes: Buffer.from(await res.body.arrayBuffer()) };
  }

  /** The files route's answer as it streams: a directory listing (JSON) or a file's bytes (application/octet-stream). */
  filesResponse(container: string, id: string, path: string): Promise<Dispatcher.ResponseData> {
    return this.api.stream('GET', `/v1/checkpoints/${enc(container)}/${enc(id)}/files?path=${enc(path)}`);
  }

  /** What storing this checkpoint again takes (its manifests and metadata): a diff across replicas reads it. */
  uploadRequest(container: string, id: string): Promise<CreateUploadRequest & { id: string }> {
    return this.api.get(`/v1/checkpoints/${enc(container)}/${enc(id)}/upload-request`);
  }

  diff(container: string, from: string, to: string): Promise<CheckpointDiff> {
    return this.api.get(`/v1/checkpoints/${enc(container)}/diff?from=${enc(from)}&to=${enc(to)}`);
  }

  /** Drops every checkpoint of the container. */
  forget(container: string): Promise<void> {
    return this.api.delete(`/v1/checkpoints/${enc(container)}`);
  }

  /** Drops one checkpoint from this store. */
  remove(container: string, id: string): Promise<void> {
    return this.api.delete(`/v1/checkpoints/${enc(container)}/${enc(id)}`);
  }

  /** Begins an upload: the store answers which of the manifests' chunks it lacks. */
  beginUpload(container: string, upload: CreateUploadRequest): Promise<CreateUploadResponse> {
    return this.api.post(`/v1/checkpoints/${enc(container)}/uploads`, upload);
  }

  /** PUTs chunk frames to an upload, as they come; the store's error answer is raised as ours. */
  async sendChunks(uploadId: string, frames: AsyncIterable<Buffer>): Promise<void> {
    const url = `${this.api.baseUrl}/v1/checkpoints/uploads/${enc(uploadId)}/chunks`;
    let res;
    try {
      res = await request(url, {
        method: 'PUT',
        headers: { authorization: `Bearer ${this.token}`, 'content-type': 'application/octet-stream' },
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

  /** Makes the upload count: it is a checkpoint of this store from now on. */
  commitUpload(uploadId: string): Promise<CheckpointInfo> {
    return this.api.post(`/v1/checkpoints/uploads/${enc(uploadId)}/commit`);
  }

  /** Drops an upload not committed, and the chunks sent to it (now rather than at the store's upload timeout). */
  abortUpload(uploadId: string): Promise<void> {
    return this.api.delete(`/v1/checkpoints/uploads/${enc(uploadId)}`);
  }

  /** The chunks of a stored checkpoint that `missing` names (CreateUploadResponse.missing), as frames for sendChunks. */
  chunkFrames(container: string, id: string, missing: string): Promise<Dispatcher.ResponseData> {
    return this.api.stream('POST', `/v1/checkpoints/${enc(container)}/${enc(id)}/chunk-frames`, { missing });
  }

  /** Where a part streams as a tar archive: give it to fetchTree (src/agent/transfer.ts) with the token. */
  partUrl(container: string, id: string, part: string): string {
    return checkpointPartUrl(this.api.baseUrl, container, id, part);
  }
}

/** The URL of a checkpoint part's tar stream in the store at `storeUrl` (agents fetch it during a restore). */
export function checkpointPartUrl(storeUrl: string, container: string, id: string, part: string): string {
  return `${storeUrl}/v1/checkpoints/${enc(container)}/${enc(id)}/parts/${enc(part)}.tar`;
}

function enc(value: string): string {
  return encodeURIComponent(value);
}
