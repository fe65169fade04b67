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
import { writeFile } from 'node:fs/promises';
import { InvalidInputError } from '../shared/errors.js';
import { run } from '../shared/exec.js';

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
 * Inside a test host, the route towards the host that runs a container yields to the host's own
 * route to a container it runs (its agent's, metric 0): a placement routed by a controller that
 * was behind (it restarted mid-migration, and its start routed the record it read then) can never
 * shadow the route to the copy that runs here.
 */
const TOWARDS_OWNER_METRIC = 100;

/** A test host as the address routes script sees it: its namespace (a path) and its address. */
export interface RoutedHost {
  netns: string;
  address: string;
}

/**
 * The local cluster's address routes command (the controller's `--address-routes`, run at each
 * placement of a container: src/controller/address-routes.ts), as a shell script: `SCRIPT ADDRESS
 * NODE_ADDRESS` routes ADDRESS/32 via the test host at NODE_ADDRESS on this machine and in every
 * other test host (that host's agent routes it on to the container); `SCRIPT ADDRESS` removes the
 * routes. A script rather than a chipmunk command: it runs at every move, between the commit and
 * the first retransmission that can reach the container, and starting node would cost a second.
 * MACHINE_NETNS (a handle of the machine's namespace) is where the machine's route goes when the
 * controller runs in a test host (HA); without it, in the script's own namespace.
 */
function addressRoutesScript(hosts: RoutedHost[], machineNetns?: string): string {
  for (const h of hosts) {
    if (!/^[\w./-]+$/.test(h.netns) || !/^\d{1,3}(\.\d{1,3}){3}$/.test(h.address)) throw new InvalidInputError(`test host ${h.netns} at ${h.address}: not a namespace path and an IPv4 address`);
  }
  if (machineNetns !== undefined && !/^[\w./-]+$/.test(machineNetns)) throw new InvalidInputError(`machine namespace ${machineNetns}: not a namespace path`);
  const inHost = (h: RoutedHost, args: string) => `nsenter --net=${h.netns} -- ip route ${args}`;
  // HA controllers run inside test hosts: the machine's own routes are reached through its handle.
  const onMachine = (args: string) => (machineNetns ? `nsenter --net=${machineNetns} -- ip route ${args}` : `ip route ${args}`);
  return [
    '#!/bin/sh',
    '# chipmunk local cluster: route a container\'s cluster address (written by `cluster up`; see src/cluster/routes.ts)',
    'set -u',
    'addr=$1',
    'via=${2:-}',
    // Only the test range: a route for any other address could send the machine's traffic astray.
    `case "$addr" in 198.18.*|198.19.*) ;; *) echo "$addr is outside the test range ${TEST_RANGE}" >&2; exit 2 ;; esac`,
    'if [ -z "$via" ]; then',
    `  ${onMachine('del "$addr/32"')} 2>/dev/null`,
    ...hosts.map((h) => `  ${inHost(h, `del "$addr/32" metric ${TOWARDS_OWNER_METRIC}`)} 2>/dev/null`),
    '  exit 0',
    'fi',
    `${onMachine('replace "$addr/32" via "$via"')} || exit 1`,
    ...hosts.map(
      (h) =>
        `if [ "$via" = ${h.address} ]; then ${inHost(h, `del "$addr/32" metric ${TOWARDS_OWNER_METRIC}`)} 2>/dev/null; else ${inHost(h, `replace "$addr/32" via "$via" metric ${TOWARDS_OWNER_METRIC}`)} || exit 1; fi`,
    ),
    '',
  ].join('\n');
}

/** Writes the script (executable) to `path`; returns the command line the controller is given. */
export async function writeAddressRoutesScript(path: string, hosts: RoutedHost[], machineNetns?: string): Promise<string> {
  await writeFile(path, addressRoutesScript(hosts, machineNetns), { mode: 0o755 });
  return `/bin/sh ${path}`;
}
