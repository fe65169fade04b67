/**
 * Checkpoints on several hosts: the controller's catalog over N checkpoint store replicas (a
 * replica is the checkpoint store a controller serves on its API: its own, and its peers').
 *
 * The commit point of a checkpoint is one write to the state store (etcd in an HA cluster):
 * `/checkpoints/<container>/<id>`, made only after the agent committed the checkpoint on all N
 * replicas it was given. Listings, failovers and restores use recorded checkpoints only, so a
 * checkpoint committed on some replicas (an upload that failed half-way) never counts.
 *
 * A recorded checkpoint keeps counting when a replica holding it is lost: it was committed on N.
 * `replicate()` then copies it, store to store (chunks verified on both sides), to replicas that
 * lack it or hold a damaged copy until N hold it intact again; with fewer than N replicas left it stays on those there
 * are and the log says so once. A new checkpoint needs N reachable replicas, or is not taken.
 *
 * Reads (list, readFrom) write nothing, so any controller may answer them; committed(),
 * forget() and replicate() are the leader's work in an HA cluster (their state writes are what
 * a leader's term fences).
 */
import type { Logger } from 'pino';
import { request } from 'undici';
import { CheckpointStoreClient, copyCheckpoint, type CheckpointInfo, type CheckpointReplica, type CheckpointSummary, type ReplicaState } from '../checkpoint-store/index.js';
import { UnavailableError, toChipmunkError } from '../shared/errors.js';
import type { CheckpointCatalog } from './checkpoints.js';
import type { StateStore } from './store/index.js';

const RECORDS_PREFIX = '/checkpoints/';
/** A replica that does not answer a listing within this is counted unreachable for it. */
const DEFAULT_REPLICA_TIMEOUT_MS = 2_000;
/**
 * A replica that did not answer is taken as unreachable without asking for this long (the
 * re-replication pass asks anyway): a dead host must not add a timeout to every listing of a
 * failover.
 */
const SILENT_FOR_MS = 5_000;

/** The commit record of a checkpoint: what it is, and the replicas it was committed on. */
interface CheckpointRecord {
  container: string;
  info: CheckpointSummary;
  replicas: string[];
}

export interface ReplicatedCatalogOptions {
  state: StateStore;
  /** Every replica's base URL, this controller's own first (known once it listens). */
  replicaUrls: () => string[];
  /** N: a checkpoint counts once committed on this many replicas. */
  replicas: number;
  token: string;
  log: Logger;
  replicaTimeoutMs?: number;
}

export class ReplicatedCatalog implements CheckpointCatalog {
  /** Under-replicated checkpoints already reported as having nowhere to go, by id. */
  private readonly reportedStuck = new Set<string>();
  private replicating?: Promise<void>;
  /** Replicas that did not answer lately, and until when they are not asked. */
  private readonly silentUntil = new Map<string, number>();

  constructor(private readonly opts: ReplicatedCatalogOptions) {}

  /** Newest first, recorded checkpoints only, each with the state of every replica. */
  async list(container: string): Promise<CheckpointSummary[]> {
    const records = await this.records(container);
    if (records.length === 0) return [];
    const listings = await this.listings(container);
    const out: CheckpointSummary[] = [];
    for (const { value } of records) {
      // Shown: the replicas it was committed on, and any other holding a copy.
      const replicas = this.placement(value, listings).filter((r) => value.replicas.includes(r.url) || r.state === 'intact' || r.state === 'corrupt');
      const intact = replicas.some((r) => r.state === 'intact');
      const unknown = replicas.some((r) => r.state === 'unreachable');
      // Every replica that held it dropped it (retention): gone. Its record goes in replicate(), not in a read.
      if (!intact && !unknown && !replicas.some((r) => r.state === 'corrupt')) continue;
      const { corrupt: _corrupt, ...info } = value.info;
      out.push({ ...info, ...(intact || unknown ? {} : { corrupt: true }), replicas });
    }
    return out.sort((a, b) => b.time - a.time);
  }

