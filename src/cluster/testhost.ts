/**
 * Test hosts: several "machines" on one. A test host is a network namespace whose `eth0` is one
 * end of a veth pair; the other end is plugged into a bridge on the machine, which also carries
 * the gateway address. Everything here is idempotent, so a half-finished create or delete can
 * simply be run again.
 *
 * Commands enter a test host with `nsenter --net=`, never `ip netns exec`: the latter remounts
 * /sys, which hides /sys/fs/cgroup from runc.
 */
import { readdir, readFile, readlink, stat, writeFile } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';

import { ConflictError, InvalidInputError, RuntimeFailedError } from '../shared/errors.js';
import { run, runUnchecked } from '../shared/exec.js';
import { guardTestRange } from './routes.js';

/** Where `ip netns add` puts a namespace's handle. */
export const NETNS_DIR = '/var/run/netns';

/** Linux refuses longer interface names (IFNAMSIZ - 1). */
const MAX_INTERFACE_NAME = 15;

/** The bridge and naming scheme a set of test hosts shares. */
export interface TestNetwork {
  /** Bridge on the machine that every test host's veth is plugged into. */
  bridge: string;
  /** The bridge's address, the test hosts' default gateway. */
  gateway: string;
  prefixLength: number;
  /** A test host's namespace is named netnsPrefix + host name. */
  netnsPrefix: string;
  /** The machine-side end of a test host's veth is named vethPrefix + host name. */
  vethPrefix: string;
}

export interface TestHost {
  name: string;
  netns: string;
  address: string;
}

export function netnsPath(netns: string): string {
  return `${NETNS_DIR}/${netns}`;
}

export function testHostNetns(network: TestNetwork, name: string): string {
  return network.netnsPrefix + name;
}

function testHostVeth(network: TestNetwork, name: string): string {
  const veth = network.vethPrefix + name;
  if (veth.length > MAX_INTERFACE_NAME) {
    throw new InvalidInputError(`test host name '${name}' is too long: interface ${veth} exceeds ${MAX_INTERFACE_NAME} characters`, { name });
  }
  return veth;
}

/** Runs a command inside a network namespace (and only that: mounts and /sys stay the machine's). */
export function inNetns(netns: string, cmd: string, args: string[]): [string, string[]] {
  return ['nsenter', [`--net=${netnsPath(netns)}`, cmd, ...args]];
}

async function runInNetns(netns: string, cmd: string, args: string[], op: string): Promise<void> {
  const [nsenter, nsenterArgs] = inNetns(netns, cmd, args);
  await run(nsenter, nsenterArgs, { op });
}

async function linkExists(name: string): Promise<boolean> {
  return (await runUnchecked('ip', ['link', 'show', 'dev', name])).code === 0;
}

export async function listNetns(): Promise<string[]> {
  const { stdout } = await run('ip', ['netns', 'list'], { op: 'list network namespaces' });
  // Lines look like "chmk-node1 (id: 3)" or just "chmk-node1".
  return stdout
    .split('\n')
    .map((line) => line.trim().split(/\s+/, 1)[0]!)
    .filter(Boolean);
}

export async function netnsExists(netns: string): Promise<boolean> {
  return (await listNetns()).includes(netns);
}

/** Names this process's own network namespace NETNS (a handle in NETNS_DIR); nothing if the name exists. */
export async function attachOwnNetns(netns: string): Promise<void> {
  if (!(await netnsExists(netns))) await run('ip', ['netns', 'attach', netns, String(process.pid)], { op: `name this machine's network namespace ${netns}` });
}

/** Removes a namespace's handle; the namespace itself goes once nothing else holds it. */
export async function deleteNetns(netns: string): Promise<void> {
  if (await netnsExists(netns)) await run('ip', ['netns', 'delete', netns], { op: `delete network namespace ${netns}` });
}

// ---------------------------------------------------------------- bridge

function ipv4ToInt(address: string): number {
  const parts = address.split('.').map(Number);
  if (parts.length !== 4 || parts.some((p) => !Number.isInteger(p) || p < 0 || p > 255)) {
    throw new InvalidInputError(`bad IPv4 address '${address}'`, { address });
  }
  return parts.reduce((acc, p) => acc * 256 + p, 0);
}

