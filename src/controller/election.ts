import type { ControllerView } from '../shared/protocol.js';
import { StoreConflictError, StoreFailedError } from '../shared/errors.js';
import type { KeyValue, StateStore, TxnCompare, Watch } from './store/types.js';

/**
 * Leader election among controllers, on the state store (etcd with several controllers; on a local
 * store the only candidate wins at once).
 *
 * Each campaign puts a key under `/election/<name>/` attached to a lease of its own; the candidate
 * whose key has the lowest create revision leads, and that revision is its *term*. A new leader's
 * key was created while the old one led, so terms only grow. The key is written once and never
 * again, so its mod revision is the term too: `fence()` gives the compare that makes a store write
 * succeed only while this leadership still stands.
 *
 * A leader stops leading *before* its lease can have expired on the server: it counts from when it
 * sent the last keep-alive that succeeded and steps down once TTL - margin has passed since then,
 * whatever the store client says (etcd3 would report a lost lease only up to two TTLs later). It
 * keeps its campaign key and keeps sending keep-alives: while the key stands nobody else can lead,
 * so if a keep-alive gets through before the lease ended (etcd elected a new member leader, a
 * member died) it leads again under the same term; once the store says the lease is gone, it
 * campaigns again with a new one.
 */

export interface Candidate {
  /** Names this controller instance. */
  id: string;
  /** Where other controllers reach it (to pass mutations on to the leader). */
  url: string;
  /** The node it runs on, when it runs on one (`controller --node`). */
  node?: string;
  /** Where its checkpoint store replica is served: published so the leader knows every replica (checkpoint-replicas.ts). */
  checkpointStore?: string;
}

export interface Leader extends Candidate {
  term: number;
}

export interface ElectionOptions {
  store: StateStore;
  candidate: Candidate;
  /** The campaign lease's TTL: a dead leader is replaced within about this long. */
  ttlMs: number;
  /** Stop leading this long before the lease could expire (default: a quarter of the TTL). */
  marginMs?: number;
  /** Separate elections on one store (default "controller"). */
  name?: string;
  /** Called whenever the leader this candidate sees changes (undefined: none known), and when this candidate steps down. */
  onChange?: (leader: Leader | undefined) => void;
  /** Reports trouble that the election rides out (a keep-alive or campaign that failed and will be tried again). */
  onError?: (err: unknown) => void;
}

const RETRY_MS = 250;
/** Lease time is measured on the monotonic clock: a wall-clock step must not stretch a leadership. */
const now = () => performance.now();

interface Campaign {
  lease: string;
  key: string;
  term: number;
  /** When the last keep-alive that succeeded (or the grant) was sent: the server's TTL restarted after that. */
  aliveSince: number;
  keepAliveTimer: NodeJS.Timeout;
  stepDownTimer?: NodeJS.Timeout;
}

export class Election {
  private readonly prefix: string;
  private readonly marginMs: number;
  private campaign: Campaign | undefined;
  /** The candidate whose key has the lowest create revision, as last read. */
  private leader: Leader | undefined;
  /** Every candidate, as last read, oldest campaign first. */
  private all: Candidate[] = [];
  /** What onChange was last told. */
  private told: Leader | undefined;
  /** The term of the newest campaign under which this candidate led. */
  private led: number | undefined;
  private watch: Watch | undefined;
  private closed = false;
  private retryTimer: NodeJS.Timeout | undefined;
  /** Serialises reads of the candidates, so an older read never overwrites a newer one. */
  private refreshing: Promise<void> = Promise.resolve();

  constructor(private readonly opts: ElectionOptions) {
    this.prefix = `/election/${opts.name ?? 'controller'}/`;
    this.marginMs = opts.marginMs ?? Math.floor(opts.ttlMs / 4);
    if (!(opts.ttlMs > 0) || this.marginMs < 0 || this.marginMs >= opts.ttlMs) {
      throw new RangeError(`election TTL ${opts.ttlMs} ms and margin ${this.marginMs} ms: need TTL > margin >= 0`);
    }
  }

  /**
   * Starts observing the leader and campaigning; resolves once this candidate's key is in the
   * store. A store call that fails meanwhile (a controller revived with its host, its etcd member
   * still rejoining: the watch is not made in time) is tried again until it works, as a campaign
   * is later: failing here would end the controller's process.
   */
  async start(): Promise<void> {
    await this.untilItWorks(() => this.observe());
    await this.untilItWorks(() => this.runCampaign());
  }

