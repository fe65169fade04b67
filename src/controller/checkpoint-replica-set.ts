/**
 * Which checkpoint store replicas there are, and how to reach them: the replica set the catalog
 * (checkpoint-replicas.ts) places checkpoints on.
 *
 * The candidates are this controller's own store, the peers named with --checkpoint-store-peers
 * and, with etcd, the stores the running controllers published in their election campaigns.
 * An operator takes one out for good with `chipmunk checkpoint-replicas retire URL`
 * (checkpoint-replica-admin.ts): its retirement is recorded in the state store, under
 * `/checkpoint-replicas/<url>`, first as `retiring` (it takes no new checkpoint and no copy, and
 * its copies no longer count towards N, but they are still read: they are copied from) and then
 * as `retired` (never asked again, even when it answers: its controller may come back, or its
 * URL may be given to a peer list by mistake). Every controller reads those records, so a leader
 * elected later honours them too.
 */
import { request } from 'undici';
import { CheckpointStoreClient } from '../checkpoint-store/index.js';
import { UnavailableError } from '../shared/errors.js';
import type { ReplicaStatus } from '../shared/replica-protocol.js';
import type { KeyValue, StateStore } from './store/index.js';

const RETIREMENTS_PREFIX = '/checkpoint-replicas/';
/** A replica that does not answer within this is counted unreachable for that call. */
const DEFAULT_REPLICA_TIMEOUT_MS = 2_000;
/**
 * A replica that did not answer is taken as unreachable without asking for this long (the
 * re-replication pass asks anyway): a dead host must not add a timeout to every listing of a
 * failover.
 */
const SILENT_FOR_MS = 5_000;

/** A replica being retired, or retired. */
export interface Retirement {
  url: string;
  status: Exclude<ReplicaStatus, 'active'>;
  /** When it began retiring, or was retired. */
  since: number;
}

/** The replica set as one read of the state store saw it. */
export interface Members {
  /** Replicas that take new checkpoints and copies, this controller's own first. */
  active: string[];
  /** Replicas being retired: read from, copied from, counted for nothing. */
  retiring: string[];
  /** Never used again. */
  retired: Set<string>;
  retirements: KeyValue<Retirement>[];
}

export interface ReplicaSetOptions {
  state: StateStore;
  /** The candidates: this controller's own store first (known once it listens), its peers, the published ones. */
  urls: () => string[];
  token: string;
  replicaTimeoutMs?: number;
}

export class ReplicaSet {
  /** Replicas that did not answer lately, and until when they are not asked. */
  private readonly silentUntil = new Map<string, number>();

  constructor(private readonly opts: ReplicaSetOptions) {}

  /** The candidates as they are now, retired or not (no store call). */
  candidates(): string[] {
    return [...new Set(this.opts.urls())];
  }

  async members(): Promise<Members> {
    const retirements = await this.opts.state.list<Retirement>(RETIREMENTS_PREFIX);
    const retired = new Set(retirements.filter((r) => r.value.status === 'retired').map((r) => r.value.url));
    const retiring = retirements.filter((r) => r.value.status === 'retiring').map((r) => r.value.url);
    const active = this.candidates().filter((url) => !retired.has(url) && !retiring.includes(url));
    return { active, retiring, retired, retirements };
  }

  /** Records URL's retirement as STATUS, only if its record is still at EXPECT (0: none); returns the write's revision. */
  mark(url: string, status: Retirement['status'], expect: number): Promise<number> {
    return this.opts.state.put(retirementKey(url), { url, status, since: Date.now() } satisfies Retirement, { expectModRevision: expect });
  }

  /** `call` on a replica; undefined when it fails, or without calling while the replica is silent (unless `askSilent`). */
  async ask<T>(url: string, call: () => Promise<T>, askSilent = false): Promise<T | undefined> {
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

  /** Which of URLS answer /healthz now (silent ones are not asked, unless ASK_SILENT). */
  async answering(urls: string[], askSilent = false): Promise<boolean[]> {
    return Promise.all(urls.map(async (url) => (await this.ask(url, () => this.healthy(url), askSilent)) === true));
  }

  client(url: string): CheckpointStoreClient {
    return new CheckpointStoreClient({ baseUrl: url, token: this.opts.token, timeoutMs: this.timeoutMs() });
  }

  private async healthy(url: string): Promise<true> {
    const res = await request(`${url}/healthz`, { headersTimeout: this.timeoutMs(), bodyTimeout: this.timeoutMs() });
    await res.body.dump();
    if (res.statusCode !== 200) throw new UnavailableError(`${url}/healthz answered HTTP ${res.statusCode}`);
    return true;
  }

  private timeoutMs(): number {
    return this.opts.replicaTimeoutMs ?? DEFAULT_REPLICA_TIMEOUT_MS;
  }
}

/** A URL as a key: its characters are not all allowed in one. */
function retirementKey(url: string): string {
  return `${RETIREMENTS_PREFIX}${encodeURIComponent(url)}`;
}
