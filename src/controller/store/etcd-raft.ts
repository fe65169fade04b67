/**
 * Keeps etcd's raft leadership off the leading controller's host (docs/design.md, "Raft leader
 * placement").
 *
 * When one host runs both etcd's raft leader and the leading controller, its death costs a raft
 * election first, and the new raft leader then gives every lease a fresh TTL plus an election
 * timeout (etcd's lessor does so on promotion): another controller leads only after both, about
 * twice a lease (bench/ha's "etcd raft leader then" column: 2.2-2.3 s against 1.0-1.1 s with 1 s
 * leases). With the two roles on different hosts, any one host's death costs one of them.
 *
 * A leadership transfer is not free: proposals pause while it runs, and the new raft leader
 * renews every lease. So the leading controller moves it sparingly: not in its first seconds as
 * leader (it is settling what the last one left), one transfer at a time, at most once per
 * `minGapMs`, only when every member answers, and only to a member that has caught up (its
 * raft index close to the leader's).
 */
import { Etcd3 } from 'etcd3';
import type { Logger } from 'pino';

const CALL_TIMEOUT_MS = 2_000;
/** A transferee this many entries behind would make the transfer wait for it to catch up: not one to pick. */
const MAX_LAG_ENTRIES = 100;

export interface RaftMember {
  id: string;
  name: string;
  clientUrls: string[];
  /** Its raft index as its own status says; undefined when it did not answer. */
  raftIndex?: number;
}

/** The host part of a URL (brackets kept off IPv6), lower-cased; undefined if it does not parse. */
function hostOf(url: string): string | undefined {
  try {
    return new URL(url).hostname.replace(/^\[|\]$/g, '').toLowerCase();
  } catch {
    return undefined;
  }
}

/**
 * The member raft leadership should move to: undefined unless the leader runs on `ownHost` (one
 * of its client URLs names it), or when a member did not answer (a transfer now could leave no
 * leader for an election's time); else the most caught-up other member not on `ownHost`, if it
 * lags the leader by no more than a few entries.
 */
export function raftTransferTarget(members: RaftMember[], leaderId: string, ownHost: string): RaftMember | undefined {
  const own = ownHost.replace(/^\[|\]$/g, '').toLowerCase();
  const onOwnHost = (m: RaftMember) => m.clientUrls.some((url) => hostOf(url) === own);
  const leader = members.find((m) => m.id === leaderId);
  if (!leader || !onOwnHost(leader) || leader.raftIndex === undefined) return undefined;
  if (members.some((m) => m.raftIndex === undefined)) return undefined;
  const candidates = members.filter((m) => m.id !== leaderId && !onOwnHost(m) && leader.raftIndex! - m.raftIndex! <= MAX_LAG_ENTRIES);
  return candidates.sort((a, b) => b.raftIndex! - a.raftIndex!)[0];
}

function client(hosts: string[]): Etcd3 {
  return new Etcd3({ hosts, dialTimeout: CALL_TIMEOUT_MS, defaultCallOptions: () => ({ deadline: Date.now() + CALL_TIMEOUT_MS }) });
}

/** The members with each one's raft index (from its own status), and the leader's id. */
async function readMembers(endpoints: string[]): Promise<{ leaderId: string; members: RaftMember[] }> {
  const any = client(endpoints.map((endpoint) => `http://${endpoint}`));
  try {
    const { leader: leaderId } = await any.maintenance.status();
    const listed = (await any.cluster.memberList({})).members;
    const members = await Promise.all(
      listed.map(async (m): Promise<RaftMember> => {
        const member: RaftMember = { id: m.ID, name: m.name, clientUrls: m.clientURLs };
        if (m.clientURLs.length === 0) return member;
        const one = client(m.clientURLs);
        try {
          const status = await one.maintenance.status();
          return { ...member, raftIndex: Number(status.raftIndex) };
        } catch {
          return member;
        } finally {
          one.close();
        }
      }),
    );
    return { leaderId, members };
  } finally {
    any.close();
  }
}

/**
 * Moves raft leadership away from `ownHost`'s member if it has it and a caught-up member on
 * another host can take it. Returns the member it went to, or undefined when nothing moved.
 */
export async function moveRaftLeaderOff(endpoints: string[], ownHost: string): Promise<RaftMember | undefined> {
  const { leaderId, members } = await readMembers(endpoints);
  const target = raftTransferTarget(members, leaderId, ownHost);
  const leader = members.find((m) => m.id === leaderId);
  if (!target || !leader) return undefined;
  // Only the raft leader takes MoveLeader: asked of that member alone.
  const atLeader = client(leader.clientUrls);
  try {
    await atLeader.maintenance.moveLeader({ targetID: target.id });
  } finally {
    atLeader.close();
  }
  return target;
}

export interface RaftPlacementOptions {
  /** The etcd members (HOST:PORT), as the store spec names them. */
  endpoints: string[];
  /** This controller's host, as etcd members' client URLs name hosts. */
  ownHost: string;
  log: Logger;
  /** First look this long after leading starts (default 3 s). */
  settleMs?: number;
  /** Then looks this often (default 5 s). */
  everyMs?: number;
  /** At most one transfer this often (default 30 s). */
  minGapMs?: number;
  /** The move itself (tests); default moveRaftLeaderOff. */
  move?: (endpoints: string[], ownHost: string) => Promise<RaftMember | undefined>;
}

/** While this controller leads: raft leadership kept off its host, sparingly (see the top of this file). */
export class RaftPlacement {
  private timer?: NodeJS.Timeout;
  private inFlight = false;
  private lastMoveAt = -Infinity;
  private generation = 0;

  constructor(private readonly opts: RaftPlacementOptions) {}

  start(): void {
    this.stop();
    const generation = ++this.generation;
    const look = (delay: number) => {
      this.timer = setTimeout(() => {
        void this.lookOnce().finally(() => {
          if (generation === this.generation) look(this.opts.everyMs ?? 5_000);
        });
      }, delay);
      this.timer.unref();
    };
    look(this.opts.settleMs ?? 3_000);
  }

  stop(): void {
    this.generation++;
    clearTimeout(this.timer);
    this.timer = undefined;
  }

  /** One look: moves raft leadership off this host if it is there and the gap since the last move allows. */
  async lookOnce(): Promise<RaftMember | undefined> {
    if (this.inFlight || performance.now() - this.lastMoveAt < (this.opts.minGapMs ?? 30_000)) return undefined;
    this.inFlight = true;
    try {
      const moved = await (this.opts.move ?? moveRaftLeaderOff)(this.opts.endpoints, this.opts.ownHost);
      if (moved) {
        this.lastMoveAt = performance.now();
        this.opts.log.info({ to: moved.name }, `etcd raft leadership moved off this controller's host to member ${moved.name}: one host's death then costs a raft election or a leader lease, not both`);
      }
      return moved;
    } catch (err) {
      // Tried again at the next look: a failed transfer leaves the leader where it was.
      this.lastMoveAt = performance.now();
      this.opts.log.warn({ err: (err as Error).message }, 'moving etcd raft leadership off this host failed');
      return undefined;
    } finally {
      this.inFlight = false;
    }
  }
}