function subnetsOverlap(a: string, aPrefix: number, b: string, bPrefix: number): boolean {
  const prefix = Math.min(aPrefix, bPrefix);
  const shift = 2 ** (32 - prefix);
  return Math.floor(ipv4ToInt(a) / shift) === Math.floor(ipv4ToInt(b) / shift);
}

/**
 * Another interface on the machine holding an address in our subnet would make the kernel route
 * test-host traffic to it: refuse instead of silently sharing the subnet.
 */
async function assertSubnetFree(network: TestNetwork): Promise<void> {
  const { stdout } = await run('ip', ['-j', '-4', 'addr', 'show'], { op: 'list addresses' });
  const links = JSON.parse(stdout) as { ifname: string; addr_info?: { local: string; prefixlen: number }[] }[];
  for (const link of links) {
    if (link.ifname === network.bridge) continue;
    for (const addr of link.addr_info ?? []) {
      if (subnetsOverlap(addr.local, addr.prefixlen, network.gateway, network.prefixLength)) {
        throw new ConflictError(
          `${network.gateway}/${network.prefixLength} overlaps ${addr.local}/${addr.prefixlen}, already in use on interface ${link.ifname}: ` +
            `remove that interface (another set of test hosts?) before creating bridge ${network.bridge}`,
          { interface: link.ifname, address: `${addr.local}/${addr.prefixlen}` },
        );
      }
    }
  }
}

/**
 * Creates the test network's bridge. First of all it guards the whole test range with an
 * `unreachable` route: from then on no test address can leave the machine, whatever fails later.
 */
export async function ensureBridge(network: TestNetwork): Promise<void> {
  await guardTestRange();
  await assertSubnetFree(network);
  if (!(await linkExists(network.bridge))) {
    await run('ip', ['link', 'add', network.bridge, 'type', 'bridge'], { op: `create bridge ${network.bridge}` });
  }
  await run('ip', ['addr', 'replace', `${network.gateway}/${network.prefixLength}`, 'dev', network.bridge], { op: `address bridge ${network.bridge}` });
  await run('ip', ['link', 'set', network.bridge, 'up'], { op: `bring up bridge ${network.bridge}` });
}

export async function bridgeExists(network: TestNetwork): Promise<boolean> {
  return linkExists(network.bridge);
}

export async function deleteBridge(network: TestNetwork): Promise<void> {
  if (await linkExists(network.bridge)) await run('ip', ['link', 'delete', network.bridge], { op: `delete bridge ${network.bridge}` });
}

// ---------------------------------------------------------------- test hosts

