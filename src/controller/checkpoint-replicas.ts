/**
 * Checkpoints on several hosts: the controller's catalog over N checkpoint store replicas (a
 * replica is the checkpoint store a controller serves on its API: its own, its peers' named with
 * --checkpoint-store-peers, and with etcd those the running controllers published there).
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
 * Checkpoints stored before commit records existed (a store marks them `legacy` when its index
 * is upgraded) count without one, on the replicas that hold them: list() shows them, and the
 * re-replication pass writes their records (then copies them up to N like any other).
 *
 * Which replicas there are is the replica set's business (checkpoint-replica-set.ts): a replica
 * being retired takes nothing new and its copies count for nothing, but they are read and copied
 * from; a retired one is left out of everything, the records naming it included.
 *
 * Reads (list, readFrom) write nothing, so any controller may answer them; committed(),
 * forget() and replicate() are the leader's work in an HA cluster (their state writes are what
 * a leader's term fences).
 */
import type { Logger } from 'pino';
import { copyCheckpoint, type CheckpointInfo, type CheckpointReplica, type CheckpointSummary, type ReplicaState } from '../checkpoint-store/index.js';
import { StoreConflictError, UnavailableError, toChipmunkError } from '../shared/errors.js';
import type { CheckpointCatalog } from './checkpoints.js';
import { ReplicaSet, type Members } from './checkpoint-replica-set.js';
import type { StateStore } from './store/index.js';

const RECORDS_PREFIX = '/checkpoints/';

/** Each replica's checkpoints of one container by id; undefined for a replica that did not answer. */
type Listings = Map<string, Map<string, CheckpointSummary> | undefined>;

/** The commit record of a checkpoint: what it is, and the replicas it was committed on. */
interface CheckpointRecord {
  container: string;
  info: CheckpointSummary;
  replicas: string[];
}

/** A checkpoint held intact by fewer than N active replicas. */
export interface UnderReplicated {
  container: string;
  id: string;
  /** Active replicas holding it intact. */
  intact: string[];
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
  /** The containers the cluster has: where the re-replication pass looks for legacy checkpoints to record. */
  containerNames?: () => Promise<string[]>;
}

export class ReplicatedCatalog implements CheckpointCatalog {
  readonly set: ReplicaSet;
  /** Under-replicated checkpoints already reported as having nowhere to go, by id. */
  private readonly reportedStuck = new Set<string>();
  /** The re-replication pass that will start next, shared by the calls made before it starts. */
  private nextPass?: Promise<number>;
  private lastPass: Promise<unknown> = Promise.resolve();

  constructor(private readonly opts: ReplicatedCatalogOptions) {
    this.set = new ReplicaSet({ state: opts.state, urls: opts.replicaUrls, token: opts.token, replicaTimeoutMs: opts.replicaTimeoutMs });
  }

  /** N. */
  get replicaCount(): number {
    return this.opts.replicas;
  }

  /** Newest first, recorded checkpoints and legacy ones only, each with the state of every replica. */
  async list(container: string): Promise<CheckpointSummary[]> {
    const members = await this.set.members();
    const records = await this.records(container);
    const listings = await this.listings(container, members);
    const out: CheckpointSummary[] = [];
    for (const value of [...records.map((r) => r.value), ...legacyRecords(container, records, listings)]) {
      // Shown: the replicas it was committed on, and any other holding a copy.
      const replicas = placement(value, listings, members).filter((r) => value.replicas.includes(r.url) || r.state === 'intact' || r.state === 'corrupt');
      const intact = replicas.some((r) => r.state === 'intact');
      const unknown = replicas.some((r) => r.state === 'unreachable');
      // Every replica that held it dropped it (retention): gone. Its record goes in replicate(), not in a read.
      if (!intact && !unknown && !replicas.some((r) => r.state === 'corrupt')) continue;
      const { corrupt: _corrupt, legacy: _legacy, ...info } = value.info;
      out.push({ ...info, ...(intact || unknown ? {} : { corrupt: true }), replicas });
    }
    return out.sort((a, b) => b.time - a.time);
  }

  async forget(container: string): Promise<void> {
    const { active, retiring } = await this.set.members();
    await Promise.all(
      [...active, ...retiring].map((url) =>
        this.set
          .client(url)
          .forget(container)
          .catch((err: unknown) => this.opts.log.warn({ container, replica: url, err: toChipmunkError(err).toJSON() }, `could not drop the checkpoints of ${container} on replica ${url}; they stay there unlisted`)),
      ),
    );
    for (const { key } of await this.records(container)) await this.opts.state.delete(key);
  }