  /** This candidate's term while it leads and its lease is surely alive on the server; undefined otherwise. */
  term(): number | undefined {
    const campaign = this.campaign;
    if (!campaign || this.leader?.term !== campaign.term) return undefined;
    return now() - campaign.aliveSince < this.opts.ttlMs - this.marginMs ? campaign.term : undefined;
  }

  /**
   * The leader as last seen: another candidate, or this one while term() says it leads. Undefined
   * while this candidate's key is the lowest but its lease is not surely alive (or belongs to a
   * campaign it gave up): then nobody can be sure to lead.
   */
  currentLeader(): Leader | undefined {
    const leader = this.leader;
    if (!leader || leader.id !== this.opts.candidate.id) return leader;
    return this.term() === leader.term ? leader : undefined;
  }

  /**
   * The term under which this candidate last led, whether or not it still leads: what its calls to
   * agents and the gateway carry, so they refuse them once a newer leader reached them (work
   * begun under that term may still be under way). Undefined if it never led: a candidate's own
   * campaign term is newer than the leader's, and sending it would fence the leader out.
   */
  heldTerm(): number | undefined {
    return this.led;
  }

  /** The compare that holds only while this candidate's campaign key stands: put it in every write a leader makes. */
  fence(): TxnCompare | undefined {
    const term = this.term();
    return term === undefined ? undefined : { key: this.campaign!.key, modRevision: term };
  }

  /** Gives up leadership (or candidacy) now and campaigns again, so another candidate can lead. */
  async resign(): Promise<void> {
    await this.endCampaign(true);
    this.retryLater();
  }

  /** Every candidate of this election (the leader among them), oldest campaign first. */
  async candidates(): Promise<ControllerView[]> {
    const kvs = (await this.opts.store.list<Candidate>(this.prefix)).sort((a, b) => a.createRevision - b.createRevision);
    return kvs.map((kv, i) => ({ id: kv.value.id, url: kv.value.url, ...(kv.value.node ? { node: kv.value.node } : {}), leader: i === 0, ...(i === 0 ? { term: kv.createRevision } : {}) }));
  }

  /** Every candidate as last read (the watch keeps it current), oldest campaign first; no store call. */
  known(): Candidate[] {
    return this.all;
  }

