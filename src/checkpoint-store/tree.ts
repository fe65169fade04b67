/**
 * A checkpoint's files as the container saw them, from the `files` part's manifest: `upper/`
 * (the overlay upper layer: the container's own changes to its image) is `/`, and each
 * `volumes/NAME/` is placed at its mount path, hiding what the upper layer has there.
 *
 * Only what the container changed is there: files it never touched live in the image's lower
 * layers, which the store does not hold. Overlay whiteouts (char devices 0/0) mark files the
 * container deleted: they are not listed, and count as removed in a diff.
 *
 * Paths resolve like openat2(RESOLVE_IN_ROOT), except that escaping is refused rather than
 * clamped: absolute symlink targets start at the container's root, and a `..` that would go
 * above it, or a chain of more than MAX_SYMLINK_HOPS symlinks (a loop), throws PathEscapesError.
 */
import { createHash } from 'node:crypto';
import { PathEscapesError } from '../shared/errors.js';
import type { PartManifest } from './manifest.js';
import type { CheckpointDiff, FileEntry } from './protocol.js';
import type { TarEntry } from './tar.js';

/** As Linux's path resolution (MAXSYMLINKS). */
const MAX_SYMLINK_HOPS = 40;

export interface VolumeMount {
  name: string;
  /** Absolute path in the container. */
  path: string;
}

export interface TreeNode {
  entry: TarEntry;
  hashes: Buffer;
}

export class ContainerTree {
  /** By container path: '/' and '/etc/hosts'. */
  private readonly nodes = new Map<string, TreeNode>();
  private readonly children = new Map<string, Set<string>>();
  /** By path in the archive: hard links name their target that way. */
  private readonly byArchivePath = new Map<string, TreeNode>();
  /** Paths the container deleted from its image (overlay whiteouts). */
  readonly whiteouts = new Set<string>();

  constructor(manifest: PartManifest, volumes: VolumeMount[]) {
    const mounts = volumes.map((v) => ({ name: v.name, path: joinPath(splitPath(v.path)) }));
    for (const node of manifest.entries) this.byArchivePath.set(node.entry.path, node);
    this.addDirectory('/', syntheticDirectory());
    for (const node of manifest.entries) {
      const [top, ...rest] = node.entry.path.split('/');
      if (top === 'upper') this.add(joinPath(rest), node);
    }
    for (const mount of mounts) {
      this.removeBelow(mount.path);
      this.addDirectory(mount.path, syntheticDirectory());
      for (const node of manifest.entries) {
        const [top, name, ...rest] = node.entry.path.split('/');
        if (top === 'volumes' && name === mount.name) this.add(joinPath([...splitPath(mount.path), ...rest]), node);
      }
    }
  }

  get(path: string): TreeNode | undefined {
    return this.nodes.get(path);
  }

  /**
   * The canonical path `userPath` names, symlinks (the last one too) resolved inside the
   * container. The path need not exist.
   */
  resolve(userPath: string): string {
    const resolved: string[] = [];
    const pending = splitPath(userPath);
    let hops = 0;
    while (pending.length > 0) {
      const name = pending.shift()!;
      if (name === '..') {
        if (resolved.length === 0) throw new PathEscapesError(`${userPath} goes above the container's root (/): name a path inside the container`, { path: userPath });
        resolved.pop();
        continue;
      }
      const node = this.nodes.get(joinPath([...resolved, name]));
      if (node?.entry.type !== 'symlink') {
        resolved.push(name);
        continue;
      }
      if (++hops > MAX_SYMLINK_HOPS) {
        throw new PathEscapesError(`${userPath} meets more than ${MAX_SYMLINK_HOPS} symlinks (a loop?): it resolves to nothing in the container`, { path: userPath });
      }
      const target = node.entry.linkTarget ?? '';
      if (target.startsWith('/')) resolved.length = 0;
      pending.unshift(...splitPath(target));
    }
    return joinPath(resolved);
  }

  /** A directory's entries by name; whiteouts are gone, hard links show as the file they are. */
  list(dir: string): FileEntry[] {
    return [...(this.children.get(dir) ?? [])].sort().map((name) => {
      const node = this.nodes.get(joinPath([...splitPath(dir), name]))!;
      const entry = this.contentOf(node)?.entry ?? node.entry;
      return {
        name,
        type: entry.type === 'hardlink' ? 'file' : entry.type,
        size: entry.realSize,
        mode: entry.mode,
        mtime: entry.mtime,
        ...(entry.type === 'symlink' ? { linkTarget: entry.linkTarget } : {}),
      };
    });
  }