/** Creates (or completes) a test host; the bridge must exist (ensureBridge). */
export async function createTestHost(network: TestNetwork, name: string, address: string): Promise<TestHost> {
  const netns = testHostNetns(network, name);
  const veth = testHostVeth(network, name);
  if (!(await netnsExists(netns))) await run('ip', ['netns', 'add', netns], { op: `create network namespace ${netns}` });
  if (!(await linkExists(veth))) {
    // Creating the peer directly inside the namespace avoids a window with two eth0-less ends.
    await run('ip', ['link', 'add', veth, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', netns], { op: `create veth ${veth}` });
  }
  await run('ip', ['link', 'set', veth, 'master', network.bridge, 'up'], { op: `plug ${veth} into ${network.bridge}` });
  const op = `configure test host ${name}`;
  await runInNetns(netns, 'ip', ['link', 'set', 'lo', 'up'], op);
  await runInNetns(netns, 'ip', ['addr', 'replace', `${address}/${network.prefixLength}`, 'dev', 'eth0'], op);
  await runInNetns(netns, 'ip', ['link', 'set', 'eth0', 'up'], op);
  await runInNetns(netns, 'ip', ['route', 'replace', 'default', 'via', network.gateway], op);
  return { name, netns, address };
}

/** Removes a test host's veth and namespace. Processes still inside keep the namespace alive: kill them first. */
export async function deleteTestHost(network: TestNetwork, name: string): Promise<void> {
  const veth = testHostVeth(network, name);
  // Deleting one end of a veth pair deletes both.
  if (await linkExists(veth)) await run('ip', ['link', 'delete', veth], { op: `delete veth ${veth}` });
  await deleteNetns(testHostNetns(network, name));
}

// ---------------------------------------------------------------- processes

/** The namespace's identity: /proc/PID/ns/net of its members reads "net:[INODE]". */
async function netnsInode(netns: string): Promise<string | undefined> {
  try {
    return (await stat(netnsPath(netns), { bigint: true })).ino.toString();
  } catch {
    return undefined;
  }
}

async function pidsInNetns(inode: string): Promise<number[]> {
  const wanted = `net:[${inode}]`;
  const pids: number[] = [];
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    if (pid === process.pid) continue;
    try {
      if ((await readlink(`/proc/${pid}/ns/net`)) === wanted) pids.push(pid);
    } catch {
      // Gone meanwhile, or a zombie (no namespaces left): nothing to kill.
    }
  }
  return pids;
}

const KILL_ROUNDS = 50;
const KILL_ROUND_PAUSE_MS = 100;

/** Thaws the freezer cgroup a process is in (v1 freezer.state, v2 cgroup.freeze); nothing if it is not frozen. */
async function thawCgroupOf(pid: number): Promise<void> {
  const cgroups = await readFile(`/proc/${pid}/cgroup`, 'utf8').catch(() => '');
  for (const line of cgroups.split('\n')) {
    const [, controllers, path] = line.split(':');
    if (path === undefined) continue;
    if (controllers === 'freezer') await writeFile(`/sys/fs/cgroup/freezer${path}/freezer.state`, 'THAWED').catch(() => undefined);
    if (controllers === '') await writeFile(`/sys/fs/cgroup${path}/cgroup.freeze`, '0').catch(() => undefined);
  }
}

/**
 * SIGKILLs every process in a network namespace (agents, CRIU daemons, containers) and waits
 * until none is left. Several rounds, because a dying parent may still have forked a child.
 * Returns the PIDs it killed.
 */
export async function killAllInHost(netns: string): Promise<number[]> {
  const inode = await netnsInode(netns);
  if (inode === undefined) return [];
  return killAllOf(netns, () => pidsInNetns(inode));
}

/**
 * SIGKILLs every process in the cgroup `path` (relative to each hierarchy's root, e.g.
 * `chipmunk/node1`) and its descendants, in every hierarchy it exists in, and waits until none
 * is left. What a node's containers run is there whatever namespaces it is in: a container in a
 * user namespace of its own has a network namespace of its own too, not the one named after it.
 */
export async function killAllInCgroup(path: string): Promise<number[]> {
  return killAllOf(`cgroup ${path}`, () => pidsInCgroup(path));
}

async function killAllOf(what: string, find: () => Promise<number[]>): Promise<number[]> {
  const killed = new Set<number>();
  for (let round = 0; round < KILL_ROUNDS; round++) {
    const pids = await find();
    if (pids.length === 0) return [...killed];
    for (const pid of pids) {
      try {
        process.kill(pid, 'SIGKILL');
        killed.add(pid);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
      }
    }
    // A frozen process (a container paused by a checkpoint whose agent died) takes SIGKILL
    // only once thawed, under cgroup v1's freezer.
    await Promise.all(pids.map(thawCgroupOf));
    await sleep(KILL_ROUND_PAUSE_MS);
  }
  const survivors = await find();
  const states = await Promise.all(survivors.map((pid) => readFile(`/proc/${pid}/stat`, 'utf8').catch(() => `${pid} (gone)`)));
  throw new RuntimeFailedError(`processes in ${what} survive SIGKILL (stuck in the kernel?): ${survivors.join(', ')}`, {
    op: `kill processes in ${what}`,
    stat: states.map((s) => s.trim().slice(0, 120)),
  });
}

/** PIDs in cgroup `path` and below, in the v2 hierarchy at /sys/fs/cgroup and in each v1 (or hybrid) one beneath it. */
async function pidsInCgroup(path: string): Promise<number[]> {
  const roots = ['/sys/fs/cgroup', ...(await readdir('/sys/fs/cgroup').catch(() => [] as string[])).map((c) => `/sys/fs/cgroup/${c}`)];
  const pids = new Set<number>();
  const walk = async (dir: string): Promise<void> => {
    const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
    for (const e of entries) {
      if (e.isDirectory()) await walk(`${dir}/${e.name}`);
      else if (e.name === 'cgroup.procs') {
        for (const line of (await readFile(`${dir}/${e.name}`, 'utf8').catch(() => '')).split('\n')) if (line) pids.add(Number(line));
      }
    }
  };
  for (const root of roots) await walk(`${root}/${path}`);
  pids.delete(process.pid);
  return [...pids];
}
