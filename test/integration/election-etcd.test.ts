/**
 * Leader election on a real etcd: candidates in processes of their own whose leader is killed,
 * and a leader cut off from etcd that must stop leading before etcd lets another lead.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { Election, type Leader } from '../../src/controller/election.js';
import { EtcdStore } from '../../src/controller/store/index.js';
import { startEtcd, type EtcdCluster } from '../support/etcd.js';
import { startTcpProxy } from '../support/tcp-proxy.js';
import { waitFor } from '../support/wait.js';

const CANDIDATE = fileURLToPath(new URL('../support/election-candidate.ts', import.meta.url));
const TTL_MS = 1000;

let shared: Promise<EtcdCluster> | undefined;
const sharedEtcd = () => (shared ??= startEtcd());
after(async () => (await shared)?.stop());

interface CandidateProcess {
  id: string;
  child: ChildProcess;
  /** Every leader it reported, with when (ms since the epoch). */
  seen: { leader: Leader | null; at: number }[];
  latest(): Leader | null | undefined;
}

function spawnCandidate(endpoints: string, id: string): CandidateProcess {
  const child = spawn(process.execPath, ['--import', 'tsx', CANDIDATE, endpoints, id, String(TTL_MS)], { stdio: ['ignore', 'pipe', 'inherit'] });
  const seen: CandidateProcess['seen'] = [];
  createInterface({ input: child.stdout! }).on('line', (line) => {
    const parsed = JSON.parse(line) as { leader?: Leader | null; at: number };
    if (parsed.leader !== undefined) seen.push({ leader: parsed.leader, at: parsed.at });
  });
  return { id, child, seen, latest: () => seen.at(-1)?.leader };
}

async function killProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, 'exit');
  child.kill('SIGKILL');
  await exited;
}

