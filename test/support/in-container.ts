/**
 * Running a program inside a running test container, as `podman exec` would: in its mount, PID,
 * network, IPC and UTS namespaces, with its root. Only for tests: the runtime API has no exec.
 */
import assert from 'node:assert/strict';
import { runUnchecked } from '../../src/shared/exec.js';
import type { AgentContainer } from '../../src/shared/protocol.js';

export async function execIn(c: AgentContainer, argv: string[], timeoutMs = 20_000): Promise<{ code: number; stdout: string; stderr: string }> {
  assert.ok(c.pid, `container ${c.name} has no pid (status ${c.status})`);
  const res = await runUnchecked('nsenter', [`--target=${c.pid}`, '--mount', '--pid', '--net', '--ipc', '--uts', '--root', '--wd', '--', ...argv], { timeoutMs });
  return { code: res.code ?? 1, stdout: res.stdout, stderr: res.stderr };
}

/** Like execIn, but the program must succeed; returns its stdout, trimmed. */
export async function mustExecIn(c: AgentContainer, argv: string[]): Promise<string> {
  const res = await execIn(c, argv);
  assert.equal(res.code, 0, `${argv.join(' ')} in ${c.name} exited ${res.code}: ${res.stderr}`);
  return res.stdout.trim();
}
