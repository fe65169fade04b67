/**
 * A checkpoint's copy of a container's files, taken in two parts so that little of it falls
 * inside the freeze: a full copy while the container runs (`preCopy`), then, frozen, only what
 * changed since that copy began (`finishCopy`). The result is the tree as it was at the freeze,
 * like a copy taken wholly inside it.
 *
 * What changed is told by ctime, which userspace cannot set and which the kernel moves on every
 * change of an inode's data or metadata, and on rename and link (ext4, xfs, tmpfs alike, the
 * file systems under a writable layer). Stamps come from a coarse clock, a tick behind: "since
 * the pre-copy began" is taken with a margin. Then, for an entry whose ctime is older:
 * - it was read by the pre-copy as it is now, provided the same inode was at its path then;
 * - which holds if no directory on its path had an entry added, removed or renamed meanwhile,
 *   i.e. every directory above it has an older ctime too.
 * So a directory with a newer ctime is copied again whole (its subtree: removals, renames and
 * attributes come with it; in a running service that is rare: a new table, a WAL segment), and
 * any other newer entry alone (tar, no recursion: owners, modes, times, xattrs, devices such as
 * overlay whiteouts). Where that cannot be faithful (a hard link copied again, which would be
 * split from its names that are not; a socket, which tar skips), the whole tree is copied again
 * inside the freeze: slower, never wrong.
 *
 * Only for a directory layer (files/upper): an image layer is one file that changes at every
 * write, so its copy stays wholly inside the freeze (local-checkpoints.ts).
 */
import { join } from 'node:path';
import { RuntimeFailedError } from '../../shared/errors.js';
import { lastLines, runUnchecked } from '../../shared/exec.js';
import { removeTree } from '../../shared/remove-tree.js';

/** More than the coarse clock's lag (a jiffy: 1-10 ms): entries changed this long before the pre-copy began are copied again. */
const CTIME_MARGIN_MS = 1_000;

export interface PreCopied {
  src: string;
  dst: string;
  /** Entries whose ctime is at or after this (ms since epoch) are copied again inside the freeze. */
  changedSinceMs: number;
}

export interface FinishedCopy {
  /** Non-directory entries copied again alone. */
  files: number;
  /** Directories copied again with their subtrees ('' is the whole tree). */
  subtrees: string[];
}

/** `cp -a` of SRC to DST (which must not exist): what a checkpoint always did, inside the freeze. */
export async function copyTree(src: string, dst: string): Promise<void> {
  const res = await runUnchecked('cp', ['-a', '--reflink=auto', '--sparse=always', src, dst]);
  if (res.code !== 0) throw copyFailed('copying the container files', res.stderr);
}

/** The full copy, while the container runs: inconsistent, until finishCopy mends it. */
export async function preCopy(src: string, dst: string): Promise<PreCopied> {
  const changedSinceMs = Date.now() - CTIME_MARGIN_MS;
  await copyTree(src, dst);
  return { src, dst, changedSinceMs };
}

interface Entry {
  path: string;
  /** find's %y: f regular, d directory, l symlink, c/b devices, p fifo, s socket. */
  type: string;
  links: number;
  ctimeMs: number;
}

/** Inside the freeze: makes the pre-copy the tree as it is now. */
export async function finishCopy(pre: PreCopied): Promise<FinishedCopy> {
  // find lists a directory before its entries: a subtree's root comes before what is below it.
  const entries = await listTree(pre.src);
  const subtrees: string[] = [];
  const files: string[] = [];
  const below = (path: string) => subtrees.some((d) => d === '' || path.startsWith(`${d}/`));
  for (const e of entries) {
    const copiedAgain = below(e.path);
    // A hard link copied again (alone, or in a subtree) would be split from its other names.
    if (e.type !== 'd' && e.links > 1 && (copiedAgain || e.ctimeMs >= pre.changedSinceMs)) return copyWholeTree(pre);
    if (copiedAgain || e.ctimeMs < pre.changedSinceMs) continue;
    if (e.type === 'd') subtrees.push(e.path);
    else if (e.type === 's') return copyWholeTree(pre);
    else files.push(e.path);
  }
  for (const d of subtrees) {
    await removeTree(join(pre.dst, d));
    await copyTree(join(pre.src, d), join(pre.dst, d));
  }
  if (files.length > 0) await copyEntries(pre.src, pre.dst, files);
  return { files: files.length, subtrees };
}

async function copyWholeTree(pre: PreCopied): Promise<FinishedCopy> {
  await removeTree(pre.dst);
  await copyTree(pre.src, pre.dst);
  return { files: 0, subtrees: [''] };
}

/** Every entry below ROOT (and ROOT itself, as ''), parents before their entries. */
async function listTree(root: string): Promise<Entry[]> {
  const res = await runUnchecked('find', [root, '-printf', '%P\\0%y\\0%n\\0%C@\\0']);
  if (res.code !== 0) throw copyFailed(`listing ${root}`, res.stderr);
  const fields = res.stdout.split('\0');
  const entries: Entry[] = [];
  for (let i = 0; i + 3 < fields.length; i += 4) {
    entries.push({ path: fields[i]!, type: fields[i + 1]!, links: Number(fields[i + 2]), ctimeMs: Number(fields[i + 3]) * 1000 });
  }
  return entries;
}

/** Each of PATHS (relative to SRC; none a directory) copied over its counterpart in DST. */
async function copyEntries(src: string, dst: string, paths: string[]): Promise<void> {
  const tarOptions = '--numeric-owner --xattrs --xattrs-include=* --acls --no-recursion';
  const script = `set -o pipefail; tar -C "$1" ${tarOptions} --sparse --null -T - -cf - | tar -C "$2" ${tarOptions} -xpf -`;
  const res = await runUnchecked('bash', ['-c', script, 'copy-changed', src, dst], { input: `${paths.map((p) => `./${p}`).join('\0')}\0` });
  if (res.code !== 0) throw copyFailed('copying the changed container files', res.stderr);
}

function copyFailed(op: string, stderr: string): RuntimeFailedError {
  return new RuntimeFailedError(`checkpoint failed (${op}): ${lastLines(stderr, 3)}`, { op, stderr: lastLines(stderr, 20) });
}
