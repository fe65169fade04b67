/**
 * Container stdout/stderr. The container writes into anonymous pipes read by two small `cat`
 * processes that append to the log files. Not files the container holds open, because CRIU
 * would then need the same file at the same path and size on the target; not the agent, so
 * an agent restart does not break the container's output; and real pipes, not the socket
 * pairs node's child_process makes, because CRIU cannot dump a unix socket whose peer is
 * outside the container. On restore runc maps the dumped pipes to new ones (CRIU inherit-fd).
 *
 * bash's process substitution is the simplest way to get real pipes from node: the command
 * is exec'd with stdout/stderr on pipes to the two writers, which outlive it.
 */
import { spawn, type ChildProcess } from 'node:child_process';

const SCRIPT = 'exec "$0" "$@" > >(exec cat >> "$CHIPMUNK_STDOUT_LOG") 2> >(exec cat >> "$CHIPMUNK_STDERR_LOG")';

export function spawnWithLogPipes(cmd: string, args: string[], logs: { stdout: string; stderr: string }): ChildProcess {
  return spawn('bash', ['-c', SCRIPT, cmd, ...args], {
    env: { ...process.env, CHIPMUNK_STDOUT_LOG: logs.stdout, CHIPMUNK_STDERR_LOG: logs.stderr },
    stdio: 'ignore',
    detached: true,
  });
}
