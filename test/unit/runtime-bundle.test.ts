// The OCI config of a container with and without a user namespace of its own (bundle.ts), and
// the prestart hook that moves its interface in (network.ts): what runc is given, no runc needed.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { buildOciConfig, USER_NAMESPACE_IDS, type BundleInputs } from '../../src/agent/runtime/bundle.js';

function inputs(userNamespace: boolean): BundleInputs {
  return {
    spec: { name: 'web', image: 'img', command: [], env: {}, ports: [], memoryBytes: 0 },
    image: { id: 'sha', entrypoint: [], cmd: ['/bin/sh'], env: [], workingDir: '/' },
    rootfs: '/data/containers/web/rootfs',
    netns: 'chmk-n1-web-0',
    netnsPath: '/var/run/netns/chmk-n1-web-0',
    userNamespace,
    cgroupsPath: '/chipmunk/n1/web-0',
    hostname: 'web',
    criuConfigPath: '/data/containers/web/criu.conf',
    etcMounts: [],
    volumeDir: (v) => `/data/containers/web/files/volumes/${v}`,
  };
}

type Config = { linux: { namespaces: Array<{ type: string; path?: string }>; uidMappings?: unknown; gidMappings?: unknown }; hooks?: { prestart: Array<{ path: string; args: string[] }> } };

describe('the OCI config', () => {
  it('without a user namespace: runc joins the attached network namespace by path, no hook', () => {
    const config = buildOciConfig(inputs(false)) as Config;
    assert.deepEqual(config.linux.namespaces.find((n) => n.type === 'network'), { type: 'network', path: '/var/run/netns/chmk-n1-web-0' });
    assert.equal(config.linux.namespaces.some((n) => n.type === 'user'), false);
    assert.equal(config.linux.uidMappings, undefined);
    assert.equal(config.hooks, undefined);
  });

  it("with one: a user namespace with the host's ids, runc makes the network namespace, and a prestart hook moves the staging namespace's interface in", () => {
    const config = buildOciConfig(inputs(true)) as Config;
    assert.ok(config.linux.namespaces.some((n) => n.type === 'user' && n.path === undefined));
    assert.deepEqual(config.linux.namespaces.find((n) => n.type === 'network'), { type: 'network' });
    assert.deepEqual(config.linux.uidMappings, [{ containerID: 0, hostID: 0, size: 4294967295 }]);
    assert.deepEqual(config.linux.gidMappings, USER_NAMESPACE_IDS);
    const hooks = config.hooks?.prestart ?? [];
    assert.equal(hooks.length, 1);
    assert.equal(hooks[0]!.path, '/bin/sh');
    assert.equal(hooks[0]!.args.at(-2), 'chmk-n1-web-0', 'the hook is told the staging namespace');
    assert.equal(hooks[0]!.args.at(-1), '', 'and no cluster address');
    // What the script does, run against real namespaces: runtime-interface-hook.test.ts.
    assert.match(hooks[0]!.args[2]!, /link set eth0 netns \$pid/);
  });

  it('a container with a cluster address: the hook adds it as a /32 in the container namespace', () => {
    const b = inputs(true);
    const config = buildOciConfig({ ...b, spec: { ...b.spec, address: '198.19.128.7' } }) as Config;
    const hook = config.hooks!.prestart[0]!;
    assert.equal(hook.args.at(-1), '198.19.128.7');
    assert.match(hook.args[2]!, /addr add \$2\/32 dev eth0/);
  });
});
