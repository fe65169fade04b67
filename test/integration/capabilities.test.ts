// Runs the real probes on this machine, which `npm run setup` has prepared (criu 4.2.1 at
// /opt/chipmunk/bin/criu, runc, podman, CNI plugins, sysctls) and which runs as root.
import { before, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import { detectCapabilities, runHostChecks, type HostCheck } from '../../src/shared/host/capabilities.js';

function checkById(checks: HostCheck[], id: string): HostCheck {
  const check = checks.find((c) => c.id === id);
  assert.ok(check, `no check with id ${id} in ${checks.map((c) => c.id).join(', ')}`);
  return check;
}

describe('runHostChecks on this machine', () => {
  let checks: HostCheck[];
  before(async () => {
    checks = await runHostChecks();
  });

  it('returns one well-formed result per check, with unique ids', () => {
    for (const check of checks) {
      assert.ok(['ok', 'warn', 'missing'].includes(check.status), JSON.stringify(check));
      assert.ok(check.title && check.detail, JSON.stringify(check));
    }
    assert.equal(new Set(checks.map((c) => c.id)).size, checks.length);
  });

  it('finds CRIU >= 4.2 and a passing `criu check`', () => {
    assert.equal(checkById(checks, 'criu').status, 'ok', checkById(checks, 'criu').detail);
    assert.equal(checkById(checks, 'criu-check').status, 'ok', checkById(checks, 'criu-check').detail);
  });

  it('finds userfaultfd, which lazy migration needs', () => {
    assert.equal(checkById(checks, 'uffd').status, 'ok', checkById(checks, 'uffd').detail);
  });

  it('reports soft-dirty tracking, at worst as a warning', () => {
    // Off in this kernel, on in most production kernels: either is a valid finding.
    assert.ok(['ok', 'warn'].includes(checkById(checks, 'soft-dirty').status));
  });

  it('finds the tools setup installs', () => {
    for (const id of ['root', 'runc', 'podman', 'cni-plugins', 'iptables', 'nsenter', 'ip', 'tar', 'cgroup']) {
      assert.equal(checkById(checks, id).status, 'ok', `${id}: ${checkById(checks, id).detail}`);
    }
  });

  it('reports an absent CRIU as missing instead of throwing', async () => {
    const withoutCriu = await runHostChecks({ criuPath: '/nonexistent/chipmunk/criu' });
    const criu = checkById(withoutCriu, 'criu');
    assert.equal(criu.status, 'missing');
    assert.match(criu.detail, /not found/);
    assert.equal(criu.fix, 'npm run setup');
    assert.equal(checkById(withoutCriu, 'uffd').status, 'missing');
  });
});

describe('detectCapabilities on this machine', () => {
  it('allows lazy migration and names the CRIU version and cgroup mode', async () => {
    const capabilities = await detectCapabilities();
    assert.equal(capabilities.lazyMigration, true);
    assert.equal(typeof capabilities.softDirty, 'boolean');
    assert.match(capabilities.criuVersion ?? '', /^4\.\d+/);
    assert.ok(['v1', 'v2', 'hybrid'].includes(capabilities.cgroupMode), capabilities.cgroupMode);
  });

  it('rules out lazy migration when CRIU does not run', async () => {
    const capabilities = await detectCapabilities({ criuPath: '/nonexistent/chipmunk/criu' });
    assert.equal(capabilities.lazyMigration, false);
    assert.equal(capabilities.criuVersion, undefined);
  });
});
