import type { Logger } from 'pino';
import { Election, type Candidate, type Leader } from './election.js';
import type { ControllerView } from '../shared/protocol.js';
import type { StateStore, TxnCompare } from './store/types.js';

/**
 * Runs the controller's background work (schedulers, failovers, settling what an earlier leader
 * left) only while this controller leads. With a store inside this process there is one
 * controller and it always leads; with etcd the controllers elect one (election.ts), the others
 * pass mutations on to it (forward.ts), and its writes carry its fence (store/fenced.ts), so work
 * still under way when it stepped down writes nothing more.
 */

export interface LeaderWork {
  start(): Promise<void>;
  /** Stops starting new work. */
  stop(): void;
}

export interface ElectedOptions {
  store: StateStore;
  ttlMs: number;
  work: LeaderWork;
  log: Logger;
}

export class Leadership {
  private working = false;
  /** Start and stop one after the other, in the order leadership changed. */
  private transitions: Promise<void> = Promise.resolve();
  private election: Election | undefined;

  private constructor(
    private readonly work: LeaderWork,
    private readonly log: Logger,
    private readonly elected?: Omit<ElectedOptions, 'work' | 'log'>,
  ) {}

  /** The only controller: it leads from start(). */
  static alone(work: LeaderWork, log: Logger): Leadership {
    return new Leadership(work, log);
  }

  /** One of several controllers: from start() it does the work while the election makes it leader. */
  static elected(opts: ElectedOptions): Leadership {
    return new Leadership(opts.work, opts.log, { store: opts.store, ttlMs: opts.ttlMs });
  }

  /** Starts the work (alone), or campaigns as CANDIDATE (elected). */
  async start(candidate: Candidate): Promise<void> {
    if (!this.elected) {
      this.working = true;
      await this.work.start();
      return;
    }
    this.election = new Election({
      store: this.elected.store,
      candidate,
      ttlMs: this.elected.ttlMs,
      onChange: (leader) => this.follow(leader),
      onError: (err) => this.log.warn({ err: (err as Error).message }, 'election: a store call failed; trying again'),
    });
    await this.election.start();
  }

  /** Whether this controller leads now (and its leadership is surely still valid). */
  leading(): boolean {
    return this.elected ? this.election?.term() !== undefined : this.working;
  }

  /** The leader this controller sees; undefined when alone (it is the leader) or when none is known. */
  leader(): Leader | undefined {
    return this.election?.currentLeader();
  }

  /** The controllers of the cluster: the candidates of the election, or this one alone. */
  async controllers(self: Candidate): Promise<ControllerView[]> {
    if (!this.election) return [{ id: self.id, url: self.url, ...(self.node ? { node: self.node } : {}), leader: true }];
    return this.election.candidates();
  }

  /** The checkpoint store replicas the running controllers published (their campaigns); none when alone. */
  checkpointStores(): string[] {
    return (this.election?.known() ?? []).flatMap((c) => (c.checkpointStore ? [c.checkpointStore] : []));
  }

  /**
   * The controllers known to run that serve a checkpoint store: the candidates of the election
   * (this one among them even while its campaign key is being made again), or this one alone.
   */
  checkpointStoreHosts(self: Candidate): (Candidate & { checkpointStore: string })[] {
    const known = this.election?.known() ?? [];
    const all = known.some((c) => c.id === self.id) ? known : [self, ...known];
    return all.flatMap((c) => (c.checkpointStore ? [{ ...c, checkpointStore: c.checkpointStore }] : []));
  }

  /** What calls to agents and the gateway carry (election.ts heldTerm); none when alone. */
  heldTerm(): number | undefined {
    return this.election?.heldTerm();
  }

  /** The compare every write of this leader carries; undefined while it does not lead. */
  fence(): TxnCompare | undefined {
    return this.election?.fence();
  }

  async close(): Promise<void> {
    await this.election?.close();
    this.transitions = this.transitions.then(() => this.setWorking(false));
    await this.transitions;
  }

  private follow(leader: Leader | undefined): void {
    this.log.info({ leader }, leader ? `controller ${leader.id} leads (term ${leader.term})` : 'no controller leads');
    this.transitions = this.transitions.then(() => this.setWorking(this.leading()));
  }

  private async setWorking(lead: boolean): Promise<void> {
    if (lead === this.working) return;
    this.working = lead;
    if (!lead) {
      this.log.warn('this controller no longer leads: its background work stops');
      this.work.stop();
      return;
    }
    this.log.info({ term: this.election?.term() }, 'this controller leads: its background work starts');
    await this.work.start().catch((err: unknown) => this.log.error({ err: (err as Error).message }, 'starting the leader work failed'));
  }
}