  async forget(container: string): Promise<void> {
    await Promise.all(
      this.opts.replicaUrls().map((url) =>
        this.client(url)
          .forget(container)
          .catch((err: unknown) => this.opts.log.warn({ container, replica: url, err: toChipmunkError(err).toJSON() }, `could not drop the checkpoints of ${container} on replica ${url}; they stay there unlisted`)),
      ),
    );
    for (const { key } of await this.records(container)) await this.opts.state.delete(key);
  }

  /** N replicas that answer, this controller's own first; refused (nothing taken) with fewer. */
  async uploadTargets(): Promise<string[]> {
    const urls = this.opts.replicaUrls();
    const up = await Promise.all(urls.map(async (url) => (await this.ask(url, () => this.reachable(url))) === true));
    const reachable = urls.filter((_, i) => up[i]);
    if (reachable.length < this.opts.replicas) {
      const down = urls.filter((_, i) => !up[i]);
      throw new UnavailableError(
        `only ${reachable.length} of the ${this.opts.replicas} checkpoint store replicas a checkpoint needs answer (not answering: ${down.join(', ') || 'none'}; known: ${urls.length}): the checkpoint was not taken and the previous one stays valid; bring a replica back, add one (--checkpoint-store-peers), or lower --checkpoint-replicas`,
        { needed: this.opts.replicas, reachable, down },
      );
    }
    return reachable.slice(0, this.opts.replicas);
  }

  /** The commit point: from now on the checkpoint counts. */
  async committed(info: CheckpointInfo, replicas: string[]): Promise<CheckpointSummary> {
    const { container, parts: _parts, replicas: _states, ...summary } = info;
    await this.opts.state.put(recordKey(container, info.id), { container, info: summary, replicas } satisfies CheckpointRecord);
    return { ...summary, replicas: replicas.map((url) => ({ url, state: 'intact' as const })) };
  }

  /** Where to read a checkpoint from, in order: replicas that hold it intact, then those that did not answer. */
  async readFrom(container: string, id: string): Promise<string[]> {
    const found = (await this.list(container)).find((c) => c.id === id);
    const replicas = found?.replicas ?? [];
    return [...replicas.filter((r) => r.state === 'intact'), ...replicas.filter((r) => r.state === 'unreachable')].map((r) => r.url);
  }

  /**
   * Brings every recorded checkpoint held intact by fewer than N answering replicas back to N,
   * copying it from one that holds it to those that lack it. One pass at a time.
   */
  replicate(): Promise<void> {
    this.replicating ??= this.replicatePass().finally(() => (this.replicating = undefined));
    return this.replicating;
  }

  private async replicatePass(): Promise<void> {
    const containers = new Set((await this.opts.state.list<CheckpointRecord>(RECORDS_PREFIX)).map(({ value }) => value.container));
    for (const container of containers) {
      const records = await this.records(container);
      const listings = await this.listings(container, true);
      for (const { key, value, modRevision } of records) {
        // Each write only if the record is still the one read (a forget or commit meanwhile wins).
        let revision = modRevision;
        const placement = this.placement(value, listings);
        if (placement.every((r) => r.state === 'missing')) {
          // Dropped by every replica's retention: the record outlived the checkpoint.
          await this.opts.state.delete(key, { expectModRevision: revision }).catch(() => undefined);
          continue;
        }
        const intact = placement.filter((r) => r.state === 'intact').map((r) => r.url);
        if (intact.length === 0 || intact.length >= this.opts.replicas) {
          this.reportedStuck.delete(value.info.id);
          continue;
        }
        // Replicas without it first; then those with a damaged copy, which is dropped and copied again.
        const damaged = placement.filter((r) => r.state === 'corrupt').map((r) => r.url);
        const lacking = [...placement.filter((r) => r.state === 'missing').map((r) => r.url), ...damaged];
        const targets = lacking.slice(0, this.opts.replicas - intact.length);
        const lost = placement.filter((r) => r.state !== 'intact').map((r) => `${r.url} (${r.state})`);
        if (targets.length === 0) {
          if (!this.reportedStuck.has(value.info.id)) {
            this.reportedStuck.add(value.info.id);
            this.opts.log.warn(
              { container, checkpoint: value.info.id, intact, lost },
              `checkpoint ${value.info.id} of ${container} is held intact by ${intact.length} of ${this.opts.replicas} replicas and no other replica can take a copy: it still counts (it was committed on ${this.opts.replicas}); bring a replica back or add one`,
            );
          }
          continue;
        }
        for (const target of targets) {
          try {
            // Its store asks for the damaged chunks again (it remembers them) and keeps the good copies.
            if (damaged.includes(target)) await this.client(target).remove(container, value.info.id);
            const copied = await copyCheckpoint({ from: intact[0]!, to: target, token: this.opts.token, container, id: value.info.id });
            value.replicas = [...new Set([...value.replicas, target])];
            revision = await this.opts.state.put(key, value, { expectModRevision: revision });
            intact.push(target);
            this.opts.log.info(
              { container, checkpoint: value.info.id, from: intact[0], to: target, sentBytes: copied.sentBytes, lost },
              `checkpoint ${value.info.id} of ${container} had ${intact.length - 1} of ${this.opts.replicas} intact replicas (${lost.join(', ')}): copied it from ${intact[0]} to ${target}`,
            );
          } catch (err) {
            this.opts.log.warn({ container, checkpoint: value.info.id, from: intact[0], to: target, err: toChipmunkError(err).toJSON() }, `copying checkpoint ${value.info.id} of ${container} to replica ${target} failed; tried again on the next pass`);
          }
        }
      }
    }
  }

