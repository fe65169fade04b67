/**
 * The /etc files a container gets (etc-files.ts): its own name at its address, and the host's
 * resolv.conf without loopback name servers, never a resolver the host did not name.
 */
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { containerResolvConf, hostsFile, writeEtcFiles } from '../../src/agent/runtime/etc-files.js';

const nameservers = (text: string) => [...text.matchAll(/^nameserver\s+(\S+)/gm)].map((m) => m[1]);

describe('container /etc files', () => {
  it('hosts names localhost and the container at its address', () => {
    const hosts = hostsFile('web', '198.19.3.7');
    assert.match(hosts, /^127\.0\.0\.1\tlocalhost$/m);
    assert.match(hosts, /^198\.19\.3\.7\tweb$/m);
  });

  it('resolv.conf keeps the host lines but its loopback name servers', () => {
    const out = containerResolvConf('nameserver 127.0.0.53\nnameserver 198.18.9.1\nnameserver ::1\nsearch example.test\noptions edns0\n');
    assert.deepEqual(nameservers(out), ['198.18.9.1']);
    assert.match(out, /^search example\.test$/m);
    assert.match(out, /^options edns0$/m);
  });

  it('resolv.conf with only loopback name servers left is comments only, naming no server', () => {
    const out = containerResolvConf('nameserver 127.0.0.53\nsearch example.test\n');
    assert.deepEqual(nameservers(out), []);
    for (const line of out.trim().split('\n')) assert.match(line, /^#/);
    assert.match(out, /only loopback name servers/);
    assert.deepEqual(nameservers(containerResolvConf('')), []);
  });

  it('writes the three files and their read-only mount points; a missing host resolv.conf gives a comment-only one', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'chipmunk-etc-test-'));
    const mounts = await writeEtcFiles(join(dir, 'etc'), { hostname: 'db', ip: '198.19.3.9', resolvConfPath: join(dir, 'absent') });
    assert.deepEqual(mounts.map((m) => m.destination), ['/etc/hosts', '/etc/resolv.conf', '/etc/hostname']);
    assert.equal(await readFile(join(dir, 'etc', 'hostname'), 'utf8'), 'db\n');
    assert.deepEqual(nameservers(await readFile(join(dir, 'etc', 'resolv.conf'), 'utf8')), []);
    await writeFile(join(dir, 'resolv'), 'nameserver 198.18.9.2\n');
    await writeEtcFiles(join(dir, 'etc'), { hostname: 'db', ip: '198.19.4.2', resolvConfPath: join(dir, 'resolv') });
    assert.match(await readFile(join(dir, 'etc', 'hosts'), 'utf8'), /^198\.19\.4\.2\tdb$/m);
    assert.deepEqual(nameservers(await readFile(join(dir, 'etc', 'resolv.conf'), 'utf8')), ['198.18.9.2']);
    await rm(dir, { recursive: true });
  });
});
