import type { Logger } from 'pino';
import { Election, type Candidate, type Leader } from './election.js';
import type { StateStore } from './store/types.js';

/**
 * Runs the controller's background work (schedulers, failovers, settling what an earlier leader
 * left) only while this controller leads. With a store inside this process there is one
 * controller and it always leads; with etcd the controllers elect one (election.ts).
 *
 * Followers pass mutations on to the leader (forward.ts). Not yet (issue 10, part 3): work that
 * was under way when this controller stepped down runs on; fencing its store writes by the term
 * will stop it.
 */

export interface LeaderWork {
  start(): Promise<void>;
  /** Stops starting new work. */
  stop(): void;
}

export interface ElectedOptions {
  store: StateStore;
  candidate: Candidate;
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
  ) {}

  /** The only controller: it leads from now on. */
  static async alone(work: LeaderWork, log: Logger): Promise<Leadership> {
    const leadership = new Leadership(work, log);
    leadership.working = true;
    await work.start();
    return leadership;
  }

  /** One of several controllers: it does the work while the election makes it leader. */
  static async elect(opts: ElectedOptions): Promise<Leadership> {
    const leadership = new Leadership(opts.work, opts.log);
    leadership.election = new Election({
      store: opts.store,
      candidate: opts.candidate,
      ttlMs: opts.ttlMs,
      onChange: (leader) => leadership.follow(leader),
      onError: (err) => opts.log.warn({ err: (err as Error).message }, 'election: a store call failed; trying again'),
    });
    await leadership.election.start();
    return leadership;
  }

  /** Whether this controller leads now (and its leadership is surely still valid). */
  leading(): boolean {
    return this.election ? this.election.term() !== undefined : this.working;
  }

  /** The leader this controller sees; undefined when alone (it is the leader) or when none is known. */
  leader(): Leader | undefined {
    return this.election?.currentLeader();
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
