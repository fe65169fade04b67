/**
 * Two RuncRuntimes, each driving its own test host (src/cluster/testhost.ts) through
 * `hostNetns`, as a RuntimePair for the runtime contract; and a cleanup that removes all they
 * made (containers, runc state, mounts, namespaces, cgroups, test hosts, temp dirs) whatever
 * state a failed test left them in.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, writeFile } from 'node:fs/promises';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { detectCapabilities } from '../../src/shared/host/capabilities.js';
import { prepareCriuKernelCache } from '../../src/agent/host/criu-kernel-cache.js';
import { RuncRuntime } from '../../src/agent/runtime/runc-runtime.js';
import type { WritableLayerKind } from '../../src/agent/runtime/rootfs.js';
import type { CheckpointFreezeMethod, ContainerRuntime } from '../../src/agent/runtime/types.js';
import { createTestHost, deleteBridge, deleteTestHost, ensureBridge, killAllInHost, netnsPath, type TestNetwork } from '../../src/cluster/testhost.js';
import { runUnchecked } from '../../src/shared/exec.js';
import type { AgentContainer, HostCapabilities } from '../../src/shared/protocol.js';
import { APP_PORT, type AppClient, type RuntimePair } from '../contract/runtime.contract.js';

export const CRIU = '/opt/chipmunk/bin/criu';
/**
 * Which network this process's pairs use: CHIPMUNK_RUNC_PAIR_NET=N (2..27) gives bridge
 * chmkrN-br0, test hosts 198.18.N.0/24, names chmkrN-*, its own temp prefix, node names and
 * page server ports, so two test processes with different N can run at once without sweeping
 * each other's leftovers. Unset (or 2) keeps the original names (chmkr-br0, 198.18.2.0/24).
 * 0 and 1 are taken by the local cluster and the test-host test.
 */
export const RUNC_PAIR_NET = pairNet(process.env.CHIPMUNK_RUNC_PAIR_NET);

function pairNet(value: string | undefined): number {
  if (value === undefined || value === '') return 2;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 2 || n > 27) {
    throw new Error(`CHIPMUNK_RUNC_PAIR_NET='${value}' is not a network of the runc pair: use an integer from 2 to 27 (unset means 2)`);
  }
  return n;
}

function layerFromEnv(value: string | undefined): WritableLayerKind | undefined {
  if (value === undefined || value === '') return undefined;
  if (value === 'directory' || value === 'image') return value;
  throw new Error(`CHIPMUNK_RUNC_PAIR_LAYER='${value}': use directory or image (unset: the runtime's default)`);
}

/** Empty for the default network 2, so its names stay what they always were. */
const TAG = RUNC_PAIR_NET === 2 ? '' : String(RUNC_PAIR_NET);
/**
 * This suite's own bridge, names and subnet, so a local cluster (chmk-*, 198.18.0.0/24) or the
 * test-host test (chmkt-*, 198.18.1.0/24) can run meanwhile. Traffic goes to 198.18.N.x only.
 */
const NETWORK: TestNetwork = {
  bridge: `chmkr${TAG}-br0`,
  gateway: `198.18.${RUNC_PAIR_NET}.1`,
  prefixLength: 24,
  netnsPrefix: `chmkr${TAG}-`,
  vethPrefix: `chmkr${TAG}v-`,
};
const TMP_PREFIX = `chipmunk-rt${TAG}-test-`;
/** Container subnets 198.19.201-254.0/24, two per network. */
const subnetOctet = 201 + 2 * (RUNC_PAIR_NET - 2);
/** Node names are unique to these tests: they name runc ids, cgroups and container namespaces. */
const NODES = [
  { node: `rt${TAG}ch1`, host: 'h1', address: `198.18.${RUNC_PAIR_NET}.11`, subnet: `198.19.${subnetOctet}.0/24` },
  { node: `rt${TAG}ch2`, host: 'h2', address: `198.18.${RUNC_PAIR_NET}.12`, subnet: `198.19.${subnetOctet + 1}.0/24` },
] as const;
/** The nodes of a pair: its `source` is the first, its `target` the second. */
export const RUNC_PAIR_NODES = NODES;
const hostNetns = (host: string) => NETWORK.netnsPrefix + host;
/** Page servers listen in the source test host's own namespace; distinct ports still help reading logs. */
const PAGE_SERVER_PORT_BASE = 27300 + 20 * (RUNC_PAIR_NET - 2);

let capabilities: HostCapabilities | undefined;

