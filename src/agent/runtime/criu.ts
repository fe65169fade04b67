/**
 * Everything chipmunk asks of CRIU, in one place (as runc keeps it in libcontainer/criu_linux.go):
 * the `runc checkpoint` / `runc restore` arguments that drive it (lazy pages, page server,
 * status fd, established TCP), the options file runc hands it, the lazy-pages daemon, the
 * network lock it can leave behind, reading its logs, and its failures as RuntimeFailedErrors
 * whose `logPath` names the log that explains them (failed-logs.ts keeps that log).
 *
 * Every dump and restore passes `--file-locks`: without it CRIU refuses any container holding
 * a POSIX or flock lock ("Some file locks are hold by dumping tasks!"), which is every SQLite
 * database in WAL mode and most databases. CRIU then dumps the locks and takes them again on
 * restore; runc passes the flag on to CRIU for checkpoint and restore alike.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { CapabilityMissingError, RuntimeFailedError } from '../../shared/errors.js';
import { lastLines, runUnchecked } from '../../shared/exec.js';
import type { MigrationMode } from '../../shared/protocol.js';
import type { StepClock } from '../../shared/steps.js';
import { within } from '../../shared/time.js';
import { criuLogSteps } from './criu-steps.js';
import { CRIU_RUNS_BEFORE_DUMP, freezeFirstWrapper, frozenFirstAt, type FreezeFirst } from './freeze-first.js';
import { openStatusFifo, type StatusFifo } from './status-fifo.js';
import { killProcessTree, parentPid } from './process-tree.js';
import { inHostNetns } from './network.js';
import type { Runc } from './runc.js';


export interface PageServer {
  address: string;
  port: number;
}

/** A `runc checkpoint` of a migration's source, running. */
export interface DumpProcess {
  process: ChildProcess;
  /** runc's exit; in lazy mode only after the page server sent the last page. */
  done: Promise<{ code: number; stderr: string }>;
}

/** CRIU's own logs, in the work dir of each run. */
export const CRIU_LOG = { dump: 'dump.log', restore: 'restore.log', lazyPages: 'lazy-pages.log' } as const;

const LAZY_SOCKET_WAIT_MS = 15_000;
/** How long the last lazy pages may take to be served (source) or pulled (target). */
export const PAGE_DRAIN_TIMEOUT_MS = 10 * 60_000;
const PAGE_SIZE = 4096;
/** runc's flag for CRIU's --file-locks (see the top of this file); the same on dump and restore. */
const FILE_LOCKS = '--file-locks';

/**
 * The CRIU options runc passes on (org.criu.config, the bundle's `criu.conf`). runc reads the
 * file named in the running container's config for a dump and in the bundle's for a restore:
 * one path, whose content is switched to the restore options around a restore.
 * - skip-in-flight (dump): a connection still in the listen backlog would fail the dump; its
 *   client retries.
 * - tcp-close: established connections are dumped closed and come back closed, unless
 *   `keepConnections` (a migration of a container with a cluster address, which it keeps on the
 *   target): then CRIU dumps them with their state (tcp-established) and restores them, and
 *   their peers see a retransmission. A checkpoint (failover) never keeps them: their state
 *   died with the host, and a peer's next packet to the address meets the restored copy's
 *   kernel, which has no such connection and resets it.
 * - network-lock skip (restore): the namespace is new. With kept connections no packet for the
 *   cluster address reaches it before the restore returns (the node routes the address to it
 *   only then, network.ts); without, locked, it would silently drop the first clients' SYNs and
 *   cost them a one-second retransmission; unlocked, they are refused until the listener is
 *   back and retry at once.
 */
export async function writeCriuOptions(containerDir: string, purpose: 'dump' | 'restore', keepConnections = false): Promise<void> {
  const tcp = keepConnections ? 'tcp-established' : 'tcp-close';
  const options = purpose === 'dump' ? ['skip-in-flight', tcp] : ['skip-in-flight', tcp, 'network-lock skip'];
  await writeFile(criuOptionsPath(containerDir), `${options.join('\n')}\n`);
}

