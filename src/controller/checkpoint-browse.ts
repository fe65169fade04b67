/**
 * An operator's look into checkpoints (`chipmunk files`, `chipmunk diff`), answered by any
 * controller, follower or leader, from the replicas that hold the checkpoint as the catalog
 * says (checkpoint-replicas.ts): a controller's own replica may not hold it (a checkpoint goes
 * to N of the replicas; a replica may have lost its copy). Reads write nothing, so no leader is
 * needed: they work during an election too.
 *
 * A replica that cannot be reached, lacks the checkpoint or fails is passed over for the next;
 * an answer about the path itself (no such file, a path escaping the container) is the same on
 * every replica and is given as is. A file whose chunk turns out damaged mid-stream breaks off
 * (the client sees a body shorter than its length), as from the replica itself.
 */
import type { Dispatcher } from 'undici';
import { CheckpointStoreClient, diffUploadRequests, type CheckpointDiff } from '../checkpoint-store/index.js';
import { ChipmunkError, NotFoundError, UnavailableError, toChipmunkError } from '../shared/errors.js';
import type { CheckpointCatalog } from './checkpoints.js';

export interface CheckpointBrowserOptions {
  catalog: Pick<CheckpointCatalog, 'list' | 'readFrom'>;
  token: string;
  /** Per request to a replica (a file's body excepted). */
  timeoutMs?: number;
}

const DEFAULT_TIMEOUT_MS = 10_000;

export class CheckpointBrowser {
  constructor(private readonly opts: CheckpointBrowserOptions) {}

  /** A directory listing (JSON) or a file's bytes, as the container's files were at checkpoint ID, streaming from a replica. */
  async files(container: string, id: string, path: string): Promise<Dispatcher.ResponseData> {
    return this.fromAny(container, await this.holders(container, id), (client) => client.filesResponse(container, id, path));
  }

  /**
   * Files added, changed and removed from checkpoint FROM to TO: by a replica holding both, or,
   * when none does, from the two checkpoints' manifests read from a replica of each.
   */
  async diff(container: string, from: string, to: string): Promise<CheckpointDiff> {
    const [fromHolders, toHolders] = [await this.holders(container, from), await this.holders(container, to)];
    const both = fromHolders.filter((url) => toHolders.includes(url));
    if (both.length > 0) {
      try {
        return await this.fromAny(container, both, (client) => client.diff(container, from, to));
      } catch (err) {
        if (answersThePath(err)) throw err;
      }
    }
    const [before, after] = await Promise.all([
      this.fromAny(container, fromHolders, (client) => client.uploadRequest(container, from)),
      this.fromAny(container, toHolders, (client) => client.uploadRequest(container, to)),
    ]);
    return diffUploadRequests(before, after);
  }

  /** The replicas to read checkpoint ID from, best first; refused when it does not count or no replica may hold it intact. */
  private async holders(container: string, id: string): Promise<string[]> {
    const urls = await this.opts.catalog.readFrom(container, id);
    if (urls.length > 0) return urls;
    const listed = (await this.opts.catalog.list(container)).find((c) => c.id === id);
    if (!listed) throw new NotFoundError(`container ${container} has no checkpoint ${id}: \`chipmunk checkpoints ${container}\` lists them`, { container, checkpoint: id });
    throw new UnavailableError(
      `no replica holds checkpoint ${id} of ${container} intact (${(listed.replicas ?? []).map((r) => `${r.url}: ${r.state}`).join(', ')}): pick another checkpoint with \`chipmunk checkpoints ${container}\``,
      { container, checkpoint: id, replicas: listed.replicas ?? [] },
    );
  }

  /** CALL on each replica in turn until one answers. */
  private async fromAny<T>(container: string, urls: string[], call: (client: CheckpointStoreClient) => Promise<T>): Promise<T> {
    const failures: string[] = [];
    let last: unknown;
    for (const url of urls) {
      try {
        return await call(new CheckpointStoreClient({ baseUrl: url, token: this.opts.token, timeoutMs: this.opts.timeoutMs ?? DEFAULT_TIMEOUT_MS }));
      } catch (err) {
        if (answersThePath(err)) throw err;
        last = err;
        failures.push(`${url}: ${toChipmunkError(err).message}`);
      }
    }
    if (failures.length === 1 && last instanceof ChipmunkError) throw last;
    throw new UnavailableError(`no replica holding the checkpoint of ${container} answered: ${failures.join('; ')}`, { container, replicas: urls });
  }
}

/** An answer about the path asked for (the same on every replica), not about the replica or its copy. */
function answersThePath(err: unknown): boolean {
  return err instanceof ChipmunkError && err.status < 500 && err.details?.path !== undefined;
}
