/**
 * A target whose Podman store lacks the container's image gets it streamed from the source
 * before the restore. The local cluster's nodes share the machine's store, so this test adds a
 * fourth node by hand: its own test host, its own agent, and a private, empty Podman store.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { createTestHost, deleteTestHost, killAllInHost, netnsPath } from '../../src/cluster/testhost.js';
import { LOCAL_NETWORK } from '../../src/cluster/state.js';
import { runUnchecked } from '../../src/shared/exec.js';
import { removeTree } from '../../src/shared/remove-tree.js';
import { unmountBelow } from '../../src/agent/runtime/rootfs.js';
import { cliOk, http, ps, startLocalCluster, stopLocalCluster, waitFor } from '../support/local-cluster.js';

const NODE = 'node4';
const ADDRESS = '198.18.0.14';
const BIN = fileURLToPath(new URL('../../bin/chipmunk.mjs', import.meta.url));
let scratch = '';
let agent: ChildProcess | undefined;

const podmanPrivate = (args: string[]) =>
  runUnchecked('podman', ['--root', join(scratch, 'images', 'root'), '--runroot', join(scratch, 'images', 'runroot'), ...args], {
    env: { ...process.env, CONTAINERS_CONF: '/etc/chipmunk/containers.conf' },
  });

before(async () => {
  // The cluster first, then the extra node on its bridge (one hook: the order matters).
  const cluster = await startLocalCluster(2);
  scratch = await mkdtemp(join(tmpdir(), 'chipmunk-image-transfer-'));
  const host = await createTestHost(LOCAL_NETWORK, NODE, ADDRESS);
  agent = spawn(
    'nsenter',
    [
      `--net=${netnsPath(host.netns)}`,
      process.execPath, BIN, 'agent',
      '--node', NODE,
      '--listen', `${ADDRESS}:7401`,
      '--controller', cluster.state.controllerUrl,
      '--token-file', cluster.state.tokenFile,
      '--subnet', '198.19.4.0/24',
      '--data-dir', join(scratch, 'data'),
      '--run-dir', join(scratch, 'run'),
      '--image-store', join(scratch, 'images'),
    ],
    { stdio: 'ignore' },
  );
  await waitFor(async () => {
    const nodes = await cliOk<Array<{ name: string; status: string }>>(['node', 'ls']);
    return nodes.some((n) => n.name === NODE && n.status === 'ready');
  }, 30_000, `${NODE} ready`);
}, { timeout: 120_000 });

after(async () => {
  await cliOk(['rm', 'imgmove']).catch(() => undefined);
  agent?.kill('SIGKILL');
  await killAllInHost(`chmk-${NODE}`).catch(() => undefined);
  for (const c of (await runUnchecked('runc', ['--root', join(scratch, 'run', 'runc'), 'list', '-q'])).stdout.split('\n').filter(Boolean)) {
    await runUnchecked('runc', ['--root', join(scratch, 'run', 'runc'), 'delete', '-f', c]);
  }
  for (const ns of (await runUnchecked('ip', ['netns', 'list'])).stdout.split('\n').map((l) => l.split(' ')[0])) {
    if (ns.startsWith(`chmk-${NODE}-`)) await runUnchecked('ip', ['netns', 'del', ns]);
  }
  await deleteTestHost(LOCAL_NETWORK, NODE).catch(() => undefined);
  if (scratch) {
    await podmanPrivate(['image', 'unmount', '--all']);
    await unmountBelow(scratch);
    await removeTree(scratch);
  }
  await stopLocalCluster();
}, { timeout: 120_000 });

test('a migration to a node without the image streams the image there first', { timeout: 240_000 }, async () => {
  assert.equal((await podmanPrivate(['image', 'exists', 'chipmunk/statefulapp'])).code, 1, 'the new node starts without the image');
  await cliOk(['run', '--name', 'imgmove', '--node', 'node1', '-p', '8090:8080', '-e', 'MEMORY_MB=16', 'chipmunk/statefulapp']);
  await waitFor(async () => (await http('node1', 8090, '/health').catch(() => undefined))?.status === 200, 30_000, 'app up');
  await http('node1', 8090, '/increment', 'POST');

  const summary = await cliOk<{ to: string; bytesTransferred: number }>(['migrate', 'imgmove', '--to', NODE, '--mode', 'copy'], { timeoutMs: 200_000 });
  assert.equal(summary.to, NODE);
  assert.equal((await podmanPrivate(['image', 'exists', 'chipmunk/statefulapp'])).code, 0, 'the image arrived in the private store');
  const state = await http<{ counter: number }>(ADDRESS, 8090, '/');
  assert.equal(state.body.counter, 1, 'state survived');
  assert.deepEqual(
    (await ps()).filter((c) => c.name === 'imgmove').map((c) => c.node),
    [NODE],
  );
});
