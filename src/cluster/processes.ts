/**
 * The local cluster's daemons as processes: start them detached, recognise them by PID and
 * command line (a PID may be reused), stop them.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { open, readFile } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';

import { UnavailableError } from '../shared/errors.js';

export const REPO_ROOT = fileURLToPath(new URL('../../', import.meta.url));
const DAEMON_STOP_GRACE_MS = 5_000;

/**
 * Whether PID runs. A zombie does not: our daemons are reparented to PID 1 once the CLI that
 * started them exits, and PID 1 may take its time to reap them.
 */
export async function isRunning(pid: number): Promise<boolean> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    // "PID (COMM) STATE ...": COMM may itself contain ") ", so take the last one.
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    return false;
  }
}

/**
 * Whether PID still is a chipmunk daemon as we started it (its command line names the launcher,
 * from this checkout or another, and these arguments), so that a PID reused since cannot be
 * killed by mistake.
 */
export async function isOurDaemon(pid: number, args: string[]): Promise<boolean> {
  try {
    const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0');
    return argv.some((arg) => arg.endsWith('/bin/chipmunk.mjs')) && args.every((arg) => argv.includes(arg));
  } catch {
    return false;
  }
}

/** SIGTERM, so the daemon closes its listeners and store; SIGKILL if it does not exit in time. */
export async function stopDaemon(pid: number, args: string[]): Promise<void> {
  if (!(await isOurDaemon(pid, args))) return;
  process.kill(pid, 'SIGTERM');
  const deadline = Date.now() + DAEMON_STOP_GRACE_MS;
  while ((await isRunning(pid)) && Date.now() < deadline) await sleep(100);
  if (await isRunning(pid)) process.kill(pid, 'SIGKILL');
}

/**
 * Starts a detached process with stdout and stderr appended to LOG; it outlives this one.
 * ENV is added to this process's environment.
 */
export async function spawnDaemon(cmd: string, args: string[], log: string, env: Record<string, string> = {}): Promise<ChildProcess> {
  const logHandle = await open(log, 'a');
  try {
    const child = spawn(cmd, args, { cwd: REPO_ROOT, detached: true, stdio: ['ignore', logHandle.fd, logHandle.fd], env: { ...process.env, ...env } });
    await new Promise<void>((resolve, reject) => {
      child.once('spawn', resolve);
      child.once('error', reject);
    });
    child.unref();
    return child;
  } finally {
    await logHandle.close();
  }
}

/** Rejects as soon as CHILD exits: a daemon that dies during start-up will never become ready. */
export function failOnExit(child: ChildProcess, what: string, log: string): Promise<never> {
  const exited = new Promise<never>((_, reject) => {
    child.once('exit', (code, signal) => {
      reject(new UnavailableError(`${what} exited during start-up (${signal ?? `exit code ${code}`}): read ${log}`, { logPath: log }));
    });
  });
  // Only the wait for readiness looks at it; an exit before or after that must not crash the CLI.
  exited.catch(() => {});
  return exited;
}
