/**
 * Running a host probe: a command or a file read that never throws. A tool that is absent,
 * fails or hangs is itself a finding, reported as a check result, so one broken probe cannot
 * hide the others.
 */
import { execFile, type ExecFileException } from 'node:child_process';
import { readFile } from 'node:fs/promises';

export type HostCheckStatus = 'ok' | 'warn' | 'missing';

export interface HostCheck {
  id: string;
  title: string;
  status: HostCheckStatus;
  detail: string;
  /** What to run (or do) to turn a non-ok check into ok. */
  fix?: string;
}

const PROBE_TIMEOUT_MS = 10_000;
/** The fix for whatever the project's set-up script installs or configures. */
export const RUN_SETUP = 'npm run setup';

export interface CommandResult {
  ok: boolean;
  /** stdout then stderr, trimmed: CRIU writes verdicts to one or the other depending on the check. */
  output: string;
  /** Why the command did not succeed: not found, timed out, exit code. */
  failure?: string;
}

export function runCommand(command: string, args: string[]): Promise<CommandResult> {
  return new Promise((resolve) => {
    execFile(command, args, { timeout: PROBE_TIMEOUT_MS, encoding: 'utf8' }, (err, stdout, stderr) => {
      const output = `${stdout}\n${stderr}`.trim();
      if (!err) return resolve({ ok: true, output });
      resolve({ ok: false, output, failure: describeExecFailure(command, err) });
    });
  });
}

function describeExecFailure(command: string, err: ExecFileException): string {
  if (err.code === 'ENOENT') return `${command} not found`;
  if (err.code === 'EACCES') return `${command} is not executable`;
  if (err.killed) return `${command} timed out after ${PROBE_TIMEOUT_MS / 1000} s`;
  if (err.signal) return `${command} was killed by ${err.signal}`;
  if (typeof err.code === 'number') return `${command} exited with code ${err.code}`;
  return `${command} failed: ${err.message}`;
}

export function firstLine(text: string): string {
  return text.split('\n', 1)[0]!.trim();
}

/** File contents, or undefined when it cannot be read (the caller reports what that means). */
export async function readText(path: string): Promise<string | undefined> {
  try {
    return await readFile(path, 'utf8');
  } catch {
    return undefined;
  }
}
