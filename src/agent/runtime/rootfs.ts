/**
 * A container's root file system: an overlay of the image (read-only lower) and the container's
 * own upper layer, which holds every file it changed and is what travels on migration.
 */
import { mkdir } from 'node:fs/promises';
import { run, runUnchecked } from '../../shared/exec.js';

export interface RootfsPaths {
  lower: string;
  upper: string;
  work: string;
  mountpoint: string;
}

export async function mountRootfs(p: RootfsPaths): Promise<void> {
  await Promise.all([p.upper, p.work, p.mountpoint].map((d) => mkdir(d, { recursive: true })));
  if (await isMountpoint(p.mountpoint)) return;
  await run('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${p.lower},upperdir=${p.upper},workdir=${p.work}`, p.mountpoint], {
    op: 'mount container overlay',
  });
}

export async function isMountpoint(path: string): Promise<boolean> {
  return (await runUnchecked('mountpoint', ['-q', path])).code === 0;
}

/**
 * Unmounts everything at or below `dir`, deepest first. CRIU and runc can leave mounts in work
 * directories (a cgroup "yard", a bind of the container root); deleting through one would
 * delete what it shows, so every removal of our directories goes through here first.
 */
export async function unmountBelow(dir: string): Promise<void> {
  const res = await runUnchecked('findmnt', ['-rn', '-o', 'TARGET']);
  const targets = res.stdout
    .split('\n')
    .map((l) => l.replace(/\\x20/g, ' '))
    .filter((t) => t === dir || t.startsWith(dir.endsWith('/') ? dir : `${dir}/`))
    .sort((a, b) => b.length - a.length);
  for (const t of targets) {
    const r = await runUnchecked('umount', [t]);
    if (r.code !== 0) await runUnchecked('umount', ['-l', t]);
  }
}
