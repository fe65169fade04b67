// A checkpoint's copy of a directory layer taken in two parts (src/agent/runtime/checkpoint-files.ts):
// a pre-copy while the files change, then the changed entries only: the result must equal the
// source as it is at the end, entry for entry (content, type, mode, owner, symlink targets).
import assert from 'node:assert/strict';
import { chmod, chown, mkdir, mkdtemp, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { finishCopy, preCopy, type PreCopied } from '../../src/agent/runtime/checkpoint-files.js';
import { runUnchecked } from '../../src/shared/exec.js';

let root: string;
let src: string;
let dst: string;

beforeEach(async () => {
  root = await mkdtemp(join(tmpdir(), 'chipmunk-ckpt-files-'));
  src = join(root, 'upper');
  dst = join(root, 'copy');
  await mkdir(join(src, 'data', 'base'), { recursive: true });
  await mkdir(join(src, 'data', 'wal'), { recursive: true });
  await mkdir(join(src, 'swap', 'a'), { recursive: true });
  await mkdir(join(src, 'swap', 'b'), { recursive: true });
  for (let i = 0; i < 20; i++) await writeFile(join(src, 'data', 'base', `rel${i}`), `table ${i} `.repeat(500));
  await writeFile(join(src, 'data', 'wal', 'seg1'), 'wal one');
  await writeFile(join(src, 'swap', 'a', 'conf'), 'config A');
  await writeFile(join(src, 'swap', 'b', 'conf'), 'config B');
  await symlink('data/base/rel0', join(src, 'link'));
});

afterEach(async () => {
  await rm(root, { recursive: true, force: true });
});

/** Every entry of DIR: path, type, mode, owner, size, content digest or link target. */
async function manifest(dir: string): Promise<string> {
  const res = await runUnchecked('bash', ['-c', 'cd "$1" && find . -printf "%p %y %m %U:%G %s %l\\n" | sort && find . -type f -print0 | sort -z | xargs -0 -r md5sum', 'manifest', dir]);
  assert.equal(res.code, 0, res.stderr);
  return res.stdout;
}

async function preCopied(): Promise<PreCopied> {
  const pre = await preCopy(src, dst);
  assert.equal(await manifest(dst), await manifest(src), 'the pre-copy is a copy');
  return pre;
}

/**
 * Instead of waiting out the real margin (a second): the pre-copy's start moved to 100 ms ago,
 * after a pause of 300 ms, so entries written before count as unchanged and those written after
 * as changed (ctime stamps lag the clock by a tick, a few ms, which the 100 ms cover).
 */
async function pastMargin(pre: PreCopied): Promise<PreCopied> {
  await new Promise((r) => setTimeout(r, 300));
  return { ...pre, changedSinceMs: Date.now() - 100 };
}

describe('a copy finished inside the freeze', () => {
  it('copies again only what changed after the pre-copy, and the result equals the source', async () => {
    const pre = await pastMargin(await preCopied());
    await writeFile(join(src, 'data', 'base', 'rel3'), 'rewritten in place');
    await chmod(join(src, 'data', 'base', 'rel4'), 0o600);
    await chown(join(src, 'data', 'base', 'rel5'), 101, 102);
    const done = await finishCopy(pre);
    assert.deepEqual(done, { files: 3, subtrees: [] }, 'three files changed, no directory');
    assert.equal(await manifest(dst), await manifest(src));
  });

  it('a directory that gained, lost or renamed entries is copied again with its subtree', async () => {
    const pre = await pastMargin(await preCopied());
    await writeFile(join(src, 'data', 'wal', 'seg2'), 'wal two');
    await rm(join(src, 'data', 'wal', 'seg1'));
    // Two directories swap places: their entries keep old ctimes, only the directories move.
    await rename(join(src, 'swap', 'a'), join(src, 'swap', 'tmp'));
    await rename(join(src, 'swap', 'b'), join(src, 'swap', 'a'));
    await rename(join(src, 'swap', 'tmp'), join(src, 'swap', 'b'));
    const done = await finishCopy(pre);
    assert.deepEqual(done.subtrees.sort(), ['data/wal', 'swap']);
    assert.equal(await manifest(dst), await manifest(src));
  });

  it('nothing changed: nothing copied', async () => {
    const pre = await pastMargin(await preCopied());
    assert.deepEqual(await finishCopy(pre), { files: 0, subtrees: [] });
    assert.equal(await manifest(dst), await manifest(src));
  });

  it('entries changed just before the pre-copy began count as changed (the margin)', async () => {
    await writeFile(join(src, 'data', 'base', 'rel7'), 'written a moment before');
    const pre = await preCopied();
    await writeFile(join(src, 'data', 'base', 'rel7'), 'and after');
    const done = await finishCopy(pre);
    assert.ok(done.files >= 1 || done.subtrees.length > 0, 'rel7 is copied again');
    assert.equal(await manifest(dst), await manifest(src));
  });

  it('a changed hard link: the whole tree is copied again, links kept', async () => {
    await runUnchecked('ln', [join(src, 'data', 'base', 'rel1'), join(src, 'data', 'wal', 'rel1-link')]);
    const pre = await pastMargin(await preCopied());
    await writeFile(join(src, 'data', 'base', 'rel1'), 'both names see this');
    assert.deepEqual(await finishCopy(pre), { files: 0, subtrees: [''] });
    assert.equal(await manifest(dst), await manifest(src));
    const links = await runUnchecked('stat', ['-c', '%h', join(dst, 'data', 'wal', 'rel1-link')]);
    assert.equal(links.stdout.trim(), '2');
  });

  it('a hard link below a directory copied again: the whole tree is copied again, links kept', async () => {
    await runUnchecked('ln', [join(src, 'data', 'base', 'rel2'), join(src, 'swap', 'a', 'rel2-link')]);
    const pre = await pastMargin(await preCopied());
    await writeFile(join(src, 'swap', 'a', 'new'), 'a new entry: swap/a is copied again');
    assert.deepEqual(await finishCopy(pre), { files: 0, subtrees: [''] });
    assert.equal(await manifest(dst), await manifest(src));
    const links = await runUnchecked('stat', ['-c', '%h', join(dst, 'data', 'base', 'rel2')]);
    assert.equal(links.stdout.trim(), '2', 'rel2 and swap/a/rel2-link are still one file');
  });
});
