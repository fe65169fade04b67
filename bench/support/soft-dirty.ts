/**
 * The kernel's own count of the memory a process changed: soft-dirty bits (bit 55 of each
 * /proc/PID/pagemap entry), cleared by writing 4 to /proc/PID/clear_refs. Benchmarks use it to
 * know how many bytes really changed between two checkpoints (the app's deliberate writes plus
 * whatever its runtime touched), independently of what the checkpoint store counts.
 */
import { open, readFile, writeFile } from 'node:fs/promises';

const PAGE = 4096;
const SOFT_DIRTY = 1n << 55n;

export async function clearSoftDirty(pid: number): Promise<void> {
  await writeFile(`/proc/${pid}/clear_refs`, '4');
}

/** Bytes of the process's pages written since the last clearSoftDirty. */
export async function softDirtyBytes(pid: number): Promise<number> {
  const maps = await readFile(`/proc/${pid}/maps`, 'utf8');
  const pagemap = await open(`/proc/${pid}/pagemap`, 'r');
  let dirtyPages = 0;
  try {
    for (const line of maps.split('\n')) {
      const m = /^([0-9a-f]+)-([0-9a-f]+)\s/.exec(line);
      if (!m || line.endsWith('[vsyscall]')) continue;
      const start = Number.parseInt(m[1]!, 16) / PAGE;
      const pages = Number.parseInt(m[2]!, 16) / PAGE - start;
      const buf = Buffer.alloc(pages * 8);
      const { bytesRead } = await pagemap.read(buf, 0, buf.length, start * 8);
      for (let off = 0; off + 8 <= bytesRead; off += 8) if (buf.readBigUInt64LE(off) & SOFT_DIRTY) dirtyPages++;
    }
  } finally {
    await pagemap.close();
  }
  return dirtyPages * PAGE;
}