  /** N active replicas that answer, this controller's own first; refused (nothing taken) with fewer. */
  async uploadTargets(): Promise<string[]> {
    const urls = (await this.set.members()).active;
    const up = await this.set.answering(urls);
    const reachable = urls.filter((_, i) => up[i]);
    if (reachable.length < this.opts.replicas) {
      const down = urls.filter((_, i) => !up[i]);
      throw new UnavailableError(
        `only ${reachable.length} of the ${this.opts.replicas} checkpoint store replicas a checkpoint needs answer (not answering: ${down.join(', ') || 'none'}; active: ${urls.length}): the checkpoint was not taken and the previous one stays valid; bring a replica back, add one (start another controller on the etcd store, or name it in --checkpoint-store-peers), or lower --checkpoint-replicas`,
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

  /** Where to read a checkpoint from, in order: active replicas that hold it intact, retiring ones, then those that did not answer. */
  async readFrom(container: string, id: string): Promise<string[]> {
    const found = (await this.list(container)).find((c) => c.id === id);
    const { retiring } = await this.set.members();
    const replicas = found?.replicas ?? [];
    const intact = replicas.filter((r) => r.state === 'intact').map((r) => r.url);
    return [...intact.filter((url) => !retiring.includes(url)), ...intact.filter((url) => retiring.includes(url)), ...replicas.filter((r) => r.state === 'unreachable').map((r) => r.url)];
  }

  /**
   * Brings every recorded checkpoint held intact by fewer than N active replicas that answer back
   * to N, copying it from one that holds it (a retiring one too) to active ones that lack it.
   * One pass at a time; a call made while one runs gets the next pass, which sees what changed
   * before the call (a replica marked retiring). Resolves to the copies made.
   */
  replicate(): Promise<number> {
    this.nextPass ??= this.lastPass.then(() => {
      this.nextPass = undefined;
      return this.replicatePass();
    });
    this.lastPass = this.nextPass.catch(() => undefined);
    return this.nextPass;
  }

  /** Checkpoints that live on URL (committed there, or held there) with fewer than N intact copies on active replicas. */
  async underReplicatedOn(url: string): Promise<{ living: number; under: UnderReplicated[] }> {
    const members = await this.set.members();
    let living = 0;
    const under: UnderReplicated[] = [];
    for (const container of await this.containers()) {
      const listings = await this.listings(container, members, true);
      const records = await this.records(container);
      for (const value of [...records.map((r) => r.value), ...legacyRecords(container, records, listings)]) {
        const states = placement(value, listings, members);
        const there = states.find((r) => r.url === url);
        if (!value.replicas.includes(url) && there?.state !== 'intact' && there?.state !== 'corrupt') continue;
        // Corrupt everywhere, or only ever on a replica that is gone: it does not count, there is nothing to move.
        if (!states.some((r) => r.state === 'intact' || (r.url === url && r.state === 'unreachable'))) continue;
        living++;
        const intact = states.filter((r) => r.state === 'intact' && members.active.includes(r.url)).map((r) => r.url);
        if (intact.length < this.opts.replicas) under.push({ container, id: value.info.id, intact });
      }
    }
    return { living, under };
  }

  /** Takes URL out of every commit record (once it is retired: its copies count for nothing). */
  async dropFromRecords(url: string): Promise<void> {
    for (const { key, value, modRevision } of await this.opts.state.list<CheckpointRecord>(RECORDS_PREFIX)) {
      if (!value.replicas.includes(url)) continue;
      await this.opts.state.put(key, { ...value, replicas: value.replicas.filter((r) => r !== url) }, { expectModRevision: modRevision }).catch((err: unknown) => {
        // Changed meanwhile (a copy recorded, a forget): the listing leaves retired replicas out anyway.
        if (!(err instanceof StoreConflictError)) throw err;
      });
    }
  }

  /** How many recorded checkpoints name each replica. */
  async recordedOn(): Promise<Map<string, number>> {
    const counts = new Map<string, number>();
    for (const { value } of await this.opts.state.list<CheckpointRecord>(RECORDS_PREFIX)) {
      for (const url of value.replicas) counts.set(url, (counts.get(url) ?? 0) + 1);
    }
    return counts;
  }

  private async replicatePass(): Promise<number> {
    const members = await this.set.members();
    let copies = 0;
    for (const container of await this.containers()) {
      const listings = await this.listings(container, members, true);
      await this.recordLegacy(container, listings);
      for (const { key, value, modRevision } of await this.records(container)) {
        // Each write only if the record is still the one read (a forget or commit meanwhile wins).
        let revision = modRevision;
        const states = placement(value, listings, members);
        if (states.every((r) => r.state === 'missing')) {
          // Dropped by every replica's retention: the record outlived the checkpoint.
          await this.opts.state.delete(key, { expectModRevision: revision }).catch(() => undefined);
          continue;
        }
        const counts = (url: string) => members.active.includes(url);
        // Sources: active replicas first, then retiring ones. Only the active count towards N.
        const sources = states.filter((r) => r.state === 'intact').map((r) => r.url).sort((x, y) => Number(counts(y)) - Number(counts(x)));
        const intact = sources.filter(counts);
        if (sources.length === 0 || intact.length >= this.opts.replicas) {
          this.reportedStuck.delete(value.info.id);
          continue;
        }
        // Active replicas without it first; then those with a damaged copy, which is dropped and copied again.
        const damaged = states.filter((r) => r.state === 'corrupt' && counts(r.url)).map((r) => r.url);
        const lacking = [...states.filter((r) => r.state === 'missing' && counts(r.url)).map((r) => r.url), ...damaged];
        const targets = lacking.slice(0, this.opts.replicas - intact.length);
        const lost = states.filter((r) => !intact.includes(r.url)).map((r) => `${r.url} (${members.retiring.includes(r.url) ? 'retiring' : r.state})`);
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
        const from = sources[0]!;
        for (const target of targets) {
          try {
            // Its store asks for the damaged chunks again (it remembers them) and keeps the good copies.
            if (damaged.includes(target)) await this.set.client(target).remove(container, value.info.id);
            const copied = await copyCheckpoint({ from, to: target, token: this.opts.token, container, id: value.info.id });
            value.replicas = [...new Set([...value.replicas, target])];
            revision = await this.opts.state.put(key, value, { expectModRevision: revision });
            intact.push(target);
            copies++;
            this.opts.log.info(
              { container, checkpoint: value.info.id, from, to: target, sentBytes: copied.sentBytes, lost },
              `checkpoint ${value.info.id} of ${container} had ${intact.length - 1} of ${this.opts.replicas} intact replicas (${lost.join(', ')}): copied it from ${from} to ${target}`,
            );
          } catch (err) {
            this.opts.log.warn({ container, checkpoint: value.info.id, from, to: target, err: toChipmunkError(err).toJSON() }, `copying checkpoint ${value.info.id} of ${container} to replica ${target} failed; tried again on the next pass`);
          }
        }
      }
    }
    return copies;
  }

  /** Containers with recorded checkpoints, and those the cluster has (which may hold legacy ones). */
  private async containers(): Promise<Set<string>> {
    const recorded = (await this.opts.state.list<CheckpointRecord>(RECORDS_PREFIX)).map(({ value }) => value.container);
    return new Set([...recorded, ...((await this.opts.containerNames?.()) ?? [])]);
  }

  /** Writes the commit records of legacy checkpoints (on the replicas holding them), unless one was written meanwhile. */
  private async recordLegacy(container: string, listings: Listings): Promise<void> {
    for (const record of legacyRecords(container, await this.records(container), listings)) {
      try {
        await this.opts.state.put(recordKey(container, record.info.id), record, { expectModRevision: 0 });
        this.opts.log.info(
          { container, checkpoint: record.info.id, replicas: record.replicas },
          `checkpoint ${record.info.id} of ${container}, stored before commit records, is recorded as held by ${record.replicas.join(', ')}`,
        );
      } catch (err) {
        if (!(err instanceof StoreConflictError)) throw err;
      }
    }
  }

  /** Each active or retiring replica's answer for a container: its checkpoints by id, or undefined when it did not answer. */
  private async listings(container: string, members: Members, askSilent = false): Promise<Listings> {
    const urls = [...members.active, ...members.retiring];
    const answers = await Promise.all(urls.map((url) => this.set.ask(url, () => this.set.client(url).list(container), askSilent)));
    return new Map(urls.map((url, i) => [url, answers[i] && new Map(answers[i]!.map((c) => [c.id, c]))]));
  }

  private async records(container: string) {
    return this.opts.state.list<CheckpointRecord>(`${RECORDS_PREFIX}${container}/`);
  }
}

/**
 * The state of a checkpoint on every replica but the retired: those it was committed on, and
 * every other active or retiring one.
 */
function placement(record: CheckpointRecord, listings: Listings, members: Members): CheckpointReplica[] {
  const urls = [...new Set([...record.replicas, ...members.active, ...members.retiring])].filter((url) => !members.retired.has(url));
  const out: CheckpointReplica[] = [];
  for (const url of urls) {
    const listing = listings.get(url);
    const found = listing?.get(record.info.id);
    let state: ReplicaState;
    if (!listing) state = 'unreachable';
    else if (!found) state = 'missing';
    else state = found.corrupt ? 'corrupt' : 'intact';
    out.push({ url, state });
  }
  return out;
}

function recordKey(container: string, id: string): string {
  return `${RECORDS_PREFIX}${container}/${id}`;
}

/**
 * The records legacy checkpoints would have: each one a replica lists as legacy and no record
 * names, as committed on every replica that lists it (a store from before commit records was
 * the only one, so it is usually one).
 */
function legacyRecords(container: string, records: { value: CheckpointRecord }[], listings: Listings): CheckpointRecord[] {
  const recorded = new Set(records.map((r) => r.value.info.id));
  const found = new Map<string, CheckpointRecord>();
  for (const [url, listing] of listings) {
    for (const summary of listing?.values() ?? []) {
      if (!summary.legacy || recorded.has(summary.id)) continue;
      const { corrupt: _corrupt, legacy: _legacy, replicas: _replicas, ...info } = summary;
      const record: CheckpointRecord = found.get(summary.id) ?? { container, info, replicas: [] };
      record.replicas.push(url);
      found.set(summary.id, record);
    }
  }
  return [...found.values()];
}