/** Call once before the first pair: probes CRIU and removes what runs that died left behind. */
export async function prepareRuncPairs(): Promise<void> {
  assert.ok(existsSync(CRIU), `${CRIU} is missing: run scripts/setup.sh`);
  capabilities = await detectCapabilities({ criuPath: CRIU });
  // As an agent does at start (src/agent/index.ts).
  await prepareCriuKernelCache(CRIU);
  await sweepLeftovers();
}

interface NodeFixture {
  cfg: (typeof NODES)[number];
  runtime: RuncRuntime;
  dataDir: string;
  runDir: string;
}

/**
 * `writableLayer`: what the runtimes make new containers' writable layers of; unset, what
 * CHIPMUNK_RUNC_PAIR_LAYER says (directory or image, to run a whole suite on image layers),
 * else the runtime's default. `userNamespace`: new containers in their own user namespace; the
 * runtime's default (yes) if not given. `checkpointFreeze`: how checkpoints spend their freeze
 * (RuncRuntimeOptions.checkpointFreeze), the runtime's default if not given.
 */
export async function makeRuncPair(
  opts: { writableLayer?: WritableLayerKind; userNamespace?: boolean; checkpointFreeze?: CheckpointFreezeMethod } = {},
): Promise<RuntimePair> {
  const writableLayer = opts.writableLayer ?? layerFromEnv(process.env.CHIPMUNK_RUNC_PAIR_LAYER);
  assert.ok(capabilities, 'call prepareRuncPairs() first');
  const root = await mkdtemp(join(tmpdir(), TMP_PREFIX));
  let nodes: NodeFixture[] = [];
  const cleanup = async () => {
    const problems: string[] = [];
    for (const n of nodes) await cleanupRuntime(n, problems);
    problems.push(...(await removeLeftovers(root, NODES.map((n) => n.node))));
    problems.push(...(await destroyTestHosts()));
    await runUnchecked('rm', ['-rf', '--one-file-system', '--', root]);
    if (existsSync(root)) problems.push(`${root} could not be deleted`);
    if (problems.length) throw new Error(`runtime test cleanup: ${problems.join('; ')}`);
  };
  try {
    await destroyTestHosts(); // what a run that died left
    // The machine's own resolv.conf may name a resolver off the machine, where test
    // containers must send nothing: theirs comes from this one (loopback only, so left out).
    const resolvConf = join(root, 'resolv.conf');
    await writeFile(resolvConf, 'nameserver 127.0.0.53\nsearch chipmunk.test\n');
    await ensureBridge(NETWORK);
    for (const n of NODES) await createTestHost(NETWORK, n.host, n.address);
    nodes = await Promise.all(
      NODES.map(async (cfg, i) => {
        const dataDir = join(root, `h${i + 1}`, 'data');
        const runDir = join(root, `h${i + 1}`, 'run');
        await mkdir(dataDir, { recursive: true });
        await mkdir(runDir, { recursive: true });
        const runtime = new RuncRuntime({
          node: cfg.node,
          dataDir,
          runDir,
          subnet: cfg.subnet,
          criuPath: CRIU,
          capabilities: capabilities!,
          hostNetns: netnsPath(hostNetns(cfg.host)),
          nodeAddress: cfg.address,
          resolvConfPath: resolvConf,
          ...(writableLayer ? { writableLayer } : {}),
          ...(opts.userNamespace !== undefined ? { userNamespace: opts.userNamespace } : {}),
          ...(opts.checkpointFreeze ? { checkpointFreeze: opts.checkpointFreeze } : {}),
        });
        return { cfg, runtime, dataDir, runDir };
      }),
    );
  } catch (err) {
    await cleanup().catch(() => undefined);
    throw err;
  }
  const [source, target] = nodes as [NodeFixture, NodeFixture];
  let nextPort = PAGE_SERVER_PORT_BASE;
  return {
    source: source.runtime,
    target: target.runtime,
    image: 'chipmunk/statefulapp',
    async copyTrees(id, checkpoint) {
      const from = checkpoint ?? source.runtime.migrationPaths(id);
      const to = target.runtime.migrationPaths(id);
      for (const [a, b] of [[from.images, to.images], [from.files, to.files]] as const) {
        await mkdir(b, { recursive: true });
        const res = await runUnchecked('cp', ['-a', '--sparse=always', `${a}/.`, b]);
        assert.equal(res.code, 0, `cp ${a} ${b}: ${res.stderr}`);
      }
    },
    reach(rt: ContainerRuntime, c: AgentContainer) {
      const node = nodes.find((n) => n.runtime === rt);
      assert.ok(node, 'reach: not a runtime of this pair');
      const port = c.spec.ports.find((p) => p.containerPort === APP_PORT)?.hostPort;
      assert.ok(port, `reach: ${c.name} publishes no port for ${APP_PORT}`);
      return appClient(node.cfg.address, port);
    },
    pageServer: () => ({ address: source.cfg.address, port: nextPort++ }),
    cleanup,
  };
}

