// Runs the `chipmunk` CLI as a subprocess, the way an operator or script does.
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const BIN = fileURLToPath(new URL('../../bin/chipmunk.mjs', import.meta.url));

/**
 * A local-cluster folder that does not exist, so a local cluster that happens to be up cannot
 * answer (and nothing is left behind in the temp dir).
 */
const NO_LOCAL_CLUSTER = join(tmpdir(), `chipmunk-cli-test-${randomUUID()}`);

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

export function runCli(args: string[], env: Record<string, string> = {}): Promise<CliResult> {
  const { CHIPMUNK_CONTROLLER: _controller, CHIPMUNK_TOKEN: _token, ...inherited } = process.env;
  const child = spawn(process.execPath, [BIN, ...args], {
    env: { ...inherited, CHIPMUNK_CLUSTER_DIR: NO_LOCAL_CLUSTER, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  return new Promise((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}