  /** The regular file holding a node's content (itself, or a hard link's target); undefined for other types. */
  contentOf(node: TreeNode): TreeNode | undefined {
    if (node.entry.type === 'file') return node;
    if (node.entry.type !== 'hardlink') return undefined;
    const target = this.byArchivePath.get(node.entry.linkTarget ?? '');
    return target?.entry.type === 'file' ? target : undefined;
  }

  /** Every path with what a diff compares: type, mode, owner, content hash or link target. */
  signatures(): Map<string, string> {
    const signatures = new Map<string, string>();
    for (const [path, node] of this.nodes) {
      const file = this.contentOf(node);
      const { type, mode, uid, gid } = (file ?? node).entry;
      let what = '';
      if (file) what = `${file.entry.realSize}:${createHash('sha256').update(file.hashes).digest('hex')}`;
      else if (type === 'symlink') what = node.entry.linkTarget ?? '';
      else if (type === 'char' || type === 'block') what = `${node.entry.devMajor}:${node.entry.devMinor}`;
      signatures.set(path, `${type}:${mode}:${uid}:${gid}:${what}`);
    }
    return signatures;
  }

  private add(path: string, node: TreeNode): void {
    const { entry } = node;
    if (entry.type === 'char' && entry.devMajor === 0 && entry.devMinor === 0) {
      this.whiteouts.add(path);
      return;
    }
    if (entry.type === 'dir') this.addDirectory(path, node);
    else {
      this.ensureParent(path);
      this.nodes.set(path, node);
    }
  }

  private addDirectory(path: string, node: TreeNode): void {
    this.ensureParent(path);
    this.nodes.set(path, node);
    if (!this.children.has(path)) this.children.set(path, new Set());
  }

  /** Links `path` into its parent, creating parents the archive did not list (mount points). */
  private ensureParent(path: string): void {
    if (path === '/') return;
    const parts = splitPath(path);
    const parent = joinPath(parts.slice(0, -1));
    if (!this.children.has(parent)) this.addDirectory(parent, syntheticDirectory());
    this.children.get(parent)!.add(parts[parts.length - 1]);
  }

  /** A volume hides what the upper layer has at and below its mount path. */
  private removeBelow(path: string): void {
    for (const key of [...this.nodes.keys()]) {
      if (key === path || key.startsWith(`${path}/`)) {
        this.nodes.delete(key);
        this.children.delete(key);
      }
    }
    for (const key of [...this.whiteouts]) if (key === path || key.startsWith(`${path}/`)) this.whiteouts.delete(key);
  }
}

/** What changed from one checkpoint's tree to another's, paths sorted. */
export function diffTrees(from: ContainerTree, to: ContainerTree): CheckpointDiff {
  const before = from.signatures();
  const after = to.signatures();
  const added: string[] = [];
  const changed: string[] = [];
  const removed = new Set<string>();
  for (const [path, signature] of after) {
    const old = before.get(path);
    if (old === undefined) added.push(path);
    else if (old !== signature) changed.push(path);
  }
  for (const path of before.keys()) if (!after.has(path)) removed.add(path);
  // A new whiteout deleted a file of the image, which neither upper layer held.
  for (const path of to.whiteouts) if (!from.whiteouts.has(path)) removed.add(path);
  return { added: added.sort(), changed: changed.sort(), removed: [...removed].sort() };
}

/** `/a//b/./c/` -> ['a', 'b', 'c']; `..` is kept for resolve() to judge. */
function splitPath(path: string): string[] {
  return path.split('/').filter((part) => part !== '' && part !== '.');
}

function joinPath(parts: string[]): string {
  return `/${parts.join('/')}`;
}

function syntheticDirectory(): TreeNode {
  return {
    entry: { header: Buffer.alloc(0), path: '', type: 'dir', size: 0, realSize: 0, mode: 0o755, mtime: 0, uid: 0, gid: 0, devMajor: 0, devMinor: 0, xattrs: {}, sparse: false },
    hashes: Buffer.alloc(0),
  };
}
