import { describe, it } from 'node:test';
import assert from 'node:assert/strict';

import { sysResourceCheck, type HostCheck } from '../../src/shared/host/capabilities.js';
import { doctorExitCode, doctorJson, renderDoctorTable } from '../../src/cli/doctor.js';

const healthy: HostCheck[] = [
  { id: 'root', title: 'root user', status: 'ok', detail: 'uid 0' },
  { id: 'criu', title: 'CRIU >= 4.2', status: 'ok', detail: '4.2.1 at /opt/chipmunk/bin/criu' },
];
const softDirtyOff: HostCheck = {
  id: 'soft-dirty',
  title: 'soft-dirty tracking (pre-copy)',
  status: 'warn',
  detail: 'mem_dirty_track: Dirty tracking is OFF',
  fix: 'for pre-copy, boot a kernel built with CONFIG_MEM_SOFT_DIRTY=y',
};
const runcMissing: HostCheck = { id: 'runc', title: 'runc', status: 'missing', detail: 'runc not found', fix: 'npm run setup' };
const tarMissing: HostCheck = { id: 'tar', title: 'tar', status: 'missing', detail: 'tar not found', fix: 'npm run setup' };
const pipePagesMissing: HostCheck = {
  id: 'pipe-user-pages-soft',
  title: 'fs.pipe-user-pages-soft',
  status: 'missing',
  detail: 'fs.pipe-user-pages-soft = 16384, want 0',
  fix: 'sysctl -w fs.pipe-user-pages-soft=0',
};

describe('renderDoctorTable', () => {
  it('aligns CHECK, STATUS and DETAIL columns across all rows', () => {
    const checks = [...healthy, softDirtyOff, runcMissing];
    const table = renderDoctorTable(checks).split('\n');
    const [header, ...rows] = table.slice(0, checks.length + 1);
    assert.match(header!, /^CHECK\s+STATUS\s+DETAIL$/);
    const statusColumn = header!.indexOf('STATUS');
    const detailColumn = header!.indexOf('DETAIL');
    checks.forEach((check, i) => {
      const row = rows[i]!;
      assert.ok(row.startsWith(check.title), row);
      assert.equal(row.slice(statusColumn).split(' ')[0], check.status, row);
      assert.equal(row.slice(detailColumn), check.detail, row);
    });
    for (const line of table) assert.doesNotMatch(line, /\s$/, 'no trailing spaces');
  });

  it('has no "How to fix" section when every check is ok', () => {
    assert.doesNotMatch(renderDoctorTable(healthy), /How to fix/);
  });

  it('lists the fixes of non-ok checks, each fix once with the checks it repairs', () => {
    const okWithFix: HostCheck = { ...healthy[0]!, fix: 'should not be listed' };
    const table = renderDoctorTable([okWithFix, runcMissing, softDirtyOff, tarMissing, pipePagesMissing]);
    const fixes = table.split('How to fix:\n')[1]!.split('\n');
    assert.deepEqual(fixes, [
      '  npm run setup  (runc, tar)',
      '  for pre-copy, boot a kernel built with CONFIG_MEM_SOFT_DIRTY=y  (soft-dirty tracking (pre-copy))',
      '  sysctl -w fs.pipe-user-pages-soft=0  (fs.pipe-user-pages-soft)',
    ]);
  });
});

describe('doctorExitCode and doctorJson', () => {
  it('fails only when a check is missing; warnings pass', () => {
    assert.equal(doctorExitCode(healthy), 0);
    assert.equal(doctorExitCode([...healthy, softDirtyOff]), 0);
    assert.equal(doctorExitCode([...healthy, softDirtyOff, runcMissing]), 1);
  });

  it('wraps the checks with the same verdict', () => {
    assert.deepEqual(doctorJson([...healthy, softDirtyOff]), { ok: true, checks: [...healthy, softDirtyOff] });
    assert.deepEqual(doctorJson([runcMissing]), { ok: false, checks: [runcMissing] });
  });
});

describe('the CAP_SYS_RESOURCE check', () => {
  const limits = 'Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n';
  // Root's usual effective set, without (bit 24 clear) and with CAP_SYS_RESOURCE.
  const without = 'Name:\tnode\nCapEff:\t000001fffeffffff\n';
  const withIt = 'Name:\tnode\nCapEff:\t000001ffffffffff\n';

  it('without it, says that non-root processes of containers without a user namespace cannot be checkpointed or migrated, and the fix', () => {
    const check = sysResourceCheck(limits, without);
    assert.equal(check.status, 'warn');
    assert.match(check.detail, /non-root processes in containers without a user namespace of their own \(agent --userns off\) cannot be checkpointed or migrated/);
    assert.match(check.detail, /containers in their own user namespace \(the default\) are not affected/);
    assert.doesNotMatch(check.detail, /harmless/);
    assert.match(check.fix ?? '', /--userns on/);
    assert.match(check.fix ?? '', /CAP_SYS_RESOURCE/);
    assert.match(renderDoctorTable([check]), /How to fix:\n {2}keep the agent's --userns on/);
  });

  it('with it, is ok and names the limits', () => {
    const check = sysResourceCheck(limits, withIt);
    assert.equal(check.status, 'ok');
    assert.match(check.detail, /^present; nofile 1024\/524288/);
  });
});
