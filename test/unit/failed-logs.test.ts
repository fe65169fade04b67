import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { FailedLogs } from '../../src/agent/runtime/failed-logs.js';
import { NotFoundError, RuntimeFailedError } from '../../src/shared/errors.js';
import { removeTree } from '../../src/shared/remove-tree.js';

describe('failed CRIU logs', () => {
  const roots: string[] = [];
  after(async () => {
    for (const r of roots) await removeTree(r);
  });

  async function workDir(tag: string): Promise<{ root: string; work: string }> {
    const root = await mkdtemp(join(tmpdir(), 'chipmunk-failed-logs-'));
    roots.push(root);
    const work = join(root, 'checkpoints', tag, 'criu-work');
    await mkdir(work, { recursive: true });
    await writeFile(join(work, 'dump.log'), 'Error (criu/files-reg.c:1): Can not dump ghost file\n');
    await writeFile(join(work, 'stats-dump'), 'not a log');
    return { root, work };
  }

  it('moves the logs the error names out of the doomed work dir and points the error at them', async () => {
    const { root, work } = await workDir('c1');
    const logs = new FailedLogs(join(root, 'failed-logs'));
    const err = new RuntimeFailedError(`checkpoint of 'web' failed: see ${join(work, 'dump.log')}`, { op: 'runc checkpoint', logPath: join(work, 'dump.log'), stderr: 'x' });
    const kept = await logs.keepFor(err, 'checkpoint', 'c1', work);
    assert.ok(kept instanceof RuntimeFailedError);
    const keptPath = join(root, 'failed-logs', 'checkpoint-c1', 'dump.log');
    assert.equal(kept.details.logPath, keptPath);
    assert.equal(kept.details.op, 'runc checkpoint');
    assert.equal(kept.details.stderr, 'x');
    assert.equal(kept.message, `checkpoint of 'web' failed: see ${keptPath}`, 'paths in the message follow the log');
    assert.match(await readFile(keptPath, 'utf8'), /ghost file/);
    assert.ok(!existsSync(join(root, 'failed-logs', 'checkpoint-c1', 'stats-dump')), 'only logs are kept');
  });

  it('leaves other errors as they are', async () => {
    const { root, work } = await workDir('c2');
    const logs = new FailedLogs(join(root, 'failed-logs'));
    const notFound = new NotFoundError('no container');
    assert.equal(await logs.keepFor(notFound, 'checkpoint', 'c2', work), notFound);
    const elsewhere = new RuntimeFailedError('runc pause failed', { op: 'runc pause', logPath: join(root, 'runc.log') });
    assert.equal(await logs.keepFor(elsewhere, 'checkpoint', 'c2', work), elsewhere, 'a log outside the work dir is not moved');
    assert.ok(existsSync(join(work, 'dump.log')));
  });

  it('keeps the newest ones only', async () => {
    const { root } = await workDir('unused');
    const logs = new FailedLogs(join(root, 'failed-logs'), 3);
    for (let i = 1; i <= 5; i++) {
      const { work } = await workDir(`d${i}`);
      await logs.keepFor(new RuntimeFailedError('dump failed', { op: 'runc checkpoint', logPath: join(work, 'dump.log') }), 'dump', `d${i}`, work);
      await new Promise((r) => setTimeout(r, 15));
    }
    assert.deepEqual(await logs.list(), ['dump-d3', 'dump-d4', 'dump-d5']);
  });
});
