/**
 * Where etcd's raft leadership moves when it sits on the leading controller's host, and how
 * sparingly (src/controller/store/etcd-raft.ts). The move itself is measured on the HA local
 * cluster by bench/ha ("etcd raft leader then").
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import pino from 'pino';
import { RaftPlacement, raftTransferTarget, type RaftMember } from '../../src/controller/store/etcd-raft.js';

const members: RaftMember[] = [
  { id: '1', name: 'node1', clientUrls: ['http://198.18.0.11:2379'], raftIndex: 500 },
  { id: '2', name: 'node2', clientUrls: ['http://198.18.0.12:2379'], raftIndex: 498 },
  { id: '3', name: 'node3', clientUrls: ['http://198.18.0.13:2379'], raftIndex: 499 },
];

describe('etcd raft leadership off the leading controller', () => {
  it('moves it from the member on our host to the most caught-up member on another host', () => {
    assert.equal(raftTransferTarget(members, '1', '198.18.0.11')?.name, 'node3');
  });

  it('leaves it where it is when the raft leader runs on another host', () => {
    assert.equal(raftTransferTarget(members, '3', '198.18.0.11'), undefined);
  });

  it('moves nothing while a member does not answer: a transfer then could leave no leader for an election', () => {
    const silent = members.map((m) => (m.name === 'node2' ? { ...m, raftIndex: undefined } : m));
    assert.equal(raftTransferTarget(silent, '1', '198.18.0.11'), undefined);
  });

  it('picks no member that lags the leader far behind (the transfer would wait for it)', () => {
    const behind = members.map((m) => (m.id === '1' ? m : { ...m, raftIndex: 100 }));
    assert.equal(raftTransferTarget(behind, '1', '198.18.0.11'), undefined);
  });

  it('leaves it when no other member could take it, or the leader is unknown', () => {
    assert.equal(raftTransferTarget([members[0]!], '1', '198.18.0.11'), undefined);
    assert.equal(raftTransferTarget(members, '9', '198.18.0.11'), undefined);
  });

  it('matches hosts by name, whatever the case or IPv6 brackets', () => {
    const v6: RaftMember[] = [
      { id: 'a', name: 'a', clientUrls: ['http://[fd00::1]:2379'], raftIndex: 10 },
      { id: 'b', name: 'b', clientUrls: ['http://ETCD-B:2379'], raftIndex: 10 },
    ];
    assert.equal(raftTransferTarget(v6, 'a', '[fd00::1]')?.name, 'b');
    assert.equal(raftTransferTarget(v6, 'b', 'etcd-b')?.name, 'a');
  });
});

describe('RaftPlacement', () => {
  const log = pino({ level: 'silent' });

  it('moves at most once per gap, and never while a move is in flight', async () => {
    let calls = 0;
    let finish: (() => void) | undefined;
    const placement = new RaftPlacement({
      endpoints: ['e:2379'],
      ownHost: 'h',
      log,
      minGapMs: 60_000,
      move: async () => {
        calls++;
        await new Promise<void>((resolve) => (finish = resolve));
        return members[2];
      },
    });
    const first = placement.lookOnce();
    assert.equal(await placement.lookOnce(), undefined, 'a second look while the first move runs does nothing');
    finish!();
    assert.equal((await first)?.name, 'node3');
    assert.equal(await placement.lookOnce(), undefined, 'within the gap: no second move');
    assert.equal(calls, 1);
  });

  it('looks again at once when there was nothing to move (the gap counts from a move, or a failed one)', async () => {
    let calls = 0;
    const placement = new RaftPlacement({ endpoints: ['e:2379'], ownHost: 'h', log, minGapMs: 60_000, move: async () => (calls++, undefined) });
    await placement.lookOnce();
    await placement.lookOnce();
    assert.equal(calls, 2);
    const failing = new RaftPlacement({ endpoints: ['e:2379'], ownHost: 'h', log, minGapMs: 60_000, move: async () => (calls++, Promise.reject(new Error('no leader'))) });
    await failing.lookOnce();
    await failing.lookOnce();
    assert.equal(calls, 3, 'a failed move waits the gap too');
  });
});
