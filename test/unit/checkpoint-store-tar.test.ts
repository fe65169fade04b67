import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { link, mkdir, mkdtemp, open, readFile, readlink, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TAR_FLAGS } from '../../src/shared/tree-archive.js';
import { decodeManifest, encodeManifest, scanTar } from '../../src/checkpoint-store/manifest.js';
import { expandSparse, paddingOf, TarReader } from '../../src/checkpoint-store/tar.js';
import { removeTree } from '../../src/shared/remove-tree.js';

async function* once(buffer: Buffer): AsyncGenerator<Buffer> {
  // Odd piece sizes: the reader must not depend on how the stream is cut.
  for (let at = 0; at < buffer.length; at += 777) yield buffer.subarray(at, at + 777);
}

describe('checkpoint store tar', () => {
  let work: string;
  let archive: Buffer;
  let rebuiltArchive: Buffer | undefined;

  before(async () => {
    work = await mkdtemp(join(tmpdir(), 'chipmunk-cstar-'));
    const src = join(work, 'src');
    await mkdir(join(src, 'empty-dir'), { recursive: true });
    await writeFile(join(src, 'empty'), '');
    await writeFile(join(src, 'small'), 'hello\n');
    await writeFile(join(src, 'big'), randomBytes(3 * 4096 + 100));
    const longDir = join(src, 'd'.repeat(60), 'e'.repeat(60));
    await mkdir(longDir, { recursive: true });
    await writeFile(join(longDir, 'f'.repeat(120)), 'long\n');
    await symlink('small', join(src, 'link'));
    await symlink('x'.repeat(150), join(src, 'long-link'));
    await link(join(src, 'big'), join(src, 'hard'));
    const sparse = await open(join(src, 'sparse'), 'w');
    await sparse.write(Buffer.alloc(4096, 9), 0, 4096, 1024 * 1024);
    await sparse.truncate(4 * 1024 * 1024);
    await sparse.close();
    execFileSync('python3', ['-c', 'import os, sys; os.setxattr(sys.argv[1], "user.chipmunk", b"yes")', join(src, 'small')]);
    archive = execFileSync('tar', ['-C', src, '-cf', '-', ...TAR_FLAGS, '.'], { maxBuffer: 64 * 1024 * 1024 });
  });

  after(async () => {
    await removeTree(work);
  });

  it('parses real GNU tar output and re-creates it byte for byte', async () => {
    const reader = new TarReader(once(archive));
    const rebuilt: Buffer[] = [];
    const byPath = new Map<string, { type: string; size: number; realSize: number; linkTarget?: string; xattrs: Record<string, string>; sparse: boolean }>();
    for (let entry = await reader.next(); entry; entry = await reader.next()) {
      rebuilt.push(entry.header);
      for await (const piece of reader.content(4096)) rebuilt.push(piece);
      rebuilt.push(paddingOf(entry.size));
      byPath.set(entry.path, entry);
    }
    rebuilt.push(Buffer.alloc(reader.endBytes));
    rebuiltArchive = Buffer.concat(rebuilt);
    assert.ok(rebuiltArchive.equals(archive), 'rebuilt archive differs');

    assert.equal(byPath.get('')?.type, 'dir');
    assert.equal(byPath.get('empty-dir')?.type, 'dir');
    assert.equal(byPath.get('empty')?.size, 0);
    assert.equal(byPath.get('link')?.linkTarget, 'small');
    assert.equal(byPath.get('long-link')?.linkTarget, 'x'.repeat(150));
    assert.equal(byPath.get(`${'d'.repeat(60)}/${'e'.repeat(60)}/${'f'.repeat(120)}`)?.size, 5);
    // tar stores the second name it meets of a file as a hard link to the first.
    assert.deepEqual([byPath.get('big')?.type, byPath.get('hard')?.type].sort(), ['file', 'hardlink']);
    assert.equal(byPath.get('small')?.xattrs['user.chipmunk'], 'yes');
    const sparse = byPath.get('sparse');
    assert.equal(sparse?.sparse, true);
    assert.equal(sparse?.realSize, 4 * 1024 * 1024);
    assert.ok(sparse!.size < 64 * 1024, 'sparse file is stored sparse');
  });

  it('expands a sparse entry to the file it was', async () => {
    const reader = new TarReader(once(archive));
    for (let entry = await reader.next(); entry; entry = await reader.next()) {
      if (entry.path !== 'sparse') continue;
      const pieces: Buffer[] = [];
      for await (const piece of expandSparse(reader.content(4096), entry.realSize)) pieces.push(piece);
      const bytes = Buffer.concat(pieces);
      assert.ok(bytes.equals(await readFile(join(work, 'src/sparse'))));
      return;
    }
    assert.fail('no sparse entry');
  });

  it('round-trips the manifest, and tar extracts the re-created archive', async () => {
    const { manifest, logicalBytes } = await scanTar(once(archive));
    const decoded = decodeManifest(encodeManifest(manifest));
    assert.equal(decoded.entries.length, manifest.entries.length);
    assert.equal(decoded.endBytes, manifest.endBytes);
    assert.ok(logicalBytes > 3 * 4096);
    const out = join(work, 'out');
    await mkdir(out);
    assert.ok(rebuiltArchive, 'the parse test rebuilt the archive');
    execFileSync('tar', ['-C', out, '-xf', '-', ...TAR_FLAGS], { input: rebuiltArchive });
    for (const name of ['big', 'hard', 'small', 'empty', 'sparse', `${'d'.repeat(60)}/${'e'.repeat(60)}/${'f'.repeat(120)}`]) {
      assert.ok((await readFile(join(out, name))).equals(await readFile(join(work, 'src', name))), name);
    }
    assert.equal(await readlink(join(out, 'long-link')), 'x'.repeat(150));
    assert.ok((await stat(join(out, 'empty-dir'))).isDirectory());
    assert.equal((await stat(join(out, 'hard'))).ino, (await stat(join(out, 'big'))).ino);
  });
});
