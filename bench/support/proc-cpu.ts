/** CPU time a process (all its threads) has used so far, from /proc: user and system, in ms. */
import { readFile } from 'node:fs/promises';

export interface CpuTime {
  userMs: number;
  systemMs: number;
}

/** USER_HZ: the unit of /proc/PID/stat's times (100 on Linux's common builds). */
const TICK_MS = 10;

export async function processCpu(pid: number): Promise<CpuTime> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name (which may hold spaces, and ends with ')'): utime and stime are 14th and 15th.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { userMs: Number(fields[11]) * TICK_MS, systemMs: Number(fields[12]) * TICK_MS };
}
