/**
 * A container's root file system: an overlay of the image (read-only lower) and the container's
 * own writable layer, which holds every file it changed and is what travels on migration.
 *
 * The writable layer is an ext4 file system in one sparse file (files/layer.img), loop-mounted
 * at containers/NAME/layer, with the overlay's upper and work directories inside it. It moves
 * as that one file, block for block, so every file in it keeps its inode number: SQLite (in its
 * rollback-journal modes) remembers its database's inode and refuses every write once the path
 * names another (SQLITE_READONLY_DBMOVED), which a layer copied file by file caused at every
 * move. The image's size is also the container's disk quota, and as one file it deduplicates
 * well in the checkpoint store. No journal: a layer is only ever used again from a copy taken
 * after a sync (a checkpoint or a migration), never after a crash of the node that wrote it.
 *
 * The image layer is opt-in (RuncRuntimeOptions.writableLayer, `chipmunk agent
 * --writable-layer image`): the checkpoint store's file views (files, diff) read a directory
 * layer's files one by one, and see an image layer as one file. A directory layer is
 * files/upper, copied file by file, with new inode numbers at every move. A tree that arrives
 * keeps its kind whatever the node's setting: the setting picks the kind of new layers only.
 */
import { existsSync } from 'node:fs';
import { mkdir, readFile, realpath, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { leverOff } from '../../shared/downtime-levers.js';
import { run, runUnchecked } from '../../shared/exec.js';

/** Size of a new writable layer: the container's disk quota. Sparse: only what is written takes space. */
export const LAYER_BYTES = 10 * 1024 ** 3;

/** What a new container's writable layer is made of (rootfs.ts, top). */
export type WritableLayerKind = 'directory' | 'image';

export interface RootfsPaths {
  lower: string;
  /** The kind of layer to make when files/ has none yet. */
  newLayer: WritableLayerKind;
  /** The container's files/ directory: it holds layer.img (or, in old trees, upper/). */
  files: string;
  /** Where the layer image is mounted: outside files/, which travels. */
  layerMount: string;
  /** Overlay work dir of a directory layer (same file system as files/, outside it). */
  directoryWork: string;
  mountpoint: string;
}

export function layerImagePath(files: string): string {
  return join(files, 'layer.img');
}

export async function mountRootfs(p: RootfsPaths): Promise<void> {
  await mkdir(p.mountpoint, { recursive: true });
  if (await isMountpoint(p.mountpoint)) return;
  const image = layerImagePath(p.files);
  const directoryUpper = join(p.files, 'upper');
  let upper: string;
  let work: string;
  if (!existsSync(image) && (existsSync(directoryUpper) || p.newLayer === 'directory')) {
    upper = directoryUpper;
    work = p.directoryWork;
  } else {
    if (!existsSync(image)) await createLayerImage(image);
    await mkdir(p.layerMount, { recursive: true });
    if (!(await isMountpoint(p.layerMount))) {
      // -o loop attaches a loop device that detaches itself when the file system is unmounted.
      await run('mount', ['-t', 'ext4', '-o', 'loop,noatime', image, p.layerMount], { op: 'mount container layer image' });
    }
    upper = join(p.layerMount, 'upper');
    work = join(p.layerMount, 'work');
  }
  await Promise.all([upper, work].map((d) => mkdir(d, { recursive: true })));
  await run('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${p.lower},upperdir=${upper},workdir=${work}`, p.mountpoint], {
    op: 'mount container overlay',
  });
}

async function createLayerImage(image: string): Promise<void> {
  await mkdir(join(image, '..'), { recursive: true });
  try {
    await run('truncate', ['-s', String(LAYER_BYTES), image], { op: 'create container layer image' });
    // lazy_itable_init and nodiscard: a new layer costs ~4 MB and a few ms, not a write of the whole image.
    await run('mkfs.ext4', ['-q', '-F', '-O', '^has_journal', '-m', '0', '-E', 'lazy_itable_init=1,nodiscard', '-L', 'chipmunk-layer', image], {
      op: 'make container layer file system (mkfs.ext4, Debian package e2fsprogs)',
    });
  } catch (err) {
    await rm(image, { force: true });
    throw err;
  }
}

/**
 * Writes the layer's cached changes into its image file, so that a copy of the file taken now
 * (a checkpoint's, a migration's) holds them. The container must not write meanwhile: paused
 * or dumped. Nothing to do for a directory layer.
 */
export async function syncLayer(layerMount: string): Promise<void> {
  if (await isMountpoint(layerMount)) await run('sync', ['-f', layerMount], { op: 'sync container layer' });
}

/**
 * Whether a file system is mounted at `path`, from this process's mount table (no process to
 * start: it is asked inside a move's frozen window, where every spawn counts).
 */
export async function isMountpoint(path: string): Promise<boolean> {
  if (leverOff('in-process-checks')) return (await runUnchecked('mountpoint', ['-q', path])).code === 0;
  const real = await realpath(path).catch(() => undefined);
  if (!real) return false;
  const table = await readFile('/proc/self/mountinfo', 'utf8');
  // Field 5 is the mount point, with space, tab, newline and backslash escaped as octal.
  return table.split('\n').some((line) => line.split(' ')[4]?.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))) === real);
}

/**
 * Unmounts everything at or below `dir`, deepest first. CRIU and runc can leave mounts in work
 * directories (a cgroup "yard", a bind of the container root); deleting through one would
 * delete what it shows, so every removal of our directories goes through here first. A layer
 * still held by the overlay above it (same depth, shorter path: unmounted after it) or by a
 * container's own mount namespace is detached lazily; its loop device goes with its last user.
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
