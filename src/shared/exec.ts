/**
 * Running the external tools chipmunk drives (runc, CRIU, CNI plugins, ip, podman, tar).
 * Failures become RuntimeFailedError with the tool's stderr, never a raw child_process error.
 */
import { spawn, type SpawnOptions } from 'node:child_process';
import { RuntimeFailedError } from './errors.js';

export interface RunOptions {
  /** Data written to the tool's stdin. */
  input?: string | Buffer;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  timeoutMs?: number;
  /** What the caller was doing, for the error message ("runc restore", "CNI bridge ADD"). */
  op?: string;
  /** Tool log to name in the error (CRIU writes its own). */
  logPath?: string;
}

export interface RunResult {
  stdout: string;
  stderr: string;
  code: number;
}

/** Runs a command to completion; throws RuntimeFailedError on a non-zero exit or timeout. */
export async function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const res = await runUnchecked(cmd, args, opts);
  if (res.code !== 0) {
    const op = opts.op ?? `${cmd} ${args[0] ?? ''}`.trim();
    const why = lastLines(res.stderr || res.stdout, 6) || `exit code ${res.code}`;
    throw new RuntimeFailedError(`${op} failed: ${why}`, {
      op,
      command: [cmd, ...args].join(' '),
      exitCode: res.code,
      stderr: lastLines(res.stderr, 20),
      ...(opts.logPath ? { logPath: opts.logPath } : {}),
    });
  }
  return res;
}

/** Runs a command to completion and reports its exit code instead of throwing on failure. */
export function runUnchecked(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const spawnOpts: SpawnOptions = { env: opts.env ?? process.env, cwd: opts.cwd, stdio: ['pipe', 'pipe', 'pipe'] };
    const child = spawn(cmd, args, spawnOpts);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let timedOut = false;
    const timer = opts.timeoutMs
      ? setTimeout(() => {
          timedOut = true;
          child.kill('SIGKILL');
        }, opts.timeoutMs)
      : undefined;
    child.stdout!.on('data', (d: Buffer) => out.push(d));
    child.stderr!.on('data', (d: Buffer) => err.push(d));
    child.on('error', (e: NodeJS.ErrnoException) => {
      if (timer) clearTimeout(timer);
      const op = opts.op ?? cmd;
      reject(
        new RuntimeFailedError(
          e.code === 'ENOENT' ? `${op}: ${cmd} is not installed (run 'npm run setup' or 'chipmunk doctor')` : `${op}: ${e.message}`,
          { op },
          e,
        ),
      );
    });
    child.on('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      const stderr = Buffer.concat(err).toString();
      resolve({
        stdout: Buffer.concat(out).toString(),
        stderr: timedOut ? `${stderr}\ntimed out after ${opts.timeoutMs} ms` : stderr,
        code: code ?? (signal ? 128 : 1),
      });
    });
    if (opts.input !== undefined) child.stdin!.end(opts.input);
    else child.stdin!.end();
  });
}

export function lastLines(text: string, n: number): string {
  return text.trim().split('\n').slice(-n).join('\n');
}
