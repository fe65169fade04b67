// CRIU failing for real on the real runtime (runc + CRIU on a test host, test/support/runc-pair.ts):
// the error of a failed checkpoint or dump names a CRIU log that still exists afterwards and
// says why, and the container runs on. The failure: a process holding a deleted file larger than
// CRIU's ghost-file limit (1 MiB by default) open, which CRIU refuses to dump.
// Needs root and `npm run setup`.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { after, before, describe, it } from 'node:test';
import { ensureTestImages } from '../../src/devtools/images.js';
import { RuntimeFailedError } from '../../src/shared/errors.js';
import type { ContainerSpec } from '../../src/shared/protocol.js';
import type { RuntimePair } from '../contract/runtime.contract.js';
import { makeRuncPair, prepareRuncPairs } from '../support/runc-pair.js';

const GHOST_HOLDER: ContainerSpec = {
  name: 'ghost',
  image: 'chipmunk/busybox',
  // The shell keeps fd 3 on a 2 MiB file it deleted, says so, then waits.
  command: ['sh', '-c', 'dd if=/dev/zero of=/tmp/big bs=1M count=2 2>/dev/null; exec 3</tmp/big; rm /tmp/big; echo ghost-ready; while true; do sleep 1; done'],
  env: {},
  ports: [],
  memoryBytes: 0,
};

async function assertKeptLog(err: unknown, op: string, id: string): Promise<void> {
  assert.ok(err instanceof RuntimeFailedError, `a RuntimeFailedError, got ${String(err)}`);
  const logPath = err.details.logPath;
  assert.equal(typeof logPath, 'string', 'the error names a log');
  assert.match(logPath as string, new RegExp(`/failed-logs/${op}-${id}/dump\\.log$`));
  assert.ok(existsSync(logPath as string), `the log the error names exists: ${logPath}`);
  const log = await readFile(logPath as string, 'utf8');
  assert.match(log, /Error \(.*ghost/i, "it holds CRIU's own account of the failure");
  assert.match(err.message, /ghost/i, "the message quotes CRIU's reason");
}

describe('CRIU failures on the real runtime', { timeout: 5 * 60_000 }, () => {
  let pair: RuntimePair;

  before(async () => {
    await ensureTestImages();
    await prepareRuncPairs();
    pair = await makeRuncPair();
  });

  after(async () => {
    await pair?.cleanup();
  });

  it('a failed checkpoint keeps the CRIU log its error names; the container runs on', async () => {
    const c = await pair.source.run(GHOST_HOLDER);
    assert.equal(c.status, 'running');
    await waitFor(async () => (await pair.source.logs(c.name, { stream: 'stdout' })).includes('ghost-ready'));
    const id = `ckpt-${randomBytes(3).toString('hex')}`;
    const err = await pair.source.checkpoint(c.name, id).then(
      () => assert.fail('the checkpoint should fail'),
      (e: unknown) => e,
    );
    await assertKeptLog(err, 'checkpoint', id);
    assert.equal((await pair.source.get(c.name)).status, 'running', 'the container runs on');

    const migrationId = `mig-${randomBytes(3).toString('hex')}`;
    const dumpErr = await pair.source.dump(c.name, { migrationId, mode: 'copy' }).then(
      () => assert.fail('the dump should fail'),
      (e: unknown) => e,
    );
    await assertKeptLog(dumpErr, 'dump', migrationId);
    assert.equal((await pair.source.get(c.name)).status, 'running', 'the container runs on after a failed dump too');
    assert.ok(!existsSync(pair.source.migrationPaths(migrationId).images), 'the failed dump left no images behind');
    await pair.source.remove(c.name, { force: true });
  });
});

async function waitFor(ready: () => Promise<boolean>): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!(await ready())) {
    if (Date.now() > deadline) throw new Error('the container did not say ghost-ready within 10 s');
    await new Promise((r) => setTimeout(r, 100));
  }
}
