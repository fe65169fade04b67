/**
 * Running a program inside a running test container, as `podman exec` would: in its mount, PID,
 * network, IPC and UTS namespaces, with its root. Only for tests: the runtime API has no exec.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import type { AgentContainer } from '../../src/shared/protocol.js';

export interface ExecResult {
  code: number | null;
  /** The signal that ended the program (nsenter dies of its child's signal). */
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export function execIn(c: AgentContainer, argv: string[], timeoutMs = 20_000): Promise<ExecResult> {
  assert.ok(c.pid, `container ${c.name} has no pid (status ${c.status})`);
  return new Promise((resolve, reject) => {
    const child = spawn('nsenter', [`--target=${c.pid}`, '--mount', '--pid', '--net', '--ipc', '--uts', '--root', '--wd', '--', ...argv], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/** Like execIn, but the program must succeed; returns its stdout, trimmed. */
export async function mustExecIn(c: AgentContainer, argv: string[]): Promise<string> {
  const res = await execIn(c, argv);
  assert.equal(res.code, 0, `${argv.join(' ')} in ${c.name} exited ${res.code ?? `on ${res.signal}`}: ${res.stderr}`);
  return res.stdout.trim();
}
