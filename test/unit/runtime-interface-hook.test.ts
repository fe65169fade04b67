/**
 * The prestart hook that moves a staged interface into a restored container's network namespace
 * (network.ts) runs inside a restore's frozen window: it must wire the interface (address, route,
 * cluster address) and start no more than three programs. Real namespaces: needs root.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { chmod, mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { run, runUnchecked } from '../../src/shared/exec.js';
import { interfaceMoveHook } from '../../src/agent/runtime/network.js';

const notRoot = process.getuid?.() !== 0 ? 'needs root (network namespaces)' : false;
const STAGING = `chmkhook-${process.pid}`;
/** Test-only addresses from the range the project may use (198.18.0.0/15); no packet is sent. */
const STAGED = '198.19.250.5/24';
const GATEWAY = '198.19.250.1';
const CLUSTER = '198.18.250.77';

describe('the interface-move hook', { skip: notRoot }, () => {
  let dir: string;
  let container: ChildProcess;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'chipmunk-hook-'));
    const ip = (...args: string[]) => run('ip', ['-n', STAGING, ...args]);
    await run('ip', ['netns', 'add', STAGING]);
    await ip('link', 'add', 'eth0', 'type', 'veth', 'peer', 'name', 'hookpeer');
    await ip('addr', 'add', STAGED, 'dev', 'eth0');
    await ip('link', 'set', 'eth0', 'up');
    await ip('link', 'set', 'hookpeer', 'up');
    await ip('route', 'add', 'default', 'via', GATEWAY);
    // The restored container's namespace: a process in a network namespace of its own.
    container = spawn('unshare', ['--net', 'sleep', '60'], { stdio: 'ignore' });
    await sleep(200);
    // Every program the hook starts, logged by a shim of the same name first on its PATH.
    for (const program of ['ip', 'nsenter', 'sed', 'awk', 'cat']) {
      const real = (await run('sh', ['-c', `command -v ${program}`])).stdout.trim();
      await writeFile(join(dir, program), `#!/bin/sh\necho ${program} >> ${join(dir, 'started')}\nexec ${real} "$@"\n`);
      await chmod(join(dir, program), 0o755);
    }
  });
  after(async () => {
    container?.kill('SIGKILL');
    await runUnchecked('ip', ['netns', 'del', STAGING]);
    await runUnchecked('rm', ['-rf', '--one-file-system', '--', dir]);
  });

  it('moves the interface with its address, default route and the cluster address, starting three programs', async () => {
    const hook = interfaceMoveHook(STAGING, CLUSTER);
    const pid = container.pid!;
    // runc's state on stdin: one line of JSON, no newline at the end.
    const res = await runUnchecked(hook.path, hook.args.slice(1), {
      input: JSON.stringify({ ociVersion: '1.0.2', id: 'web-1', status: 'creating', pid, bundle: '/b' }),
      env: { PATH: `${dir}:${hook.env[0]!.slice('PATH='.length)}` },
    });
    assert.equal(res.code, 0, res.stderr);
    const inContainer = (...args: string[]) => run('nsenter', [`--net=/proc/${pid}/ns/net`, 'ip', ...args]).then((r) => r.stdout);
    const addresses = await inContainer('-4', '-o', 'addr', 'show', 'dev', 'eth0');
    assert.match(addresses, new RegExp(`inet ${STAGED.replace(/\./g, '\\.')} `));
    assert.match(addresses, new RegExp(`inet ${CLUSTER.replace(/\./g, '\\.')}/32 `));
    assert.match(await inContainer('-4', 'route', 'show', 'default'), new RegExp(`default via ${GATEWAY.replace(/\./g, '\\.')} dev eth0`));
    assert.match(await inContainer('-o', 'link', 'show', 'lo'), /[<,]UP[,>]/);
    assert.equal((await runUnchecked('ip', ['-n', STAGING, 'link', 'show', 'eth0'])).code, 1, 'the interface left the staging namespace');
    const started = (await readFile(join(dir, 'started'), 'utf8')).trim().split('\n');
    assert.ok(started.length <= 3, `the hook started ${started.length} programs: ${started.join(', ')}`);
  });
});