// ------------------------------------------------------------------ talking to the app

async function appClient(address: string, port: number): Promise<AppClient> {
  // Only our test hosts' addresses: never send traffic anywhere else.
  assert.ok(address.startsWith(`198.18.${RUNC_PAIR_NET}.`), `${address} is not a test host of this pair`);
  const call = (method: string, path: string) => httpJson(method, address, port, path);
  const deadline = Date.now() + 30_000;
  for (;;) {
    try {
      await call('GET', '/health');
      break;
    } catch (err) {
      if (Date.now() > deadline) throw new Error(`app at ${address}:${port} did not answer within 30 s: ${(err as Error).message}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  return { get: (path) => call('GET', path), post: (path) => call('POST', path) };
}

/** One request on its own connection (no keep-alive: a dump would carry a pooled one along). */
function httpJson(method: string, host: string, port: number, path: string): Promise<any> {
  return new Promise((resolve, reject) => {
    const req = request({ host, port, path, method, agent: false, timeout: 15_000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => {
        if ((res.statusCode ?? 0) >= 400) return reject(new Error(`${method} ${path}: HTTP ${res.statusCode} ${body}`));
        try {
          resolve(body && res.headers['content-type']?.includes('json') ? JSON.parse(body) : body);
        } catch (err) {
          reject(err);
        }
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`${method} ${path}: timed out`)));
    req.on('error', (err) => reject(new Error(`${method} http://${host}:${port}${path}: ${err.message}`)));
    req.end();
  });
}

// ------------------------------------------------------------------ cleanup

/**
 * Through the runtime first, as an operator would: lazy page servers and lazy-pages daemons
 * (the only processes in the test host's own namespace) are killed so nothing waits on pages,
 * then every container is finished, aborted or removed according to its record.
 */
async function cleanupRuntime(n: NodeFixture, problems: string[]): Promise<void> {
  await killAllInHost(hostNetns(n.cfg.host)).catch((err: Error) => problems.push(err.message));
  // A runc restore or dump of ours that hangs (CRIU can, when a lazy restore fails)
  // would hold the runtime's lock on its container forever.
  await killToolsUsing(n.dataDir);
  await killToolsUsing(n.runDir);
  const dir = join(n.dataDir, 'containers');
  for (const name of existsSync(dir) ? await readdir(dir) : []) {
    try {
      const rec = JSON.parse(await readFile(join(dir, name, 'state.json'), 'utf8')) as { migration?: { id: string; role: string } };
      if (rec.migration?.role === 'source') await withTimeout(n.runtime.finishMigration(rec.migration.id), `finishMigration on ${n.cfg.node}`);
      else if (rec.migration?.role === 'target') await withTimeout(n.runtime.abortRestore(rec.migration.id), `abortRestore on ${n.cfg.node}`);
      else await withTimeout(n.runtime.remove(name, { force: true }), `remove on ${n.cfg.node}`);
    } catch (err) {
      problems.push(`removing ${name} on ${n.cfg.node}: ${(err as Error).message}`);
    }
  }
  await n.runtime.close();
}

/**
 * Whatever the runtimes could not remove: runc containers, mounts (deepest first, before any
 * delete), container network namespaces and cgroups of our nodes. Returns what is still there.
 */
async function removeLeftovers(root: string, nodes: string[]): Promise<string[]> {
  for (const runcRoot of await globRuncRoots(root)) {
    const ids = (await runUnchecked('runc', ['--root', runcRoot, 'list', '-q'])).stdout.split('\n').filter(Boolean);
    for (const id of ids) await runUnchecked('runc', ['--root', runcRoot, 'delete', '-f', id], { timeoutMs: 30_000 });
  }
  for (const n of NODES) await killAllInHost(hostNetns(n.host)).catch(() => undefined);
  await killToolsUsing(root);
  for (const t of await mountsBelow(root)) {
    if ((await runUnchecked('umount', [t])).code !== 0) await runUnchecked('umount', ['-l', t]);
  }
  // Image writable layers: their loop devices detach with the last unmount; one still
  // attached (a layer some process kept busy) is detached here, and reported if it stays.
  for (const dev of await loopDevicesBelow(root)) await runUnchecked('losetup', ['-d', dev.name]);
  for (const ns of await ourNetns(nodes)) await runUnchecked('ip', ['netns', 'del', ns]);
  for (const node of nodes) await removeCgroups(node);
  const problems: string[] = [];
  const mounts = await mountsBelow(root);
  if (mounts.length) problems.push(`still mounted: ${mounts.join(', ')}`);
  const loops = await loopDevicesBelow(root);
  if (loops.length) problems.push(`loop devices still attached: ${loops.map((l) => `${l.name} (${l.file})`).join(', ')}`);
  const netns = await ourNetns(nodes);
  if (netns.length) problems.push(`network namespaces left: ${netns.join(', ')}`);
  return problems;
}

/** Leftovers of earlier runs that died before their cleanup. */
async function sweepLeftovers(): Promise<void> {
  for (const entry of await readdir(tmpdir())) {
    if (!entry.startsWith(TMP_PREFIX)) continue;
    const root = join(tmpdir(), entry);
    const problems = await removeLeftovers(root, NODES.map((n) => n.node));
    if (problems.length === 0) await runUnchecked('rm', ['-rf', '--one-file-system', '--', root]);
  }
  await removeLeftovers(join(tmpdir(), `${TMP_PREFIX}none`), NODES.map((n) => n.node));
}

/**
 * SIGKILLs the processes whose command line names `dir` (a temporary directory of this test:
 * runc and CRIU runs the runtimes started), with their descendants.
 */
async function killToolsUsing(dir: string): Promise<void> {
  const procs: Array<{ pid: number; ppid: number; cmdline: string }> = [];
  for (const entry of await readdir('/proc')) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    try {
      const cmdline = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).replace(/\0/g, ' ');
      const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      procs.push({ pid, ppid, cmdline });
    } catch {
      // gone meanwhile
    }
  }
  const doomed = new Set(procs.filter((p) => p.cmdline.includes(`${dir}/`) || p.cmdline.includes(`${dir} `)).map((p) => p.pid));
  for (let grew = true; grew; ) {
    grew = false;
    for (const p of procs) {
      if (doomed.has(p.ppid) && !doomed.has(p.pid)) {
        doomed.add(p.pid);
        grew = true;
      }
    }
  }
  for (const pid of doomed) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  if (doomed.size) await new Promise((r) => setTimeout(r, 200));
}

