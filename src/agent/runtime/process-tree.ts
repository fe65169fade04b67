/**
 * Processes by their parent links in /proc: a process and everything it started, which a kill
 * must reach as a whole (criu.ts: runc and the CRIU below it).
 */
import { readdir, readFile } from 'node:fs/promises';

/**
 * SIGKILLs `pid` and every process below it. `runc checkpoint` runs CRIU as its child (`criu
 * swrk`), which in lazy mode serves the pages and holds the page server's port: killed alone,
 * runc would leave it serving (and the port taken) for good.
 */
export async function killProcessTree(pid: number): Promise<void> {
  const children = new Map<number, number[]>();
  for (const entry of await readdir('/proc').catch(() => [] as string[])) {
    const child = Number(entry);
    if (!Number.isInteger(child)) continue;
    const ppid = await parentPid(child);
    if (ppid !== undefined) children.set(ppid, [...(children.get(ppid) ?? []), child]);
  }
  const tree: number[] = [];
  for (const queue = [pid]; queue.length > 0; ) {
    const next = queue.shift()!;
    tree.push(next);
    queue.push(...(children.get(next) ?? []));
  }
  for (const member of tree) {
    try {
      process.kill(member, 'SIGKILL');
    } catch {
      // It ended meanwhile.
    }
  }
}

/** From /proc/PID/stat: "pid (comm) state ppid ...", where comm may hold spaces and parentheses. */
export async function parentPid(pid: number): Promise<number | undefined> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  const ppid = Number(stat.slice(stat.lastIndexOf(')') + 1).trim().split(' ')[1]);
  return Number.isInteger(ppid) ? ppid : undefined;
}