describe('Election on a real etcd', { concurrency: false }, () => {
  it("hands leadership on when the leader's process is killed: within the lease, one leader at a time, terms growing", async (t) => {
    const etcd = await sharedEtcd();
    const candidates = ['c1', 'c2', 'c3'].map((id) => spawnCandidate(etcd.endpoints, id));
    try {
      /** The leader every live candidate names, once they agree on one other than the one killed. */
      const agreed = async (killed?: string) =>
        waitFor(
          () => {
            const alive = candidates.filter((c) => c.child.exitCode === null && c.child.signalCode === null);
            const leaders = alive.map((c) => c.latest());
            return leaders[0] && leaders[0].id !== killed && leaders.every((l) => l?.term === leaders[0]!.term) ? leaders[0] : undefined;
          },
          15_000,
          'the live candidates to agree on a leader',
        );
      const terms: number[] = [];
      for (let round = 0; round < 2; round++) {
        const leader = await agreed();
        terms.push(leader.term);
        const killedAt = Date.now();
        await killProcess(candidates.find((c) => c.id === leader.id)!.child);
        const next = await agreed(leader.id);
        const tookOverAt = Math.max(...candidates.filter((c) => c.child.exitCode === null && c.child.signalCode === null).map((c) => c.seen.at(-1)!.at));
        // etcd ends a lease up to 500 ms after its TTL (it looks every 500 ms).
        assert.ok(tookOverAt - killedAt < TTL_MS + 1500, `a new leader after ${tookOverAt - killedAt} ms`);
        t.diagnostic(`leader ${leader.id} killed: ${next.id} leads ${tookOverAt - killedAt} ms later (lease ${TTL_MS} ms)`);
        terms.push(next.term);
      }
      assert.ok(terms[1] > terms[0] && terms[3] > terms[2], `terms ${terms.join(', ')}`);
    } finally {
      await Promise.all(candidates.map((c) => killProcess(c.child)));
    }
  });

  it('a leader cut off from etcd steps down before etcd ends its lease; another leads; its old fence lets no write through', async (t) => {
    const etcd = await sharedEtcd();
    const proxy = await startTcpProxy(etcd.endpoints);
    const cutStore = await EtcdStore.open([proxy.endpoint]);
    const directStore = await EtcdStore.open([etcd.endpoints]);
    const changes: { who: string; leader: Leader | undefined; at: number }[] = [];
    const make = (store: EtcdStore, id: string) =>
      new Election({ store, candidate: { id, url: `http://${id}` }, ttlMs: TTL_MS, name: 'cut', onChange: (leader) => changes.push({ who: id, leader, at: performance.now() }) });
    const a = make(cutStore, 'a');
    const b = make(directStore, 'b');
    try {
      await a.start();
      await b.start();
      const term = a.term()!;
      assert.ok(term, 'a, first to campaign, leads');
      const fence = a.fence()!;
      let expiredAt = 0;
      await directStore.watch('/election/cut/', {}, (ev) => {
        if (ev.type === 'delete' && ev.kv.createRevision === term) expiredAt = performance.now();
      });

      proxy.cut();
      const cutAt = performance.now();
      await waitFor(() => changes.find((c) => c.who === 'a' && c.leader === undefined), 3000, 'a to step down');
      const steppedDownAt = changes.find((c) => c.who === 'a' && c.leader === undefined)!.at;
      assert.equal(a.term(), undefined);
      await waitFor(() => expiredAt, 5000, "etcd to end a's lease");
      assert.ok(steppedDownAt < expiredAt, `a stepped down ${Math.round(steppedDownAt - cutAt)} ms after the cut, etcd ended its lease ${Math.round(expiredAt - cutAt)} ms after`);
      await waitFor(() => b.term(), 3000, 'b to lead');
      assert.ok(b.term()! > term);
      t.diagnostic(
        `cut at 0: a stepped down at ${Math.round(steppedDownAt - cutAt)} ms, etcd ended its lease at ${Math.round(expiredAt - cutAt)} ms, ` +
          `b led at ${Math.round(changes.find((c) => c.who === 'b' && c.leader?.id === 'b')!.at - cutAt)} ms`,
      );

      proxy.restore();
      // Once a's store reaches etcd again (the client rests a member that failed for a second).
      const late = await waitFor(
        () => cutStore.txn({ compare: [fence], ops: [{ type: 'put', key: '/cut/late-write', value: 'from a deposed leader' }] }),
        5000,
        "a's store to reach etcd again",
      );
      assert.equal(late.succeeded, false, 'a write fenced by the old term is refused');
      assert.equal(await directStore.get('/cut/late-write'), undefined);
      await waitFor(() => a.currentLeader()?.id === 'b', 5000, 'a, campaigning again, to follow b');
      assert.equal(a.term(), undefined);
    } finally {
      await a.close();
      await b.close();
      await cutStore.close();
      await directStore.close();
      await proxy.close();
    }
  });

  for (const ttlMs of [2000, 1000]) {
    it(`a leader on ${ttlMs / 1000} s leases rides out the death of each of three etcd members in turn under the same term`, async (t) => {
      const cluster = await startEtcd({ members: 3 });
      const store = await EtcdStore.open(cluster.endpoints.split(','));
      const changes: { leader: Leader | undefined; at: number }[] = [];
      const onChange = (leader: Leader | undefined) => changes.push({ leader, at: performance.now() });
      const election = new Election({ store, candidate: { id: 'a', url: 'http://a' }, ttlMs, onChange });
      try {
        await election.start();
        const term = election.term();
        assert.ok(term);
        for (const member of cluster.members) {
          await member.kill();
          await sleep(2 * ttlMs);
          await waitFor(() => election.term() === term, 2000, `a to lead under term ${term} with ${member.name} dead`);
          await member.start();
          await sleep(500);
        }
        // While etcd elects a new leader among its members no keep-alive gets through: with short
        // leases the leader may pause then (it cannot be sure of its lease), but it resumes under the
        // same term, and nobody else leads meanwhile.
        assert.ok(changes.every((c) => c.leader === undefined || c.leader.term === term), 'no other leader, no new term');
        const pauses = changes.flatMap((c, i) => (c.leader === undefined ? [Math.round((changes[i + 1]?.at ?? performance.now()) - c.at)] : []));
        t.diagnostic(`paused ${pauses.length} time(s)${pauses.length ? `: ${pauses.join(', ')} ms` : ''}`);
        // How often it pauses depends on the machine's load (a timing, not a property); that every
        // pause ends well within its lease, under the same term, is the property.
        assert.ok(pauses.every((ms) => ms < ttlMs), `every pause ended within the ${ttlMs} ms lease: ${pauses.join(', ')} ms`);
      } finally {
        await election.close();
        await store.close();
        await cluster.stop();
      }
    });
  }
});
