// The agent's in-process file system checks, asked inside a move's frozen window
// (rootfs.ts isMountpoint, context.ts treeBytes): they agree with `mountpoint` and `du`.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { link, mkdir, mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { treeBytes } from '../../src/agent/runtime/context.js';
import { isMountpoint } from '../../src/agent/runtime/rootfs.js';

describe('agent file system checks', () => {
  it('treeBytes counts blocks on disk as du -s does: a sparse file by what is written, a hard-linked file once', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'chipmunk-tree-bytes-'));
    try {
      await mkdir(join(dir, 'a/b'), { recursive: true });
      await writeFile(join(dir, 'a/b/data'), Buffer.alloc(100_000, 7));
      await link(join(dir, 'a/b/data'), join(dir, 'a/again'));
      await writeFile(join(dir, 'sparse'), 'x');
      await truncate(join(dir, 'sparse'), 1 << 30);
      const du = Number(execFileSync('du', ['-s', '--block-size=1', dir]).toString().split(/\s/)[0]);
      assert.equal(await treeBytes(dir), du);
      assert.ok(du < 1 << 20, 'the sparse gigabyte is not counted');
      assert.equal(await treeBytes(join(dir, 'absent')), 0);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('isMountpoint: true where a file system is mounted, false for a plain or missing directory', async () => {
    assert.equal(await isMountpoint('/proc'), true);
    assert.equal(await isMountpoint('/proc/'), true);
    const dir = await mkdtemp(join(tmpdir(), 'chipmunk-mountpoint-'));
    try {
      assert.equal(await isMountpoint(dir), false);
      assert.equal(await isMountpoint(join(dir, 'missing')), false);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
