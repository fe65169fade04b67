/**
 * Store-to-store copy of one checkpoint, to bring it back to its replica count after a replica
 * was lost. The copy is an ordinary upload to the receiving store, under the checkpoint's own
 * id: it asks for the chunks it lacks (its deduplication holds), the sending store streams them
 * verified against their hashes as it reads them, the receiving store verifies them again as it
 * stores them, and the commit makes the copy count there.
 */
import { CheckpointStoreClient } from './client.js';
import type { CheckpointInfo } from './protocol.js';

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
  const source = new CheckpointStoreClient({ baseUrl: opts.from, token: opts.token, timeoutMs: opts.timeoutMs });
  const target = new CheckpointStoreClient({ baseUrl: opts.to, token: opts.token, timeoutMs: opts.timeoutMs });
  const upload = await target.beginUpload(opts.container, await source.uploadRequest(opts.container, opts.id));
  try {
    if (upload.missingChunks > 0) {
      const frames = await source.chunkFrames(opts.container, opts.id, upload.missing);
      await target.sendChunks(upload.uploadId, frames.body);
    }
    const info = await target.commitUpload(upload.uploadId);
    return { ...info, sentBytes: upload.missingBytes };
  } catch (err) {
    await target.abortUpload(upload.uploadId).catch(() => {});
    throw err;
  }
}
