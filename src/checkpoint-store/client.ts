/**
 * Typed calls to the checkpoint store's API (src/checkpoint-store/routes.ts) for the controller
 * and the CLI. Uploads are the agent's business: uploadCheckpoint in ./upload.ts.
 */
import type { Dispatcher } from 'undici';
import { ApiClient, type ApiClientOptions } from '../shared/http.js';
import type { CheckpointDetail, CheckpointDiff, CheckpointSummary, CreateUploadRequest, DirectoryListing, StoreUsage } from './protocol.js';

/** A file's content, as the files route answers it. */
export interface CheckpointFileContent {
  type: 'file';
  bytes: Buffer;
}

export class CheckpointStoreClient {
  private readonly api: ApiClient;

  constructor(opts: ApiClientOptions) {
    this.api = new ApiClient({ peer: `checkpoint store ${opts.baseUrl}`, ...opts });
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
