// The source's dump on the real runtime (runc + CRIU on a test host, test/support/runc-pair.ts):
// the container is frozen just before the dump's CRIU starts (freeze-first.ts), so CRIU finds its
// cgroup frozen and skips the freezer step it would otherwise wait 100 ms in; a dump that fails,
// at once or later (its lazy page server), leaves it running here. Read from CRIU's own log:
// the first freezer state it reads is FROZEN and it never waits for "freezing processes".
// CHIPMUNK_DOWNTIME_OFF=pre-freeze (bench/downtime's comparison) lets CRIU freeze it, as before.
// Needs root and `npm run setup`.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { connect } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { ensureTestImages } from '../../src/devtools/images.js';
import type { ContainerSpec } from '../../src/shared/protocol.js';
import { StepClock } from '../../src/shared/steps.js';
import type { RuntimePair } from '../contract/runtime.contract.js';
import { makeRuncPair, prepareRuncPairs } from '../support/runc-pair.js';

/** Always on a CPU: the container CRIU's own freeze most often finds still FREEZING. */
const BUSY: Omit<ContainerSpec, 'name'> = {
  image: 'chipmunk/busybox',
  command: ['sh', '-c', 'while :; do :; done'],
  env: {},
  ports: [],
  memoryBytes: 0,
};

/** What CRIU's log says of its freeze: the first freezer state it read, and whether it waited for its own freeze. */
async function criuFreeze(pair: RuntimePair, migrationId: string): Promise<{ firstState?: string; waited: boolean }> {
  // The dump's CRIU works beside its images (layout.ts: migrations/ID/criu-work).
  const log = await readFile(join(dirname(pair.source.migrationPaths(migrationId).images), 'criu-work', 'dump.log'), 'utf8');
  return { firstState: /^\([\d.]+\) freezer\.state=(\w+)/m.exec(log)?.[1], waited: /freezing processes: \d+ attempts done/.test(log) };
}

function listening(at: { address: string; port: number }): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host: at.address, port: at.port }, () => {
      socket.destroy();
      resolve(true);
    });
    socket.on('error', () => resolve(false));
  });
}

describe('the dump freezes the container before CRIU starts', { timeout: 5 * 60_000 }, () => {
  let pair: RuntimePair;

  before(async () => {
    await ensureTestImages();
    await prepareRuncPairs();
    pair = await makeRuncPair();
  });

  after(async () => {
    delete process.env.CHIPMUNK_DOWNTIME_OFF;
    await pair?.cleanup();
  });

  it('CRIU finds the cgroup FROZEN and does not wait for a freeze of its own; the freeze is the dump\'s pause step', async () => {
    const c = await pair.source.run({ ...BUSY, name: 'prefrozen' });
    const migrationId = `mig-${randomBytes(3).toString('hex')}`;
    const steps = new StepClock();
    await pair.source.dump(c.name, { migrationId, mode: 'copy', steps });
    assert.deepEqual(await criuFreeze(pair, migrationId), { firstState: 'FROZEN', waited: false });
    assert.ok(steps.steps.some((s) => s.step === 'pause'), `a pause step among ${steps.steps.map((s) => s.step).join(', ')}`);
    await pair.source.rollback(migrationId);
    assert.equal((await pair.source.get(c.name)).status, 'running', 'rolled back, it runs again');
    await pair.source.remove(c.name, { force: true });
  });

  it('a lazy page server that fails (a client that is no lazy-pages daemon) leaves the container running here: rolled back, it runs', async () => {
    const c = await pair.source.run({ ...BUSY, name: 'pagesfail' });
    const migrationId = `mig-${randomBytes(3).toString('hex')}`;
    const pageServer = pair.pageServer();
    await pair.source.dump(c.name, { migrationId, mode: 'lazy', pageServer });
    // Garbage where CRIU expects page requests: its page server fails, and CRIU resumes the tasks.
    await new Promise<void>((resolve) => {
      const socket = connect({ host: pageServer.address, port: pageServer.port }, () => socket.end(Buffer.alloc(64, 0xff)));
      // CRIU resets it.
      socket.on('close', () => resolve());
      socket.on('error', () => resolve());
    });
    // The page server gone (its port refuses), the dump has failed; then it can roll back only if it runs here again.
    const deadline = Date.now() + 30_000;
    while (await listening(pageServer)) {
      assert.ok(Date.now() < deadline, 'the page server fails within 30 s');
      await sleep(100);
    }
    let state = await pair.source.dumpState(migrationId);
    while (!state.canRollBack) {
      assert.ok(Date.now() < deadline, `it can roll back within 30 s: ${state.reason}`);
      await sleep(100);
      state = await pair.source.dumpState(migrationId);
    }
    assert.equal((await pair.source.rollback(migrationId)).status, 'running');
    await pair.source.remove(c.name, { force: true });
  });

  it('without the lever (CHIPMUNK_DOWNTIME_OFF=pre-freeze) CRIU freezes the running container itself', async () => {
    process.env.CHIPMUNK_DOWNTIME_OFF = 'pre-freeze';
    try {
      const c = await pair.source.run({ ...BUSY, name: 'selffrozen' });
      const migrationId = `mig-${randomBytes(3).toString('hex')}`;
      await pair.source.dump(c.name, { migrationId, mode: 'copy' });
      assert.equal((await criuFreeze(pair, migrationId)).firstState, 'THAWED');
      await pair.source.rollback(migrationId);
      await pair.source.remove(c.name, { force: true });
    } finally {
      delete process.env.CHIPMUNK_DOWNTIME_OFF;
    }
  });
});