/** Kills what still runs in the test hosts' namespaces, deletes them and the bridge. */
async function destroyTestHosts(): Promise<string[]> {
  const problems: string[] = [];
  for (const n of NODES) {
    try {
      await killAllInHost(hostNetns(n.host));
      await deleteTestHost(NETWORK, n.host);
    } catch (err) {
      problems.push(`test host ${n.host}: ${(err as Error).message}`);
    }
  }
  await deleteBridge(NETWORK).catch((err: Error) => problems.push(err.message));
  return problems;
}

async function globRuncRoots(root: string): Promise<string[]> {
  if (!existsSync(root)) return [];
  const out: string[] = [];
  for (const h of await readdir(root)) {
    const r = join(root, h, 'run', 'runc');
    if (existsSync(r)) out.push(r);
  }
  return out;
}

async function mountsBelow(dir: string): Promise<string[]> {
  const res = await runUnchecked('findmnt', ['-rn', '-o', 'TARGET']);
  return res.stdout
    .split('\n')
    .map((l) => l.replace(/\\x20/g, ' '))
    .filter((t) => t === dir || t.startsWith(`${dir}/`))
    .sort((a, b) => b.length - a.length);
}

/** Loop devices whose backing file is below `dir` (deleted or not). */
async function loopDevicesBelow(dir: string): Promise<Array<{ name: string; file: string }>> {
  const res = await runUnchecked('losetup', ['--list', '--noheadings', '--raw', '--output', 'NAME,BACK-FILE']);
  return res.stdout
    .split('\n')
    .map((line) => {
      const i = line.indexOf(' ');
      return { name: line.slice(0, i), file: line.slice(i + 1).replace(/\\x20/g, ' ') };
    })
    .filter((l) => l.name && l.file.startsWith(`${dir}/`));
}

async function ourNetns(nodes: string[]): Promise<string[]> {
  const dir = '/var/run/netns';
  const names = existsSync(dir) ? await readdir(dir) : [];
  return names.filter((n) => nodes.some((node) => n.startsWith(`chmk-${node}-`)));
}

/** runc removes a container's own cgroup, not the chipmunk/NODE parents it created. */
async function removeCgroups(node: string): Promise<void> {
  const base = '/sys/fs/cgroup';
  for (const ctrl of existsSync(base) ? await readdir(base) : []) {
    const dir = join(base, ctrl, 'chipmunk', node);
    if (existsSync(dir)) await runUnchecked('find', [dir, '-depth', '-type', 'd', '-exec', 'rmdir', '{}', ';']);
  }
}

async function withTimeout<T>(p: Promise<T>, what: string, ms = 60_000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} timed out`)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}
