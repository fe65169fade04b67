import { describe, it } from 'node:test';
import assert from 'node:assert/strict';

import type { HostCheck } from '../../src/agent/host/capabilities.js';
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
