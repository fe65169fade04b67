/**
 * Freezing a container's cgroup for a migration's dump, by the agent, as soon as CRIU starts.
 *
 * CRIU freezes the cgroup itself when it finds it running, but then looks at it again only every
 * 100 ms (criu/seize.c, a fixed step): a busy container, whose freezer is still FREEZING at the
 * first look, stays frozen a whole 100 ms before its dump even begins (bench/downtime: nearly
 * every move on a loaded machine). Frozen by the agent instead, with a look every millisecond,
 * CRIU finds it FROZEN and goes on at once, and leaves it so, as after `runc pause`. The agent
 * starts when CRIU's log appears, not before `runc checkpoint`: runc's own start (a CRIU version
 * check included) takes about 90 ms, which would then count as frozen too; CRIU's start until it
 * freezes (about 30-50 ms, its kernel probes) still does. CHIPMUNK_DUMP_FREEZE=criu keeps CRIU's
 * way (bench/downtime measures both side by side).
 */
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { InvalidInputError } from '../../shared/errors.js';

const CGROUP_ROOT = '/sys/fs/cgroup';
const POLL_MS = 1;
const FREEZE_TIMEOUT_MS = 10_000;
/** How long CRIU may take to open its log after runc started: past it, CRIU freezes on its own. */
const CRIU_START_TIMEOUT_MS = 10_000;

/** Who freezes a container for its migration's dump: the agent (default) or CRIU alone. */
export type DumpFreezer = 'agent' | 'criu';

export function dumpFreezer(env: NodeJS.ProcessEnv = process.env): DumpFreezer {
  const value = env.CHIPMUNK_DUMP_FREEZE;
  if (value === undefined || value === '' || value === 'agent') return 'agent';
  if (value === 'criu') return 'criu';
  throw new InvalidInputError(`CHIPMUNK_DUMP_FREEZE='${value}': use agent (the default) or criu`, { CHIPMUNK_DUMP_FREEZE: value });
}

interface Freezer {
  freeze(): Promise<void>;
  frozen(): Promise<boolean>;
  thaw(): Promise<void>;
}

/** The container's freezer: cgroup v1's freezer.state, or v2's cgroup.freeze. */
function freezerOf(cgroupsPath: string): Freezer | undefined {
  const v1 = join(CGROUP_ROOT, 'freezer', cgroupsPath, 'freezer.state');
  if (existsSync(v1)) {
    return {
      freeze: () => writeFile(v1, 'FROZEN'),
      frozen: async () => (await readFile(v1, 'utf8')).trim() === 'FROZEN',
      thaw: () => writeFile(v1, 'THAWED'),
    };
  }
  const v2 = join(CGROUP_ROOT, cgroupsPath);
  if (existsSync(join(v2, 'cgroup.freeze'))) {
    return {
      freeze: () => writeFile(join(v2, 'cgroup.freeze'), '1'),
      frozen: async () => /^frozen 1$/m.test(await readFile(join(v2, 'cgroup.events'), 'utf8')),
      thaw: () => writeFile(join(v2, 'cgroup.freeze'), '0'),
    };
  }
  return undefined;
}

export interface AgentFreeze {
  /** When the freeze began and when every task was frozen (ms since epoch); none if it did not happen. */
  timing?: { at: number; end: number };
  /** Thaws the cgroup if this froze it (a dump that failed: CRIU leaves it as it found it). */
  thaw(): Promise<void>;
}

/**
 * Once `criuLog` exists (CRIU has started), freezes the cgroup and waits, a look every
 * millisecond, until every task is frozen. Gives up quietly (CRIU then freezes it, as before)
 * when `ended` resolves first (runc exited) or the node's cgroups have no freezer known here.
 */
export async function freezeOnceCriuStarts(cgroupsPath: string, criuLog: string, ended: Promise<unknown>): Promise<AgentFreeze> {
  const none: AgentFreeze = { thaw: async () => undefined };
  const freezer = freezerOf(cgroupsPath);
  if (!freezer) return none;
  let over = false;
  void ended.then(() => (over = true));
  const waitUntil = Date.now() + CRIU_START_TIMEOUT_MS;
  while (!existsSync(criuLog)) {
    if (over || Date.now() > waitUntil) return none;
    await sleep(POLL_MS);
  }
  const at = Date.now();
  const deadline = at + FREEZE_TIMEOUT_MS;
  // cgroup v1 can stay FREEZING while a task is busy in the kernel: asking again retries it (as runc does).
  for (await freezer.freeze(); !(await freezer.frozen()); await freezer.freeze()) {
    if (Date.now() > deadline) {
      // CRIU fails such a dump on its own: the cgroup is left as it was.
      await freezer.thaw();
      return none;
    }
    await sleep(POLL_MS);
  }
  return { timing: { at, end: Date.now() }, thaw: () => freezer.thaw() };
}
