/**
 * ensureKerndatCache (criu.ts): CRIU's kernel-feature cache is made where CRIU reads it even
 * though CRIU itself saves it only onto a tmpfs, it is one CRIU loads, and it is made anew in
 * another boot only. Runs CRIU (npm run setup installs it) as root.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runUnchecked } from '../../src/shared/exec.js';
import { ensureKerndatCache } from '../../src/agent/runtime/criu.js';

const CRIU = '/opt/chipmunk/bin/criu';
const skip = process.getuid?.() !== 0 ? 'needs root' : !existsSync(CRIU) ? `needs CRIU at ${CRIU} (npm run setup)` : false;

describe('CRIU kernel-feature cache', { skip }, () => {
  let dir: string;
  let paths: { cache: string; boot: string };
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'chipmunk-kdat-'));
    paths = { cache: join(dir, 'criu.kdat'), boot: join(dir, 'criu-kdat.boot') };
  });
  after(() => runUnchecked('rm', ['-rf', '--one-file-system', '--', dir]));

  it('is made when missing, and CRIU loads it instead of probing the kernel', async () => {
    await ensureKerndatCache(CRIU, paths);
    assert.ok(existsSync(paths.cache), 'a cache was made');
    assert.equal((await readFile(paths.boot, 'utf8')).trim(), (await readFile('/proc/sys/kernel/random/boot_id', 'utf8')).trim());
    // Where CRIU looks for it (/run/criu.kdat), in a mount namespace of the test's own.
    const log = join(dir, 'check.log');
    const res = await runUnchecked('unshare', ['--mount', '--propagation', 'private', 'sh', '-c',
      'mount -t tmpfs tmpfs /run && cp "$1" /run/criu.kdat && "$0" check -v4 -o "$2" >/dev/null 2>&1; true', CRIU, paths.cache, log]);
    assert.equal(res.code, 0, res.stderr);
    assert.match(await readFile(log, 'utf8'), /Loaded kdat cache from \/run\/criu\.kdat/);
  });

  it('is kept within one boot, and made anew when it was made in another', async () => {
    const made = await readFile(paths.cache);
    await writeFile(paths.cache, 'kept as it is');
    await ensureKerndatCache(CRIU, paths);
    assert.equal(await readFile(paths.cache, 'utf8'), 'kept as it is', 'made in this boot: left alone');
    await writeFile(paths.boot, 'another-boot\n');
    await ensureKerndatCache(CRIU, paths);
    // A new CRIU run's cache: the same size and magic numbers (its first bytes); some fields differ from run to run.
    const anew = await readFile(paths.cache);
    assert.equal(anew.length, made.length, 'made in another boot: made anew');
    assert.deepEqual(anew.subarray(0, 8), made.subarray(0, 8));
  });
});
