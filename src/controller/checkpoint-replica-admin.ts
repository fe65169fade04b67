/**
 * The operator's view of the checkpoint replica set and its one lasting change:
 * `chipmunk checkpoint-replicas` (list) and `chipmunk checkpoint-replicas retire URL`.
 *
 * Retiring a replica (a host being decommissioned, alive or already dead):
 * 1. refused, changing nothing, when the URL names no replica the cluster knows (a running
 *    controller's, a peer, or one a commit record names), or when fewer than N active replicas
 *    would remain, or fewer than N of those answer;
 * 2. marked `retiring` in the state store: from then on it takes no new checkpoint and no copy,
 *    and its copies no longer count towards N;
 * 3. a re-replication pass copies every checkpoint that lives on it to the remaining replicas
 *    until N of them hold it intact (from the retiring replica itself while it answers, else from
 *    another copy); any checkpoint still short of N fails the call, naming it, and the replica
 *    stays `retiring` (the leader's pass goes on copying every few seconds; the same command
 *    finishes the retirement once it can);
 * 4. marked `retired`: never listed, read, copied to or uploaded to again, even if it answers;
 *    the commit records stop naming it.
 * Retiring a retired replica answers at once (idempotent).
 */
import { ConflictError, NotFoundError, UnavailableError } from '../shared/errors.js';
import type { CheckpointReplicaView, RetireReplicaResult } from '../shared/replica-protocol.js';
import type { ReplicatedCatalog } from './checkpoint-replicas.js';
import type { Members } from './checkpoint-replica-set.js';

/** A controller serving a checkpoint store replica, as its election campaign (or this process) says. */
export interface ReplicaHost {
  checkpointStore: string;
  id: string;
  node?: string;
}

export interface ReplicaAdminOptions {
  catalog: ReplicatedCatalog;
  /** The controllers known to run and the stores they serve. */
  hosts: () => ReplicaHost[];
}

export class ReplicaAdmin {
  constructor(private readonly opts: ReplicaAdminOptions) {}

  /**
   * Every replica: active ones (those of running controllers in their campaigns' order, the same
   * whichever controller answers), then those only records name, retiring and retired ones.
   */
  async list(): Promise<CheckpointReplicaView[]> {
    const { catalog } = this.opts;
    const members = await catalog.set.members();
    const recorded = await catalog.recordedOn();
    const since = new Map(members.retirements.map((r) => [r.value.url, r.value.since]));
    const hosts = this.opts.hosts();
    const hosted = hosts.map((h) => h.checkpointStore).filter((url) => members.active.includes(url));
    const urls = [...new Set([...hosted, ...members.active, ...recorded.keys(), ...members.retiring, ...members.retired])];
    return Promise.all(
      urls.map(async (url): Promise<CheckpointReplicaView> => {
        const host = hosts.find((h) => h.checkpointStore === url);
        // Asked even when retired: whether it came back is worth knowing, and a read uses nothing of it.
        const usage = await catalog.set.ask(url, () => catalog.set.client(url).usage(), true);
        const at = since.get(url);
        return {
          url,
          status: statusOf(url, members),
          ...(host ? { controller: host.id, ...(host.node ? { node: host.node } : {}) } : {}),
          reachable: usage !== undefined,
          checkpoints: members.retired.has(url) ? 0 : (recorded.get(url) ?? 0),
          ...(usage ? { stored: usage.checkpoints, bytes: usage.bytes } : {}),
          ...(at !== undefined ? { since: at } : {}),
        };
      }),
    );
  }

  async retire(input: string): Promise<RetireReplicaResult> {
    const url = input.replace(/\/+$/, '');
    const { catalog } = this.opts;
    const n = catalog.replicaCount;
    const members = await catalog.set.members();
    const record = members.retirements.find((r) => r.value.url === url);
    if (record?.value.status === 'retired') return { url, status: 'retired', alreadyRetired: true, checkpoints: 0, copies: 0 };

    const recorded = await catalog.recordedOn();
    if (!record && !catalog.set.candidates().includes(url) && !recorded.has(url)) {
      const known = [...new Set([...members.active, ...recorded.keys(), ...members.retiring])].filter((u) => !members.retired.has(u));
      throw new NotFoundError(`${url} is no checkpoint replica of this cluster (known: ${known.join(', ') || 'none'}): give a URL as \`chipmunk checkpoint-replicas\` lists it`, { url, known });
    }
    const remaining = members.active.filter((u) => u !== url);
    if (remaining.length < n) {
      throw new ConflictError(
        `retiring ${url} would leave ${remaining.length} active checkpoint replica(s) (${remaining.join(', ') || 'none'}), fewer than the ${n} each checkpoint needs (--checkpoint-replicas): add a replica first (start a controller on another host on the same etcd store, or name it in --checkpoint-store-peers), or lower --checkpoint-replicas; nothing was changed`,
        { url, remaining, needed: n },
      );
    }
    // Asked even if silent lately: an operator's command deserves a fresh answer.
    const up = await catalog.set.answering(remaining, true);
    const answering = remaining.filter((_, i) => up[i]);
    if (answering.length < n) {
      const down = remaining.filter((_, i) => !up[i]);
      throw new UnavailableError(
        `only ${answering.length} of the remaining checkpoint replicas answer (not answering: ${down.join(', ')}), fewer than the ${n} that must take the copies of ${url}: bring them back and try again; nothing was changed`,
        { url, answering, down, needed: n },
      );
    }

    // From here on nothing new goes to it; its copies are copied away.
    const retiring = record ? record.modRevision : await catalog.set.mark(url, 'retiring', 0);
    const copies = await catalog.replicate();
    const { living, under } = await catalog.underReplicatedOn(url);
    if (under.length > 0) {
      const named = under.slice(0, 5).map((c) => `${c.id} of ${c.container} (${c.intact.length} of ${n})`);
      throw new UnavailableError(
        `${url} stays retiring: ${under.length} checkpoint(s) living on it could not be brought to ${n} intact copies on the other replicas: ${named.join(', ')}${under.length > 5 ? ', ...' : ''}. The leader keeps copying every few seconds (its log says why a copy failed); run the same command again to finish${catalog.set.candidates().includes(url) ? '' : `, or bring ${url} back if it held the only intact copy`}`,
        { url, under },
      );
    }
    await catalog.set.mark(url, 'retired', retiring);
    await catalog.dropFromRecords(url);
    return { url, status: 'retired', alreadyRetired: false, checkpoints: living, copies };
  }
}

function statusOf(url: string, members: Members): CheckpointReplicaView['status'] {
  if (members.retired.has(url)) return 'retired';
  return members.retiring.includes(url) ? 'retiring' : 'active';
}