  /** Each replica's answer for a container: its checkpoints by id, or undefined when it did not answer. */
  private async listings(container: string, askSilent = false): Promise<Map<string, Map<string, CheckpointSummary> | undefined>> {
    const urls = this.opts.replicaUrls();
    const answers = await Promise.all(urls.map((url) => this.ask(url, () => this.client(url).list(container), askSilent)));
    return new Map(urls.map((url, i) => [url, answers[i] && new Map(answers[i]!.map((c) => [c.id, c]))]));
  }

  /** The state of a checkpoint on every replica: those it was committed on, and every other known one. */
  private placement(record: CheckpointRecord, listings: Map<string, Map<string, CheckpointSummary> | undefined>): CheckpointReplica[] {
    const urls = [...new Set([...record.replicas, ...this.opts.replicaUrls()])];
    const out: CheckpointReplica[] = [];
    for (const url of urls) {
      const known = listings.has(url);
      const listing = listings.get(url);
      const found = listing?.get(record.info.id);
      let state: ReplicaState;
      if (!known || !listing) state = 'unreachable';
      else if (!found) state = 'missing';
      else state = found.corrupt ? 'corrupt' : 'intact';
      out.push({ url, state });
    }
    return out;
  }

  private async records(container: string) {
    return this.opts.state.list<CheckpointRecord>(`${RECORDS_PREFIX}${container}/`);
  }

  /** `call` on a replica; undefined when it fails, or without calling while the replica is silent (unless `askSilent`). */
  private async ask<T>(url: string, call: () => Promise<T>, askSilent = false): Promise<T | undefined> {
    if (!askSilent && (this.silentUntil.get(url) ?? 0) > Date.now()) return undefined;
    try {
      const answer = await call();
      this.silentUntil.delete(url);
      return answer;
    } catch {
      this.silentUntil.set(url, Date.now() + SILENT_FOR_MS);
      return undefined;
    }
  }

  private async reachable(url: string): Promise<true> {
    const res = await request(`${url}/healthz`, { headersTimeout: this.timeoutMs(), bodyTimeout: this.timeoutMs() });
    await res.body.dump();
    if (res.statusCode !== 200) throw new UnavailableError(`${url}/healthz answered HTTP ${res.statusCode}`);
    return true;
  }

  private client(url: string): CheckpointStoreClient {
    return new CheckpointStoreClient({ baseUrl: url, token: this.opts.token, timeoutMs: this.timeoutMs() });
  }

  private timeoutMs(): number {
    return this.opts.replicaTimeoutMs ?? DEFAULT_REPLICA_TIMEOUT_MS;
  }
}

function recordKey(container: string, id: string): string {
  return `${RECORDS_PREFIX}${container}/${id}`;
}
