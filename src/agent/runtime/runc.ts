/**
 * runc as the real runtime drives it: one state root per node, the container's stdio wired to
 * its log writers, runc's own messages kept apart (--log) so they can be quoted in errors.
 * What runc asks of CRIU (dump and restore arguments, options, logs) is in criu.ts.
 */
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { RuntimeFailedError } from '../../shared/errors.js';
import { runUnchecked, type RunResult } from '../../shared/exec.js';
import { removeTree } from '../../shared/remove-tree.js';
import { criuFailureSummary } from './criu.js';
import { spawnWithLogPipes } from './logs.js';
import { inHostNetns } from './network.js';
import { unmountBelow } from './rootfs.js';

export interface RuncOptions {
  runcPath: string;
  /** runc's state root (--root). */
  root: string;
  criuPath: string;
  /** Network namespace (path) commands that start CRIU run in; see RuncRuntimeOptions.hostNetns. */
  hostNetns?: string;
}

export interface RuncState {
  status: string;
  pid: number;
}

/** What `start` needs to know of the container it starts or restores. */
export interface StartTarget {
  name: string;
  containerDir: string;
  logDir: string;
}

/** How long a `runc restore` may outlive a reason to give it up (a failed lazy-pages daemon) before it is killed. */
const ABANDON_GRACE_MS = 5_000;
export const RUNC_START_TIMEOUT_MS = 120_000;

export class Runc {
  constructor(readonly opts: RuncOptions) {}

  /** runc with the node's state root, and CRIU when the command may start it. */
  args(args: string[], withCriu = false): string[] {
    return ['--root', this.opts.root, ...(withCriu ? ['--criu', this.opts.criuPath] : []), ...args];
  }

  /** Runs runc to completion; `inHostNetns` for commands that must see the node's network (CRIU, freezer). */
  exec(args: string[], opts: { inHostNetns?: boolean; withCriu?: boolean; timeoutMs?: number } = {}): Promise<RunResult> {
    const full = this.args(args, opts.withCriu);
    const [cmd, cmdArgs] = opts.inHostNetns ? inHostNetns(this.opts.hostNetns, this.opts.runcPath, full) : [this.opts.runcPath, full];
    return runUnchecked(cmd, cmdArgs, { timeoutMs: opts.timeoutMs ?? RUNC_START_TIMEOUT_MS });
  }

  async state(id: string): Promise<RuncState | undefined> {
    const res = await this.exec(['state', id], { timeoutMs: 10_000 });
    if (res.code !== 0) return undefined;
    return JSON.parse(res.stdout) as RuncState;
  }

  /** Removes one runc incarnation and anything a failed restore left mounted for it. */
  async destroy(id: string): Promise<void> {
    await this.exec(['delete', '-f', id], { timeoutMs: 30_000 });
    const stateDir = join(this.opts.root, id);
    if (existsSync(stateDir)) {
      await unmountBelow(stateDir);
      await removeTree(stateDir);
    }
  }

  /**
   * Runs `runc run -d` or `runc restore -d` with the container's stdio wired to its log
   * writers. If `abandon` resolves while runc still runs, runc gets a grace period and is then
   * killed (its process group: runc, CRIU, the new log writers) and the operation fails with
   * that reason. `criuLog`: the CRIU log of a restore, which the error names.
   */
  async start(target: StartTarget, subcommand: string[], op: string, criuLog?: string, abandon?: Promise<string>): Promise<void> {
    const runcLog = join(target.containerDir, 'runc.log');
    await writeFile(runcLog, '');
    const child = spawnWithLogPipes(this.opts.runcPath, [...this.args([], true), '--log', runcLog, ...subcommand], {
      stdout: join(target.logDir, 'stdout.log'),
      stderr: join(target.logDir, 'stderr.log'),
    });
    let exited = false;
    let abandoned: string | undefined;
    // A runc that hangs (it has been seen waiting forever on a broken CRIU) is given up too.
    const hung = new Promise<string>((resolve) => {
      setTimeout(() => resolve(`no answer from runc within ${RUNC_START_TIMEOUT_MS / 1000} s`), RUNC_START_TIMEOUT_MS).unref();
    });
    void (abandon ? Promise.race([abandon, hung]) : hung).then(async (why) => {
      await sleep(ABANDON_GRACE_MS);
      if (exited || child.pid === undefined) return;
      abandoned = why;
      try {
        process.kill(-child.pid, 'SIGKILL');
      } catch {
        // exited meanwhile
      }
    });
    const code = await new Promise<number>((resolve) => {
      child.on('close', (c) => resolve(c ?? 1));
      child.on('error', () => resolve(127));
    });
    exited = true;
    if (abandoned) throw new RuntimeFailedError(`${op} of '${target.name}' failed: ${abandoned}`, { op, logPath: criuLog ?? runcLog });
    if (code !== 0) {
      const messages = (await readFile(runcLog, 'utf8').catch(() => ''))
        .split('\n')
        .filter((l) => /level=(error|fatal)/.test(l))
        .map((l) => /msg="((?:[^"\\]|\\.)*)"/.exec(l)?.[1]?.replace(/\\n/g, ' ') ?? l);
      const criuSays = criuLog ? await criuFailureSummary(criuLog) : '';
      const why = [messages.slice(-2).join('; ') || `runc exited ${code}`, criuSays].filter(Boolean).join('; ');
      throw new RuntimeFailedError(`${op} of '${target.name}' failed: ${why}`, {
        op,
        logPath: criuLog ?? runcLog,
        stderr: messages.join('\n'),
      });
    }
  }
}
