// Creates two real test hosts (network namespaces on their own bridge) and checks they behave
// like two machines: reachable from the machine and from each other, and emptied by
// killAllInHost. Needs root. Names, bridge and subnet are this test's own, so a local cluster
// (chmk-*, 198.18.0.0/24) can be up meanwhile; traffic goes to 198.18.1.x only.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';

import {
  createTestHost,
  deleteBridge,
  deleteTestHost,
  ensureBridge,
  inNetns,
  killAllInHost,
  netnsExists,
  type TestHost,
  type TestNetwork,
} from '../../src/cluster/index.js';
import { routeContainerSubnet } from '../../src/cluster/routes.js';
import { run, runUnchecked } from '../../src/shared/exec.js';

const network: TestNetwork = {
  bridge: 'chmkt-br0',
  gateway: '198.18.1.1',
  prefixLength: 24,
  netnsPrefix: 'chmkt-',
  vethPrefix: 'chmktv-',
};
const HOSTS = [
  { name: 'a', address: '198.18.1.11' },
  { name: 'b', address: '198.18.1.12' },
];
const PORT = 7499;
const CONTAINER_SUBNET = '198.19.250.0/24';
const CONTAINER_ADDRESS = '198.19.250.5';

/** A tiny HTTP server inside a test host that names the host it runs in. */
function startListener(host: TestHost, address = host.address): ChildProcess {
  const script = `require('node:http').createServer((req, res) => res.end('hello from ${host.name}')).listen(${PORT}, '${address}', () => console.log('listening'))`;
  const [cmd, args] = inNetns(host.netns, process.execPath, ['-e', script]);
  return spawn(cmd, args, { stdio: ['ignore', 'pipe', 'inherit'] });
}

async function untilListening(child: ChildProcess): Promise<void> {
  const [chunk] = (await once(child.stdout!, 'data')) as [Buffer];
  assert.match(chunk.toString(), /listening/);
}

/** GET from inside NETNS (or from the machine when undefined), through a fresh node process. */
async function fetchFrom(netns: string | undefined, url: string): Promise<string> {
  const script = `fetch(${JSON.stringify(url)}, { signal: AbortSignal.timeout(5000) }).then((r) => r.text()).then((t) => process.stdout.write(t))`;
  const [cmd, args] = netns ? inNetns(netns, process.execPath, ['-e', script]) : [process.execPath, ['-e', script]];
  return (await run(cmd, args, { op: `fetch ${url}`, timeoutMs: 10_000 })).stdout;
}

async function cleanUp(): Promise<void> {
  for (const host of HOSTS) {
    await killAllInHost(`${network.netnsPrefix}${host.name}`);
    await deleteTestHost(network, host.name);
  }
  await deleteBridge(network);
}

describe('test hosts', () => {
  const hosts: TestHost[] = [];
  const listeners: ChildProcess[] = [];

  before(async () => {
    await cleanUp(); // leftovers of an interrupted earlier run
    await ensureBridge(network);
    for (const { name, address } of HOSTS) hosts.push(await createTestHost(network, name, address));
  });

  after(async () => {
    for (const child of listeners) child.kill('SIGKILL');
    await cleanUp();
  });

  it('creates idempotently', async () => {
    await ensureBridge(network);
    const again = await createTestHost(network, 'a', HOSTS[0]!.address);
    assert.deepEqual(again, hosts[0]);
    const { stdout } = await run(...inNetns(hosts[0]!.netns, 'ip', ['-4', '-o', 'addr', 'show', 'dev', 'eth0']));
    assert.equal(stdout.match(/inet /g)?.length, 1, stdout);
    const routes = (await run(...inNetns(hosts[0]!.netns, 'ip', ['route', 'show', 'default']))).stdout;
    assert.match(routes, new RegExp(`default via ${network.gateway.replaceAll('.', '\\.')} dev eth0`));
  });

  it('refuses a bridge whose subnet another interface already uses', async () => {
    await assert.rejects(ensureBridge({ ...network, bridge: 'chmkt-br1' }), { code: 'CHIPMUNK_CONFLICT', message: /already in use on interface chmkt-br0/ });
  });

  it('reaches each test host from the machine, and one test host from the other', async () => {
    for (const host of hosts) {
      const listener = startListener(host);
      listeners.push(listener);
      await untilListening(listener);
    }
    for (const host of hosts) {
      assert.equal(await fetchFrom(undefined, `http://${host.address}:${PORT}/`), `hello from ${host.name}`);
    }
    const [a, b] = hosts as [TestHost, TestHost];
    assert.equal(await fetchFrom(a.netns, `http://${b.address}:${PORT}/`), 'hello from b');
    assert.equal(await fetchFrom(b.netns, `http://${a.address}:${PORT}/`), 'hello from a');
  });

  it('guards the whole test range: an address no test host holds is unreachable, never sent out', async () => {
    const stray = await runUnchecked('ip', ['route', 'get', '198.19.255.77']);
    assert.notEqual(stray.code, 0, `198.19.255.77 would be routed: ${stray.stdout}`);
    assert.match(stray.stderr, /No route to host/);
    assert.match((await run('ip', ['route', 'show', '198.18.0.0/15'])).stdout, /^unreachable 198\.18\.0\.0\/15/);
    const local = await run('ip', ['route', 'get', HOSTS[0]!.address]);
    assert.match(local.stdout, new RegExp(`dev ${network.bridge}`), 'a test host is still reached on its bridge');
  });

  it('routes a container subnet to the test host that owns it', async () => {
    const [a] = hosts as [TestHost];
    // An address of the subnet on host a's loopback stands in for a container behind it.
    await run(...inNetns(a.netns, 'ip', ['addr', 'replace', `${CONTAINER_ADDRESS}/32`, 'dev', 'lo']));
    await routeContainerSubnet(CONTAINER_SUBNET, a.address, network.bridge);
    await routeContainerSubnet(CONTAINER_SUBNET, a.address, network.bridge); // idempotent
    const listener = startListener(a, CONTAINER_ADDRESS);
    try {
      await untilListening(listener);
      assert.equal(await fetchFrom(undefined, `http://${CONTAINER_ADDRESS}:${PORT}/`), 'hello from a');
    } finally {
      listener.kill('SIGKILL');
      await once(listener, 'exit');
    }
  });

  it('killAllInHost kills every process in the test host, and only those', async () => {
    const [a, b] = hosts as [TestHost, TestHost];
    const inA = listeners[0]!;
    const inB = listeners[1]!;
    const exited = once(inA, 'exit');
    const killed = await killAllInHost(a.netns);
    assert.ok(killed.includes(inA.pid!), `killed ${killed.join(', ')}, not the listener ${inA.pid}`);
    const [, signal] = (await exited) as [number | null, NodeJS.Signals | null];
    assert.equal(signal, 'SIGKILL');
    assert.deepEqual(await killAllInHost(a.netns), [], 'nothing left to kill');
    await sleep(100);
    assert.equal(inB.exitCode, null, 'the listener in the other test host still runs');
    assert.equal(await fetchFrom(undefined, `http://${b.address}:${PORT}/`), 'hello from b');
  });

  it('deletes test hosts and the bridge, idempotently', async () => {
    await cleanUp();
    await cleanUp();
    for (const host of hosts) assert.equal(await netnsExists(host.netns), false, `${host.netns} still exists`);
    const link = await run('ip', ['-o', 'link', 'show']);
    assert.doesNotMatch(link.stdout, /chmkt/);
  });
});
