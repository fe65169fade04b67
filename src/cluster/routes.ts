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
import { InvalidInputError } from '../shared/errors.js';
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

/** A test host as `cluster route` sees it: its namespace (a path) and its address. */
export interface RoutedHost {
  netns: string;
  address: string;
}

/**
 * The local cluster's address routes command (`chipmunk cluster route`, run by the controller:
 * src/controller/address-routes.ts): `address` is routed to the test host at `nodeAddress` on this
 * machine and in every other test host; that host's agent routes it on to the container. Without
 * `nodeAddress` (the container was removed) the routes go.
 */
export async function routeAddressInLocalCluster(hosts: RoutedHost[], address: string, nodeAddress?: string): Promise<void> {
  // Only the test range: a route for any other address could send the machine's traffic astray.
  if (!/^198\.1[89]\.\d{1,3}\.\d{1,3}$/.test(address)) throw new InvalidInputError(`${address} is outside the local cluster's test range ${TEST_RANGE}: its containers' addresses come from there`);
  if (nodeAddress === undefined) {
    await unrouteContainerAddress(address);
    for (const host of hosts) await unrouteContainerAddress(address, host.netns);
    return;
  }
  if (!hosts.some((h) => h.address === nodeAddress)) throw new InvalidInputError(`${nodeAddress} is no test host of the local cluster (${hosts.map((h) => h.address).join(', ')})`);
  await routeContainerAddress(address, nodeAddress);
  for (const host of hosts) if (host.address !== nodeAddress) await routeContainerAddress(address, nodeAddress, host.netns);
}

/** `--hosts` of `cluster route`: NETNS_PATH=ADDRESS,... */
export function formatRoutedHosts(hosts: RoutedHost[]): string {
  return hosts.map((h) => `${h.netns}=${h.address}`).join(',');
}

export function parseRoutedHosts(text: string): RoutedHost[] {
  return text.split(',').map((item) => {
    const [netns, address] = item.split('=');
    if (!netns || !address) throw new InvalidInputError(`--hosts '${text}': give NETNS_PATH=ADDRESS pairs separated by commas`);
    return { netns, address };
  });
}
