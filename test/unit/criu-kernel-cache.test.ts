/**
 * prepareCriuKernelCache: where the cache's directory is not a tmpfs, CRIU never writes its kernel
 * cache, so the agent makes it with CRIU itself (a private tmpfs on /run) and puts it in place;
 * one made in this boot is kept, one older than the boot is made again; on a tmpfs CRIU keeps it
 * and the agent writes nothing. Runs the real CRIU: needs root and `npm run setup`.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, stat, statfs, utimes } from 'node:fs/promises';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { prepareCriuKernelCache } from '../../src/agent/host/criu-kernel-cache.js';

const CRIU = '/opt/chipmunk/bin/criu';
const TMPFS_MAGIC = 0x01021994;
const skip = process.getuid?.() !== 0 || !existsSync(CRIU) ? 'needs root and CRIU (npm run setup)' : false;

async function dirOn(tmpfs: boolean): Promise<string | undefined> {
  for (const base of ['/var/tmp', '/tmp', '/dev/shm']) {
    if (((await statfs(base).catch(() => undefined))?.type === TMPFS_MAGIC) === tmpfs) return mkdtemp(join(base, 'chipmunk-kdat-test-'));
  }
  return undefined;
}

describe('prepareCriuKernelCache', { skip }, () => {
  const made: string[] = [];
  after(async () => {
    for (const dir of made) await rm(dir, { recursive: true, force: true });
  });

  it('on disk: made by CRIU, kept within the boot, made again when older than the boot', async () => {
    const dir = await dirOn(false);
    assert.ok(dir, 'a directory that is not a tmpfs');
    made.push(dir);
    const cache = join(dir, 'criu.kdat');
    assert.equal(await prepareCriuKernelCache(CRIU, cache), true);
    const first = await stat(cache);
    assert.ok(first.size > 0, 'CRIU wrote its cache');

    assert.equal(await prepareCriuKernelCache(CRIU, cache), true);
    assert.equal((await stat(cache)).ino, first.ino, 'a cache made in this boot is kept');

    await utimes(cache, new Date(0), new Date(0));
    assert.equal(await prepareCriuKernelCache(CRIU, cache), true);
    const again = await stat(cache);
    assert.notEqual(again.ino, first.ino, 'a cache from before the boot is made again');
    assert.equal(again.size, first.size);
  });

  it('on a tmpfs: left to CRIU', async (t) => {
    const dir = await dirOn(true);
    if (!dir) return t.skip('no tmpfs here');
    made.push(dir);
    assert.equal(await prepareCriuKernelCache(CRIU, join(dir, 'criu.kdat')), true);
    assert.equal(existsSync(join(dir, 'criu.kdat')), false);
  });
});
