/**
 * prepareCriuKernelCache: where the cache's directory is not a tmpfs, CRIU never writes its kernel
 * cache, so the agent makes it with CRIU itself (a private tmpfs on /run) and puts it in place;
 * one made in this boot is kept, one older than the boot is made again; on a tmpfs CRIU keeps it
 * and the agent writes nothing. Runs the real CRIU: needs root and `npm run setup`.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, stat, statfs, utimes } from 'node:fs/promises';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { prepareCriuKernelCache } from '../../src/agent/host/criu-kernel-cache.js';
import { runUnchecked } from '../../src/shared/exec.js';

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
    // CRIU loads it where it looks for it (/run/criu.kdat; in a mount namespace of the test's own) instead of probing.
    const log = join(dir, 'check.log');
    const check = await runUnchecked('unshare', ['--mount', '--propagation', 'private', 'sh', '-c',
      'mount -t tmpfs tmpfs /run && cp "$1" /run/criu.kdat && "$0" check -v4 -o "$2" >/dev/null 2>&1; true', CRIU, cache, log]);
    assert.equal(check.code, 0, check.stderr);
    assert.match(await readFile(log, 'utf8'), /Loaded kdat cache from \/run\/criu\.kdat/);

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