  /** Resigns for good: stops campaigning and observing. */
  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.retryTimer);
    this.watch?.cancel();
    await this.endCampaign(true);
  }

  private async runCampaign(): Promise<void> {
    const aliveSince = now();
    const lease = await this.opts.store.grantLease(this.opts.ttlMs);
    const key = this.prefix + lease;
    let term: number;
    try {
      term = await this.opts.store.put(key, this.opts.candidate, { lease, expectModRevision: 0 });
    } catch (err) {
      await this.opts.store.revokeLease(lease).catch(() => {});
      throw err;
    }
    if (this.closed) {
      await this.opts.store.revokeLease(lease).catch(() => {});
      return;
    }
    const campaign: Campaign = { lease, key, term, aliveSince, keepAliveTimer: setInterval(() => this.keepAlive(campaign), this.keepAliveEveryMs()) };
    campaign.keepAliveTimer.unref();
    this.campaign = campaign;
    this.armStepDown(campaign);
    await this.refresh();
  }

  /** Keep-alives go out on a timer, not one after another: a hung one must not hold back the next (the store bounds each). */
  private keepAlive(campaign: Campaign): void {
    const sentAt = now();
    this.opts.store.keepAlive(campaign.lease).then(
      () => {
        if (this.campaign !== campaign) return;
        campaign.aliveSince = Math.max(campaign.aliveSince, sentAt);
        this.armStepDown(campaign);
        this.tell();
      },
      (err: unknown) => {
        if (this.campaign !== campaign) return;
        // The lease is gone on the server: campaign again.
        if (err instanceof StoreFailedError && /not found/.test(err.message)) {
          void this.endCampaign(false);
          return this.retryLater();
        }
        this.opts.onError?.(err);
      },
    );
  }

  private armStepDown(campaign: Campaign): void {
    clearTimeout(campaign.stepDownTimer);
    const due = campaign.aliveSince + this.opts.ttlMs - this.marginMs - now();
    // term() turns undefined by itself at the deadline; this tells onChange. Node's timers may fire
    // a little early by the monotonic clock: then look again.
    campaign.stepDownTimer = setTimeout(() => {
      if (this.campaign !== campaign) return;
      if (now() - campaign.aliveSince >= this.opts.ttlMs - this.marginMs) this.tell();
      else this.armStepDown(campaign);
    }, Math.max(1, Math.ceil(due)));
    campaign.stepDownTimer.unref();
  }

  /** Stops keeping the campaign's lease; REVOKE ends it on the server too (best effort: the store may be out of reach). */
  private async endCampaign(revoke: boolean): Promise<void> {
    const campaign = this.campaign;
    if (!campaign) return;
    this.campaign = undefined;
    clearInterval(campaign.keepAliveTimer);
    clearTimeout(campaign.stepDownTimer);
    this.tell();
    // Without a revoke the key stays until its lease runs out: nobody else leads before that anyway.
    const revoking = this.opts.store.revokeLease(campaign.lease).catch(() => {});
    if (revoke) await revoking;
  }

  private retryLater(): void {
    clearTimeout(this.retryTimer);
    if (this.closed) return;
    this.retryTimer = setTimeout(() => {
      if (this.closed || this.campaign) return;
      this.runCampaign().catch((err: unknown) => {
        if (!(err instanceof StoreConflictError)) this.opts.onError?.(err);
        this.retryLater();
      });
    }, RETRY_MS);
    this.retryTimer.unref();
  }

  private keepAliveEveryMs(): number {
    // Three tries within the part of the TTL a leader may use.
    return Math.max(50, Math.floor((this.opts.ttlMs - this.marginMs) / 3));
  }

  /** Runs STEP until it succeeds or the election is closed, reporting each failure. */
  private async untilItWorks(step: () => Promise<void>): Promise<void> {
    for (;;) {
      if (this.closed) return;
      try {
        return await step();
      } catch (err) {
        if (!(err instanceof StoreConflictError)) this.opts.onError?.(err);
        await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
      }
    }
  }

  /** Watches the candidates' keys: every change re-reads them. A watch that fails is made again (until it works). */
  private async observe(): Promise<void> {
    if (this.closed) return;
    const revision = await this.opts.store.currentRevision();
    const watch = await this.opts.store.watch(this.prefix, {
      fromRevision: revision + 1,
      onFailed: () => void this.untilItWorks(() => this.observe()),
    }, () => void this.refresh());
    if (this.closed) return watch.cancel();
    this.watch = watch;
    await this.refresh();
  }

  private refresh(): Promise<void> {
    this.refreshing = this.refreshing.then(async () => {
      if (this.closed) return;
      try {
        const candidates = await this.opts.store.list<Candidate>(this.prefix);
        const campaign = this.campaign;
        // The campaign key went while its lease lives on (deleted by hand): campaign again, or this candidate would never lead.
        // (A list begun before the key was put misses it too: a fresh read tells.)
        if (campaign && !candidates.some((kv) => kv.key === campaign.key)) {
          if ((await this.opts.store.get(campaign.key))?.createRevision !== campaign.term && this.campaign === campaign) {
            void this.endCampaign(true).then(() => this.retryLater());
          }
        }
        this.leader = lowest(candidates);
        this.all = [...candidates].sort((a, b) => a.createRevision - b.createRevision).map((kv) => kv.value);
        this.tell();
      } catch (err) {
        this.opts.onError?.(err);
        setTimeout(() => void this.refresh(), RETRY_MS).unref();
      }
    });
    return this.refreshing;
  }

  /** Tells onChange when the leader as seen (currentLeader) changed. */
  private tell(): void {
    const seen = this.currentLeader();
    if (seen && seen.term === this.campaign?.term) this.led = seen.term;
    if (seen?.term === this.told?.term) return;
    this.told = seen;
    this.opts.onChange?.(seen);
  }
}

function lowest(candidates: KeyValue<Candidate>[]): Leader | undefined {
  let best: KeyValue<Candidate> | undefined;
  for (const kv of candidates) if (!best || kv.createRevision < best.createRevision) best = kv;
  return best && { ...best.value, term: best.createRevision };
}
