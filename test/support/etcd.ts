/**
 * Real etcd servers for tests: one member or a cluster of several, on loopback ports chosen free,
 * each with its own data directory under the system's temp dir. Members are started and killed by
 * PID, so a test can kill one (or pause it) and start it again on the same data.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { once } from 'node:events';
import { waitFor } from './wait.js';

export interface EtcdMember {
  name: string;
  /** host:port clients use. */
  endpoint: string;
  dataDir: string;
  pid(): number | undefined;
  /** Starts the member again on its data (after kill). */
  start(): Promise<void>;
  /** Kills the member's process and waits for it to exit. */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** SIGSTOP / SIGCONT: the process keeps its sockets but answers nothing. */
  pause(): void;
  resume(): void;
}

export interface EtcdCluster {
  members: EtcdMember[];
  /** Every member's host:port, comma-separated: what `--store etcd://` takes. */
  endpoints: string;
  /** Kills every member and removes the data directories. */
  stop(): Promise<void>;
}

export interface EtcdClusterOptions {
  members?: number;
  /**
   * etcd's shortest lease is 1.5 × its election timeout, rounded up to whole seconds: the default
   * (1000 ms) makes it 2 s; 500 ms allows 1 s leases.
   */
  electionTimeoutMs?: number;
  heartbeatMs?: number;
}

/** Members still running when the test process exits (a test that timed out) are killed with it. */
const liveChildren = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of liveChildren) child.kill('SIGKILL');
});

export async function startEtcd(options: EtcdClusterOptions = {}): Promise<EtcdCluster> {
  const count = options.members ?? 1;
  const root = await mkdtemp(join(tmpdir(), 'chipmunk-etcd-'));
  const ports = await freePorts(count * 2);
  const specs = Array.from({ length: count }, (_, i) => ({ name: `m${i}`, client: ports[2 * i], peer: ports[2 * i + 1] }));
  const initialCluster = specs.map((s) => `${s.name}=http://127.0.0.1:${s.peer}`).join(',');
  const members = specs.map((s) =>
    makeMember(s.name, s.client, join(root, s.name), [
      '--name', s.name,
      '--data-dir', join(root, s.name),
      '--listen-client-urls', `http://127.0.0.1:${s.client}`,
      '--advertise-client-urls', `http://127.0.0.1:${s.client}`,
      '--listen-peer-urls', `http://127.0.0.1:${s.peer}`,
      '--initial-advertise-peer-urls', `http://127.0.0.1:${s.peer}`,
      '--initial-cluster', initialCluster,
      '--initial-cluster-state', 'new',
      '--initial-cluster-token', `chipmunk-test-${process.pid}`,
      '--heartbeat-interval', String(options.heartbeatMs ?? 50),
      '--election-timeout', String(options.electionTimeoutMs ?? 500),
      '--logger', 'zap',
      '--log-level', 'warn',
    ]),
  );
  const stop = async () => {
    await Promise.all(members.map((m) => m.kill('SIGKILL')));
    await rm(root, { recursive: true, force: true });
  };
  try {
    await Promise.all(members.map((m) => m.start()));
  } catch (err) {
    await stop();
    throw err;
  }
  return { members, endpoints: members.map((m) => m.endpoint).join(','), stop };
}

function makeMember(name: string, clientPort: number, dataDir: string, args: string[]): EtcdMember {
  const endpoint = `127.0.0.1:${clientPort}`;
  let child: ChildProcess | undefined;
  let stderrTail = '';
  return {
    name,
    endpoint,
    dataDir,
    pid: () => child?.pid,
    async start() {
      if (child && child.exitCode === null && child.signalCode === null) throw new Error(`etcd member ${name} is already running`);
      stderrTail = '';
      const proc = spawn('etcd', args, { stdio: ['ignore', 'ignore', 'pipe'] });
      child = proc;
      const notInstalled = once(proc, 'error').then(([err]) => {
        throw new Error(`cannot start etcd (${(err as Error).message}): install it with scripts/setup.sh (Debian's etcd-server)`);
      });
      notInstalled.catch(() => {});
      liveChildren.add(proc);
      proc.on('exit', () => liveChildren.delete(proc));
      proc.stderr!.on('data', (chunk: Buffer) => (stderrTail = (stderrTail + chunk.toString()).slice(-4000)));
      const failed = once(proc, 'exit').then(([code, signal]) => {
        throw new Error(`etcd member ${name} exited (${code ?? signal}) while starting: ${stderrTail}`);
      });
      failed.catch(() => {});
      // A member alone cannot be healthy until a quorum runs, so the cluster's members start
      // together and each is judged by its own answer, not by the cluster's.
      await Promise.race([failed, notInstalled, waitFor(() => healthy(endpoint), 20_000, `etcd member ${name} on ${endpoint} to be healthy`)]);
    },
    async kill(signal: NodeJS.Signals = 'SIGKILL') {
      const proc = child;
      if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
      const exited = once(proc, 'exit');
      proc.kill('SIGCONT');
      proc.kill(signal);
      await exited;
    },
    pause: () => void child?.kill('SIGSTOP'),
    resume: () => void child?.kill('SIGCONT'),
  };
}

async function healthy(endpoint: string): Promise<boolean> {
  const res = await fetch(`http://${endpoint}/health`, { signal: AbortSignal.timeout(1000) });
  const body = (await res.json()) as { health?: string };
  return body.health === 'true';
}

/** Ports free right now on loopback (all held open together, so they are distinct). */
async function freePorts(count: number): Promise<number[]> {
  const servers = await Promise.all(
    Array.from({ length: count }, async () => {
      const server = createServer();
      server.listen(0, '127.0.0.1');
      await once(server, 'listening');
      return server;
    }),
  );
  const ports = servers.map((s) => (s.address() as { port: number }).port);
  await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))));
  return ports;
}
