// The local cluster's address routes script (src/cluster/routes.ts), run by /bin/sh with `ip` and
// `nsenter` on PATH replaced by loggers: which routes it asks for, and in which namespace.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { chmod, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { writeAddressRoutesScript, type RoutedHost } from '../../src/cluster/routes.js';

const HOSTS: RoutedHost[] = [
  { netns: '/var/run/netns/t-node1', address: '198.18.0.11' },
  { netns: '/var/run/netns/t-node2', address: '198.18.0.12' },
];

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'chipmunk-address-routes-'));
  for (const cmd of ['ip', 'nsenter']) {
    await writeFile(join(dir, cmd), `#!/bin/sh\necho "${cmd} $*" >> "${dir}/calls"\n`);
    await chmod(join(dir, cmd), 0o755);
  }
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function runScript(machineNetns: string | undefined, args: string[]): Promise<string[]> {
  await writeFile(join(dir, 'calls'), '');
  const command = (await writeAddressRoutesScript(join(dir, 'address-routes.sh'), HOSTS, machineNetns)).split(' ');
  await promisify(execFile)(command[0]!, [...command.slice(1), ...args], { env: { PATH: `${dir}:/usr/bin:/bin` } });
  return (await readFile(join(dir, 'calls'), 'utf8')).split('\n').filter(Boolean);
}

describe('local cluster address routes script', () => {
  it("routes the address on the machine and, below the host's own route, in every other test host; its own host drops any route elsewhere", async () => {
    assert.deepEqual(await runScript(undefined, ['198.19.128.7', '198.18.0.11']), [
      'ip route replace 198.19.128.7/32 via 198.18.0.11',
      'nsenter --net=/var/run/netns/t-node1 -- ip route del 198.19.128.7/32 metric 100',
      'nsenter --net=/var/run/netns/t-node2 -- ip route replace 198.19.128.7/32 via 198.18.0.11 metric 100',
    ]);
  });

  it("with the machine's namespace handle (HA controllers run in test hosts), the machine's route goes there", async () => {
    assert.deepEqual(await runScript('/var/run/netns/t-machine', ['198.19.128.7', '198.18.0.12']), [
      'nsenter --net=/var/run/netns/t-machine -- ip route replace 198.19.128.7/32 via 198.18.0.12',
      'nsenter --net=/var/run/netns/t-node1 -- ip route replace 198.19.128.7/32 via 198.18.0.12 metric 100',
      'nsenter --net=/var/run/netns/t-node2 -- ip route del 198.19.128.7/32 metric 100',
    ]);
    assert.deepEqual(await runScript('/var/run/netns/t-machine', ['198.19.128.7']), [
      'nsenter --net=/var/run/netns/t-machine -- ip route del 198.19.128.7/32',
      'nsenter --net=/var/run/netns/t-node1 -- ip route del 198.19.128.7/32 metric 100',
      'nsenter --net=/var/run/netns/t-node2 -- ip route del 198.19.128.7/32 metric 100',
    ]);
  });

  it('refuses an address outside the test range', async () => {
    await assert.rejects(runScript(undefined, ['10.0.0.1', '198.18.0.11']), /outside the test range/);
  });
});
