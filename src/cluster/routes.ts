/**
 * The machine's routes for the local cluster's test range.
 *
 * - 198.18.0.0/15 (RFC 2544's benchmarking range, where every test host and container lives)
 *   gets an `unreachable` route: without it, a packet for an address of the range that no test
 *   host holds would leave through the machine's default route. More specific routes (the
 *   bridge's /24, each node's container subnet) still win, so it only catches strays.
 * - Each node's container subnet is routed to its test host, so the gateway (on this machine)
 *   reaches a container at its own address, with no published port.
 */
import { run, runUnchecked } from '../shared/exec.js';

/** The whole range a test address may take; none of it may ever leave the machine. */
export const TEST_RANGE = '198.18.0.0/15';

/**
 * Installs (or keeps) the guard route; idempotent. `cluster down` leaves it: it blocks only a
 * reserved range, and removing it would reopen the leak for whatever else uses the range.
 */
export async function guardTestRange(): Promise<void> {
  await run('ip', ['route', 'replace', 'unreachable', TEST_RANGE], { op: `install the unreachable route for ${TEST_RANGE}` });
}

/** Routes SUBNET (a node's containers) to the test host at VIA on BRIDGE; idempotent. */
export async function routeContainerSubnet(subnet: string, via: string, bridge: string): Promise<void> {
  await run('ip', ['route', 'replace', subnet, 'via', via, 'dev', bridge], { op: `route ${subnet} via ${via}` });
}

/**
 * Routes a container's cluster address (ContainerSpec.address) to the node it runs on, in the
 * network namespace `netns` (a path: a test host) or the machine's own; idempotent. Called at
 * each move for every test host but the container's own, and the machine (where the gateway
 * runs): the node's agent routes it on to the container (src/agent/runtime/network.ts).
 */
export async function routeContainerAddress(address: string, nodeAddress: string, netns?: string): Promise<void> {
  const args = ['route', 'replace', `${address}/32`, 'via', nodeAddress];
  await run(...ipIn(netns, args), { op: `route ${address} via ${nodeAddress}` });
}

/** Removes what `routeContainerAddress` made (the container is gone); tolerates "no such route". */
export async function unrouteContainerAddress(address: string, netns?: string): Promise<void> {
  const args = ['route', 'del', `${address}/32`];
  await runUnchecked(...ipIn(netns, args));
}

function ipIn(netns: string | undefined, args: string[]): [string, string[]] {
  return netns ? ['nsenter', [`--net=${netns}`, '--', 'ip', ...args]] : ['ip', args];
}
