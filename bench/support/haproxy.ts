/** HAProxy (Debian's package, installed by scripts/setup.sh) as a plain HTTP reverse proxy, for comparisons. */
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

export interface HaproxyBackend {
  /** Where HAProxy listens (127.0.0.1). */
  listenPort: number;
  server: { address: string; port: number };
}

/**
 * Starts HAProxy (in the foreground: `pid` is HAProxy's) with one frontend per backend, config
 * in `dir`. `threads`: its worker threads (default: HAProxy's own, one per CPU).
 */
export async function startHaproxy(dir: string, backends: HaproxyBackend[], threads?: number): Promise<{ pid: number; stop(): Promise<void> }> {
  const cfg = join(dir, `haproxy-${backends[0].listenPort}.cfg`);
  const lines = [
    'global',
    '  maxconn 4096',
    ...(threads ? [`  nbthread ${threads}`] : []),
    'defaults',
    '  mode http',
    '  option http-keep-alive',
    '  timeout connect 5s',
    '  timeout client 60s',
    '  timeout server 60s',
  ];
  for (const [i, b] of backends.entries()) {
    lines.push(`frontend f${i}`, `  bind 127.0.0.1:${b.listenPort}`, `  default_backend b${i}`, `backend b${i}`, `  server s${i} ${b.server.address}:${b.server.port}`);
  }
  await writeFile(cfg, `${lines.join('\n')}\n`);
  const child = spawn('haproxy', ['-db', '-f', cfg], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const failed = await Promise.race([
    once(child, 'error').then(([err]) => `haproxy could not start (${(err as Error).message}): install Debian's haproxy package (scripts/setup.sh does)`),
    once(child, 'exit').then(() => `haproxy exited at start (config ${cfg}): ${stderr.trim()}`),
    sleep(500).then(() => undefined),
  ]);
  if (failed) throw new Error(failed);
  return {
    pid: child.pid as number,
    stop: async () => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGTERM');
      await once(child, 'exit');
    },
  };
}
