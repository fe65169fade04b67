// The frozen window's CRIU steps read from its logs (src/agent/runtime/criu-steps.ts): the
// relative times of the marker lines, placed on the wall clock by the log's modification time.
import assert from 'node:assert/strict';
import { mkdtemp, rm, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { criuLogSteps } from '../../src/agent/runtime/criu-steps.js';

let dir: string;
before(async () => (dir = await mkdtemp(join(tmpdir(), 'chipmunk-criu-steps-'))));
after(async () => rm(dir, { recursive: true, force: true }));

/** Writes `lines` as a CRIU log whose last line was written at `lastAt` (ms since epoch). */
async function log(name: string, lines: string[], lastAt: number): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, `${lines.join('\n')}\n`);
  await utimes(path, lastAt / 1000, lastAt / 1000);
  return path;
}

describe('CRIU log steps', () => {
  it('a lazy dump: init, freeze, network lock and the dump up to the page server being ready', async () => {
    const path = await log('dump.log', [
      '(00.000000) CRIU run id = x',
      '(00.031448) freezing cgroup /sys/fs/cgroup/freezer/c: 100 x 100ms attempts, timeout: 10s',
      '(00.031677) freezer.state=FROZEN',
      '(00.031681) freezing processes: 0 attempts done',
      '(00.032553) net: Lock network',
      '(00.032554) Running network-lock scripts',
      '(00.038554) 	RPC',
      '(00.145250) Starting page server on port 27320',
      '(00.145274) Running status-ready scripts',
    ], 1_000_000_145.274);
    const steps = await criuLogSteps(path, 'dump');
    assert.deepEqual(steps.map((s) => [s.step, s.ms]), [['criu-init', 31.4], ['freeze', 0.2], ['network-lock', 6], ['criu-dump', 113.6]]);
    assert.equal(steps[0]!.at, 1_000_000_000, 'CRIU started 145.274 ms before its last line');
    assert.equal(steps[3]!.at, 1_000_000_032);
  });

  it('a restore: init, the tasks forked into their namespaces, then restored up to "Tasks resumed"', async () => {
    const path = await log('restore.log', [
      '(00.000000) CRIU run id = x',
      '(00.039704) Forking task with 1 pid (flags 0x7c028000)',
      '(00.122298) Running post-setup-namespaces scripts',
      '(00.201842) Restore finished successfully. Tasks resumed.',
      '(00.202048) 	RPC',
    ], 2_000_000_202.048);
    const steps = await criuLogSteps(path, 'restore');
    assert.deepEqual(steps.map((s) => [s.step, s.ms]), [['criu-init', 39.7], ['criu-namespaces', 82.6], ['criu-restore', 79.5]]);
    assert.equal(steps[2]!.at, 2_000_000_122);
  });

  it("a restore with prestart hooks: runc's answer to the setup-namespaces notice, within the namespaces step", async () => {
    const path = await log('restore-hooks.log', [
      '(00.000000) CRIU run id = x',
      '(00.039704) Forking task with 1 pid (flags 0x7c028000)',
      '(00.090698) Running setup-namespaces scripts',
      '(00.090707) \tRPC',
      '(00.149540)      1: cg: Move into 2',
      '(00.201705) Running post-setup-namespaces scripts',
      '(00.308840) Restore finished successfully. Tasks resumed.',
    ], 4_000_000_308.84);
    const steps = await criuLogSteps(path, 'restore');
    assert.deepEqual(steps.map((s) => [s.step, s.ms]), [['criu-init', 39.7], ['criu-namespaces', 162], ['prestart-hooks', 58.8], ['criu-restore', 107.1]]);
    assert.equal(steps[2]!.at, 4_000_000_091);
  });

  it('a missing log or missing markers give no step rather than an error', async () => {
    assert.deepEqual(await criuLogSteps(join(dir, 'absent.log'), 'dump'), []);
    const path = await log('odd.log', ['(00.000000) CRIU run id = x', '(00.010000) something else'], 3_000_000_010);
    assert.deepEqual((await criuLogSteps(path, 'restore')).map((s) => s.step), []);
  });
});
