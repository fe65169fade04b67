/**
 * Cluster addresses on a runc pair (test/support/runc-pair.ts): the tests play the controller's
 * part, routing a container's address to the node it runs on with the local cluster's address
 * routes script (src/cluster/routes.ts), on the machine and in the pair's test hosts.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeAddressRoutesScript } from '../../src/cluster/routes.js';
import { runUnchecked } from '../../src/shared/exec.js';
import type { AgentContainer, MigrationMode } from '../../src/shared/protocol.js';
import type { RuntimePair } from '../contract/runtime.contract.js';
import { moveOnPair } from './pair-move.js';
import { RUNC_PAIR_NET, RUNC_PAIR_NODES } from './runc-pair.js';

export type PairNode = (typeof RUNC_PAIR_NODES)[number];

/** Address i (1..8) of this pair network's: 198.19.200.0/24 is no node's subnet in the runc pair (201-254) nor in the local cluster. */
export const pairAddress = (i: number): string => {
  assert.ok(i >= 1 && i <= 8, `address ${i}: a pair network has 8`);
  return `198.19.200.${RUNC_PAIR_NET * 8 + i}`;
};

/** The test host of a pair node, as a namespace path. */
export const pairHostNetns = (node: PairNode): string => `/var/run/netns/chmkr${RUNC_PAIR_NET === 2 ? '' : RUNC_PAIR_NET}-${node.host}`;

export class PairAddressRoutes {
  private readonly routed = new Set<string>();

  private constructor(
    private readonly dir: string,
    private readonly command: string[],
  ) {}

  static async create(): Promise<PairAddressRoutes> {
    const dir = await mkdtemp(join(tmpdir(), 'chipmunk-pair-routes-'));
    const hosts = RUNC_PAIR_NODES.map((n) => ({ netns: pairHostNetns(n), address: n.address }));
    return new PairAddressRoutes(dir, (await writeAddressRoutesScript(join(dir, 'address-routes.sh'), hosts)).split(' '));
  }

  /** What the controller does at each placement: the machine and the other test host send `address` to `node`. */
  async routeTo(address: string, node: PairNode): Promise<void> {
    this.routed.add(address);
    const res = await runUnchecked(this.command[0]!, [...this.command.slice(1), address, node.address]);
    assert.equal(res.code, 0, `address routes script: ${res.stderr}`);
  }

  /** A move from the pair's source to its target, the address routed to the target once it runs there. */
  move(pair: RuntimePair, c: AgentContainer, mode: MigrationMode): Promise<AgentContainer> {
    return moveOnPair(pair, c, mode, () => this.routeTo(c.spec.address!, RUNC_PAIR_NODES[1]));
  }

  async cleanup(): Promise<void> {
    for (const address of this.routed) await runUnchecked(this.command[0]!, [...this.command.slice(1), address]);
    await rm(this.dir, { recursive: true, force: true });
  }
}
