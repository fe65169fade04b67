/**
 * How many bytes of a process's memory changed between two moments, measured from outside and
 * independently of the checkpoint store: every readable mapping is read through /proc/PID/mem
 * and each 4 KiB page hashed by its address; a page counts as changed when its address is new or
 * its content differs. (This machine's kernel has no soft-dirty tracking, CONFIG_MEM_SOFT_DIRTY,
 * which would say the same from the kernel's side.)
 */
import { createHash } from 'node:crypto';
import { open, readFile } from 'node:fs/promises';

const PAGE = 4096;
const READ_BLOCK = 1024 * 1024;

/** Page address -> short content hash. */
export type PageHashes = Map<number, string>;

export async function pageHashes(pid: number): Promise<PageHashes> {
  const maps = await readFile(`/proc/${pid}/maps`, 'utf8');
  const mem = await open(`/proc/${pid}/mem`, 'r');
  const hashes: PageHashes = new Map();
  const buf = Buffer.alloc(READ_BLOCK);
  try {
    for (const line of maps.split('\n')) {
      const m = /^([0-9a-f]+)-([0-9a-f]+)\s+r/.exec(line);
      if (!m || /\[(vvar|vsyscall|vvar_vclock)\]$/.test(line)) continue;
      const start = Number.parseInt(m[1]!, 16);
      const end = Number.parseInt(m[2]!, 16);
      for (let at = start; at < end; at += READ_BLOCK) {
        const want = Math.min(READ_BLOCK, end - at);
        const { bytesRead } = await mem.read(buf, 0, want, at).catch(() => ({ bytesRead: 0 }));
        for (let off = 0; off + PAGE <= bytesRead; off += PAGE) {
          hashes.set(at + off, createHash('sha1').update(buf.subarray(off, off + PAGE)).digest('base64'));
        }
      }
    }
  } finally {
    await mem.close();
  }
  return hashes;
}

/** Bytes of the pages of `after` that are new or differ from `before`. */
export function changedBytes(before: PageHashes, after: PageHashes): number {
  let pages = 0;
  for (const [address, hash] of after) if (before.get(address) !== hash) pages++;
  return pages * PAGE;
}