/**
 * Written into a migration's images when its dump kept the established connections: the
 * restore must then keep them too (CRIU refuses to restore a dump's connections in the other
 * mode). Travels with the images; CRIU ignores files it does not know.
 */
const KEPT_CONNECTIONS_MARKER = 'chipmunk-kept-connections';

export async function markKeptConnections(images: string): Promise<void> {
  await writeFile(join(images, KEPT_CONNECTIONS_MARKER), '');
}

export function keptConnections(images: string): boolean {
  return existsSync(join(images, KEPT_CONNECTIONS_MARKER));
}

export function criuOptionsPath(containerDir: string): string {
  return join(containerDir, 'criu.conf');
}

/**
 * CRIU's own account of a failure: its `Error (file:line): ...` lines, the last few, from a
 * log. Empty when the log is absent or has none (the failure came from elsewhere).
 */
export async function criuFailureSummary(logPath: string): Promise<string> {
  const log = await readFile(logPath, 'utf8').catch(() => '');
  const errors = log
    .split('\n')
    .filter((l) => /\bError \(/.test(l))
    // Every CRIU run here says this (no CAP_SYS_RESOURCE): it explains nothing.
    .filter((l) => !/RLIMIT_NOFILE/.test(l))
    .map((l) => l.replace(/^\(\s*[\d.]+\)\s*/, '').trim());
  return errors.slice(-2).join('; ');
}

/**
 * CRIU reads every task's resource limits (prlimit), which for a task of another user needs
 * CAP_SYS_RESOURCE in the task's user namespace. Root of a host that withholds it (a VM, a
 * privileged pod, these test machines) has it only in user namespaces it owns: a container
 * without one of its own (agent --userns off) cannot be dumped once it runs a non-root process.
 */
const RLIMIT_DENIED = /Can't get rlimit \d+: Operation not permitted/;

/** A dump that failed: runc's last words, CRIU's own, and the log that has the rest. */
async function dumpFailedError(what: string, res: { code: number; stderr: string }, logPath: string): Promise<Error> {
  const log = await readFile(logPath, 'utf8').catch(() => '');
  const denied = RLIMIT_DENIED.exec(log);
  if (denied) {
    return new CapabilityMissingError(
      `${what} failed: it runs a process as a non-root user, and CRIU may not read that process's resource limits without CAP_SYS_RESOURCE, which this node withholds (CRIU: ${denied[0]}). ` +
        'Run the container in a user namespace of its own (start the agent without --userns off, then run the container again), or give the agent CAP_SYS_RESOURCE',
      { op: 'runc checkpoint', capability: 'CAP_SYS_RESOURCE' },
    );
  }
  const criuSays = await criuFailureSummary(logPath);
  const why = [lastLines(res.stderr, 3) || `runc exited ${res.code}`, criuSays ? `CRIU: ${criuSays}` : ''].filter(Boolean).join('; ');
  return new RuntimeFailedError(`${what} failed: ${why}`, { op: 'runc checkpoint', logPath, stderr: lastLines(res.stderr, 20) });
}

/**
 * Whether CRIU dumped the container with a user namespace of its own (a `userns-ID.img`): the
 * restore must then run it in one too (network.ts says why that changes its network), whatever
 * the restoring node's own setting for new containers.
 */
export async function dumpedWithUserNamespace(images: string): Promise<boolean> {
  const entries = await readdir(images).catch(() => [] as string[]);
  return entries.some((e) => /^userns-\d+\.img$/.test(e));
}

/**
 * Removes the packet filter CRIU installs in the container's namespace while it dumps
 * ("network lock"). A successful restore removes it; a dump that fails after locking
 * (e.g. the lazy page server breaking) unfreezes the processes but leaves it, and the
 * container, though running, would drop every packet. `netnsPath`: the container's namespace
 * (RuntimeContext.containerNetnsPath); none when it is gone with the container.
 */
export async function removeCriuNetworkLock(netnsPath: string | undefined): Promise<void> {
  if (!netnsPath) return;
  for (const tool of ['iptables', 'ip6tables']) {
    const inNs = (args: string[]) => runUnchecked('nsenter', [`--net=${netnsPath}`, '--', tool, ...args]);
    if ((await inNs(['-L', 'CRIU', '-n'])).code !== 0) continue;
    await inNs(['-D', 'INPUT', '-j', 'CRIU']);
    await inNs(['-D', 'OUTPUT', '-j', 'CRIU']);
    await inNs(['-F', 'CRIU']);
    await inNs(['-X', 'CRIU']);
  }
}

/**
 * A lazy restore opens a userfaultfd in the restored task, inside the container's user namespace
 * when it has one, where the host's CAP_SYS_PTRACE does not reach: the kernel then allows it only
 * with vm.unprivileged_userfaultfd=1 (scripts/setup.sh sets it). Said before the restore starts,
 * rather than as CRIU's "Unable to open an userfaultfd descriptor" after it failed.
 */
export async function assertLazyRestorePossible(userNamespace: boolean): Promise<void> {
  if (!userNamespace) return;
  const setting = (await readFile('/proc/sys/vm/unprivileged_userfaultfd', 'utf8').catch(() => '')).trim();
  if (setting === '0') {
    throw new CapabilityMissingError(
      'a lazy restore of a container in a user namespace of its own needs vm.unprivileged_userfaultfd=1 on the target node, which is 0 here: run `sysctl -w vm.unprivileged_userfaultfd=1` (npm run setup does), or migrate with --mode copy',
      { sysctl: 'vm.unprivileged_userfaultfd' },
    );
  }
}

/**
 * Kills the CRIU processes of a migration that a previous agent process started and left when
 * it died (orphans: this process's own children are left alone): a dump's `runc checkpoint`
 * with the `criu swrk` below it that serves the pages, a lazy-pages daemon, a `runc restore`.
 * This process has no handle on them; they are found by the migration's images directory among
 * their arguments. Returns the pids found.
 */
export async function killOrphanedCriuProcesses(imagesDir: string): Promise<number[]> {
  const found: number[] = [];
  for (const entry of await readdir('/proc').catch(() => [] as string[])) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    const args = (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');
    if (!args.includes(imagesDir)) continue;
    // This process's own children are its to end (it holds their handles): only orphans here.
    if ((await parentPid(pid)) === process.pid) continue;
    found.push(pid);
  }
  for (const pid of found) await killProcessTree(pid);
  return found;
}

export class Criu {
  /** Lazy-pages daemons of restores on this node, by migration. */
  private readonly lazyDaemons = new Map<string, ChildProcess>();
  /** How each lazy-pages daemon this process started ended (until lazyPagesEnded reports it). */
  private readonly lazyExits = new Map<string, { code: number | null; signal: NodeJS.Signals | null }>();

  constructor(
    private readonly runc: Runc,
    private readonly criuPath: string,
    private readonly hostNetns: string | undefined,
  ) {}

  /**
   * A migration's dump: `runc checkpoint` with established TCP connections; in lazy mode all
   * but memory, which a page server keeps serving until the target has pulled every page.
   * Resolves once the container's state is captured (copy: the dump ended well; lazy: the page
   * server is ready, signalled by one byte CRIU writes to the status fd). Rejects when runc
   * exits first or fails: the container then runs again. `onStarted` sees the process before it
   * is waited for. `frozenFirst`: frozen just before the dump's CRIU starts (freeze-first.ts), the
   * `pause` step.
   */
  async dump(
    id: string,
    opts: { name: string; images: string; work: string; mode: MigrationMode; pageServer?: PageServer; steps?: StepClock; frozenFirst?: boolean },
    onStarted: (dump: DumpProcess) => void,
  ): Promise<void> {
    const status = opts.mode === 'lazy' ? await openStatusFifo(join(opts.work, 'status.fifo')) : undefined;
    const pid = opts.frozenFirst ? (await this.runc.state(id))?.pid : undefined;
    const freezer = pid ? await freezeFirstWrapper(opts.work, this.criuPath, pid, CRIU_RUNS_BEFORE_DUMP[opts.mode]) : undefined;
    let dump: DumpProcess | undefined;
    try {
      await this.runDump(id, opts, status, freezer, (d) => onStarted((dump = d)));
    } catch (err) {
      // CRIU leaves a cgroup that was frozen before it started frozen: the container must run here again.
      if (freezer) await this.runc.exec(['resume', id]);
      status?.closeWriteEnd();
      status?.readable.destroy();
      throw err;
    }
    // A lazy page server that fails later has CRIU resume the tasks, the cgroup left frozen as it
    // found it: the container runs here again, as it did when CRIU froze it.
    if (freezer) void dump?.done.then((res) => (res.code !== 0 ? this.runc.exec(['resume', id]) : undefined)).catch(() => undefined);
    const frozenAt = freezer ? await frozenFirstAt(opts.work) : undefined;
    if (frozenAt) opts.steps?.add('pause', frozenAt, frozenAt);
  }

  private async runDump(
    id: string,
    opts: { name: string; images: string; work: string; mode: MigrationMode; pageServer?: PageServer; steps?: StepClock },
    status: StatusFifo | undefined,
    freezer: FreezeFirst | undefined,
    onStarted: (dump: DumpProcess) => void,
  ): Promise<void> {
    const started = Date.now();
    const checkpoint = ['checkpoint', '--image-path', opts.images, '--work-path', opts.work, '--tcp-established', FILE_LOCKS];
    const args = freezer ? this.runc.args(['--criu', freezer.criuPath, ...checkpoint]) : this.runc.args(checkpoint, true);
    if (opts.mode === 'lazy') args.push('--lazy-pages', '--page-server', `${opts.pageServer!.address}:${opts.pageServer!.port}`, '--status-fd', '3');
    args.push(id);
    const child = spawn(...inHostNetns(this.hostNetns, this.runc.opts.runcPath, args), {
      stdio: ['ignore', 'ignore', 'pipe', status?.writeFd ?? 'ignore'],
      detached: true,
      env: { ...process.env, ...freezer?.env },
    });
    status?.closeWriteEnd();
    const stderr: Buffer[] = [];
    child.stderr!.on('data', (d: Buffer) => stderr.push(d));
    const done = new Promise<{ code: number; stderr: string }>((resolve) => {
      child.on('close', (code) => resolve({ code: code ?? 1, stderr: Buffer.concat(stderr).toString() }));
      child.on('error', (e) => resolve({ code: 1, stderr: e.message }));
    });
    onStarted({ process: child, done });
    let captured: boolean;
    if (status) {
      // If runc exits first (EOF without a byte), the dump failed.
      captured = await new Promise<boolean>((resolve) => {
        status.readable.once('data', () => resolve(true));
        void done.then(() => resolve(false));
      });
      status.readable.destroy();
    } else {
      captured = (await done).code === 0;
    }
    if (!captured) throw await dumpFailedError(`dump of '${opts.name}'`, await done, join(opts.work, CRIU_LOG.dump));
    opts.steps?.add('runc-checkpoint', started, Date.now());
    opts.steps?.addAll(await criuLogSteps(join(opts.work, CRIU_LOG.dump), 'dump'));
  }

  /**
   * A checkpoint's dump: `runc checkpoint --leave-running` of a paused container, which stays
   * paused (the caller resumes it). TCP connections are not dumped (criu.conf: tcp-close).
   */
  async dumpLeavingRunning(id: string, what: string, images: string, work: string): Promise<void> {
    const res = await this.runc.exec(['checkpoint', '--leave-running', FILE_LOCKS, '--image-path', images, '--work-path', work, id], { inHostNetns: true, withCriu: true });
    if (res.code !== 0) throw await dumpFailedError(what, res, join(work, CRIU_LOG.dump));
  }

  /**
   * `runc restore -d` arguments for images in `images`, CRIU working (and logging) in `work`.
   * Lazy mode starts CRIU's lazy-pages daemon first: it connects to the page server when the
   * restored process first needs memory, and exits once all is copied. `daemonFailed` resolves
   * with a reason if the daemon fails: CRIU's restore then waits forever, so the caller must
   * give it up (Runc.start's `abandon`).
   */
  async restoreCommand(
    migrationId: string,
    opts: { images: string; work: string; bundle: string; mode: MigrationMode; pageServer?: PageServer },
  ): Promise<{ args: string[]; log: string; daemonFailed?: Promise<string> }> {
    const args = ['restore', '-d', FILE_LOCKS, '--image-path', opts.images, '--work-path', opts.work, '--bundle', opts.bundle];
    const log = join(opts.work, CRIU_LOG.restore);
    if (opts.mode !== 'lazy') return { args, log };
    const pageServer = opts.pageServer!;
    const daemon = await this.startLazyPagesDaemon(migrationId, opts.images, opts.work, pageServer);
    const daemonFailed = new Promise<string>((resolve) => {
      daemon.once('exit', (code, signal) => {
        if (code !== 0) {
          resolve(`the CRIU lazy-pages daemon failed (${signal ?? `exit code ${code}`}) fetching memory from the page server ${pageServer.address}:${pageServer.port}; see ${join(opts.work, CRIU_LOG.lazyPages)}`);
        }
      });
    });
    return { args: [...args, '--lazy-pages'], log, daemonFailed };
  }

  private async startLazyPagesDaemon(migrationId: string, images: string, work: string, pageServer: PageServer): Promise<ChildProcess> {
    const socket = join(work, 'lazy-pages.socket');
    const daemon = spawn(
      ...inHostNetns(this.hostNetns, this.criuPath, [
        'lazy-pages', '--page-server', '--address', pageServer.address, '--port', String(pageServer.port),
        '--images-dir', images, '--work-dir', work, '-o', CRIU_LOG.lazyPages, '-v4',
      ]),
      { stdio: 'ignore', detached: true },
    );
    daemon.unref();
    this.lazyDaemons.set(migrationId, daemon);
    daemon.on('exit', (code, signal) => {
      // One killLazyPages ended is no failure to report: it was let go first.
      if (this.lazyDaemons.get(migrationId) !== daemon) return;
      this.lazyDaemons.delete(migrationId);
      this.lazyExits.set(migrationId, { code, signal });
    });
    const deadline = Date.now() + LAZY_SOCKET_WAIT_MS;
    while (!existsSync(socket)) {
      if (daemon.exitCode !== null || Date.now() > deadline) {
        throw new RuntimeFailedError(`CRIU lazy-pages daemon did not start (page server ${pageServer.address}:${pageServer.port})`, {
          op: 'criu lazy-pages',
          logPath: join(work, CRIU_LOG.lazyPages),
        });
      }
      await sleep(5);
    }
    return daemon;
  }

  /** Ends a migration's lazy-pages daemon, if it runs. */
  killLazyPages(migrationId: string): void {
    const daemon = this.lazyDaemons.get(migrationId);
    this.lazyDaemons.delete(migrationId);
    daemon?.kill('SIGKILL');
    this.lazyExits.delete(migrationId);
  }


  /**
   * Resolves when the migration's lazy-pages daemon has ended (at once if none runs), or after
   * `timeoutMs`; with why it failed, if it did (not code 0). Unknown (another agent process
   * started it, or it still runs) counts as not failed: the copy's own fate tells then.
   */
  async lazyPagesEnded(migrationId: string, timeoutMs: number): Promise<{ failed?: string }> {
    const daemon = this.lazyDaemons.get(migrationId);
    if (daemon && daemon.exitCode === null && daemon.signalCode === null) {
      await within(new Promise((resolve) => daemon.once('exit', resolve)), timeoutMs);
    }
    const exit = this.lazyExits.get(migrationId);
    this.lazyExits.delete(migrationId);
    if (!exit || exit.code === 0) return {};
    return { failed: `the lazy-pages daemon ended with ${exit.signal ?? `code ${exit.code}`}` };
  }

  /** Memory the lazy-pages daemon copied, from its log: one line per restored process. */
  async lazyPagesBytes(work: string): Promise<number> {
    const log = await readFile(join(work, CRIU_LOG.lazyPages), 'utf8').catch(() => '');
    let pages = 0;
    for (const m of log.matchAll(/UFFD transferred pages: \((\d+)\/\d+\)/g)) pages += Number(m[1]);
    return pages * PAGE_SIZE;
  }
}
