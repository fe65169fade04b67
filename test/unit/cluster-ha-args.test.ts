/**
 * The command line `cluster up --ha` gives each node's controller (src/cluster/ha.ts): the etcd
 * store of every member, and its own URL advertised, which is also the checkpoint store it
 * publishes on etcd. No peer list: the replicas are the controllers running on etcd
 * (test/integration/checkpoint-replicas-etcd.test.ts shows that a controller started so is a
 * replica to the others), so a replica retired with `chipmunk checkpoint-replicas retire` is not
 * named again on any command line.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { haControllerArgs, haControllerUrl, type HaMember } from '../../src/cluster/ha.js';

const members: HaMember[] = [
  { name: 'node1', address: '198.19.0.11', netns: 'chipmunk-node1' },
  { name: 'node2', address: '198.19.0.12', netns: 'chipmunk-node2' },
  { name: 'node3', address: '198.19.0.13', netns: 'chipmunk-node3' },
];

/** The value after FLAG, which must appear once. */
function option(args: string[], flag: string): string {
  assert.equal(args.filter((a) => a === flag).length, 1, `${flag} given once`);
  return args[args.indexOf(flag) + 1]!;
}

describe('the HA controller command line', () => {
  const args = haControllerArgs({
    member: members[1]!,
    members,
    dataDir: '/var/lib/chipmunk-test/node2',
    tokenFile: '/var/lib/chipmunk-test/token',
    gatewayApi: '198.19.0.1:7100',
    gatewayHost: '198.19.0.1',
    chipmunkBin: '/opt/chipmunk/bin/chipmunk.mjs',
  });

  it('advertises the URL the others reach it at, which is the checkpoint store it publishes, and names no peers', () => {
    assert.deepEqual(args.slice(0, 2), ['/opt/chipmunk/bin/chipmunk.mjs', 'controller']);
    assert.equal(option(args, '--advertise-url'), haControllerUrl('198.19.0.12'));
    assert.equal(option(args, '--listen'), `198.19.0.12:${new URL(haControllerUrl('198.19.0.12')).port}`);
    assert.equal(option(args, '--node'), 'node2');
    assert.ok(!args.includes('--checkpoint-store-peers'), 'replicas come from the election entries on etcd');
  });

  it('stores its state on every etcd member and keeps its checkpoints in its node\'s data dir', () => {
    assert.equal(option(args, '--store'), 'etcd://198.19.0.11:2379,198.19.0.12:2379,198.19.0.13:2379/chipmunk');
    assert.equal(option(args, '--checkpoint-dir'), '/var/lib/chipmunk-test/node2/checkpoints');
    assert.equal(option(args, '--token-file'), '/var/lib/chipmunk-test/token');
  });
});
