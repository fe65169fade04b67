/**
 * The host's side of CRIU's start: its kernel cache, made when the agent starts (CRIU's runs
 * around containers are runtime/criu.ts).
 */
import { copyFile, mkdtemp, readFile, rename, rm, stat, statfs } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { runUnchecked } from '../../shared/exec.js';

/** Where CRIU (run as root) keeps what it learnt of the kernel (criu/kerndat.c). */
export const CRIU_KERNEL_CACHE = '/run/criu.kdat';
const TMPFS_MAGIC = 0x01021994;

/**
 * CRIU probes the kernel at every start (pagemap, both vDSOs, `iptables -L`: 100-300 ms measured
 * here) unless it finds its cache, CRIU_KERNEL_CACHE, which it writes only when /run is a tmpfs
 * (so that a reboot into another kernel drops it). Where /run is on disk (these machines) it never
 * does, and every CRIU process of a move's frozen window probes again: runc's feature check before
 * a dump, the lazy-pages daemon, the restore. So the agent makes the cache at start: CRIU run once
 * with a tmpfs of its own on /run (a private mount namespace), its cache copied into place. One
 * made before this boot is made again. Returns whether a cache is in place (false: CRIU probes).
 */
export async function prepareCriuKernelCache(criuPath: string, cachePath = CRIU_KERNEL_CACHE): Promise<boolean> {
  const dir = dirname(cachePath);
  if ((await statfs(dir).catch(() => undefined))?.type === TMPFS_MAGIC) return true;
  const made = await stat(cachePath).catch(() => undefined);
  if (made && made.mtimeMs > (await bootTimeMs())) return true;
  const scratch = await mkdtemp(join(tmpdir(), 'chipmunk-kdat-'));
  try {
    const run = await runUnchecked('unshare', ['--mount', '--propagation', 'private', 'sh', '-c',
      'mount -t tmpfs chipmunk-kdat /run && "$1" check >/dev/null 2>&1; cp /run/criu.kdat "$2"', 'sh', criuPath, join(scratch, 'kdat')]);
    if (run.code !== 0) return false;
    // Atomic: a CRIU starting meanwhile reads the old cache or the new one, never half of one.
    const staged = `${cachePath}.chipmunk-${process.pid}`;
    await copyFile(join(scratch, 'kdat'), staged);
    await rename(staged, cachePath);
    return true;
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
}

async function bootTimeMs(): Promise<number> {
  const btime = /^btime (\d+)$/m.exec(await readFile('/proc/stat', 'utf8'))?.[1];
  return Number(btime) * 1000;
}
