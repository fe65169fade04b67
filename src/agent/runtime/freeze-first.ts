/**
 * The dump's freeze, made ahead of CRIU's own (criu.ts, Criu.dump). CRIU freezes the container's
 * cgroup and then looks whether it is frozen only every 100 ms (criu/seize.c): a busy container is
 * often still FREEZING at its first look and stays frozen a whole 100 ms for nothing. A cgroup it
 * finds FROZEN already it seizes at once. Freezing it while CRIU runs races with CRIU's thaw after
 * the seize (a late freeze stops CRIU's parasite, and the dump hangs); freezing it before `runc
 * checkpoint` (runc pause) puts runc's whole start in the frozen window (~100 ms under load). So
 * runc is given a CRIU wrapper that freezes the cgroup in the one place that is both late and
 * safe: just before it becomes the CRIU that dumps (runc first starts CRIU for a version check and,
 * lazy, a feature check: those runs pass through). It writes the freezer once, then reads it until
 * FROZEN; it gives up after FREEZE_SPINS reads (thaws: CRIU then freezes it as before).
 *
 * CRIU freezes the hierarchy runc names: cgroup v1's freezer when the container has one (v1 and
 * hybrid hosts), else cgroup v2's cgroup.freeze. CRIU leaves a cgroup it found frozen frozen when
 * the dump fails: the caller resumes it.
 */
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

/** runc's CRIU runs before the dump's: a version check, and in lazy mode a feature check (runc 1.1). */
export const CRIU_RUNS_BEFORE_DUMP = { copy: 1, lazy: 2 } as const;
const FREEZE_SPINS = 200_000;
/** Written by the wrapper when it begins to freeze (ms since epoch): the `pause` step. */
export const FROZEN_AT_FILE = 'frozen-first-at';

export interface FreezeFirst {
  /** The wrapper, for `runc --criu`. */
  criuPath: string;
  env: Record<string, string>;
}

/**
 * Writes the wrapper into `work` (the dump's CRIU work dir) for the container whose init is `pid`;
 * undefined when its freezer cannot be found (CRIU freezes it then, as without).
 */
export async function freezeFirstWrapper(work: string, realCriu: string, pid: number, criuRunsBefore: number): Promise<FreezeFirst | undefined> {
  const freezer = await freezerOf(pid);
  if (!freezer) return undefined;
  const criuPath = join(work, 'criu-freeze-first.sh');
  await writeFile(criuPath, wrapperScript(), { mode: 0o700 });
  return {
    criuPath,
    env: {
      CHIPMUNK_REAL_CRIU: realCriu,
      CHIPMUNK_FREEZER: freezer.path,
      CHIPMUNK_FREEZER_V2: freezer.v2 ? '1' : '',
      CHIPMUNK_CRIU_RUNS: join(work, 'criu-runs'),
      CHIPMUNK_FREEZE_AT_RUN: String(criuRunsBefore + 1),
      CHIPMUNK_FROZEN_AT: join(work, FROZEN_AT_FILE),
    },
  };
}

/** When the wrapper began to freeze, if it did. */
export async function frozenFirstAt(work: string): Promise<number | undefined> {
  const at = Number((await readFile(join(work, FROZEN_AT_FILE), 'utf8').catch(() => '')).trim());
  return at > 0 ? at : undefined;
}

/** v1: .../freezer.state (FROZEN, FREEZING, THAWED); v2: the cgroup's directory (cgroup.freeze, cgroup.events). */
async function freezerOf(pid: number): Promise<{ path: string; v2: boolean } | undefined> {
  const lines = (await readFile(`/proc/${pid}/cgroup`, 'utf8').catch(() => '')).split('\n');
  const v1 = lines.map((l) => /^\d+:([^:]*):(.*)$/.exec(l)).find((m) => m?.[1]?.split(',').includes('freezer'));
  if (v1) {
    const path = join('/sys/fs/cgroup/freezer', v1[2]!, 'freezer.state');
    return existsSync(path) ? { path, v2: false } : undefined;
  }
  const v2 = lines.map((l) => /^0::(.*)$/.exec(l)).find(Boolean);
  const dir = v2 ? join('/sys/fs/cgroup', v2[1]!) : undefined;
  return dir && existsSync(join(dir, 'cgroup.freeze')) ? { path: dir, v2: true } : undefined;
}

/** Shell builtins only in the loop (`read`, `[`): no process start between a look and the next. */
function wrapperScript(): string {
  return `#!/bin/sh
# runc's CRIU for a chipmunk dump: freezes the container before the dump's CRIU starts (freeze-first.ts).
runs=0
[ -f "$CHIPMUNK_CRIU_RUNS" ] && read -r runs < "$CHIPMUNK_CRIU_RUNS"
runs=$((runs + 1))
echo "$runs" > "$CHIPMUNK_CRIU_RUNS"
if [ "$runs" -eq "$CHIPMUNK_FREEZE_AT_RUN" ]; then
  date +%s%3N > "$CHIPMUNK_FROZEN_AT"
  i=0
  if [ -n "$CHIPMUNK_FREEZER_V2" ]; then
    echo 1 > "$CHIPMUNK_FREEZER/cgroup.freeze"
    while [ $i -lt ${FREEZE_SPINS} ]; do
      frozen=
      while read -r key value; do [ "$key" = frozen ] && frozen=$value; done < "$CHIPMUNK_FREEZER/cgroup.events"
      [ "$frozen" = 1 ] && break
      i=$((i + 1))
    done
    [ $i -lt ${FREEZE_SPINS} ] || echo 0 > "$CHIPMUNK_FREEZER/cgroup.freeze"
  else
    echo FROZEN > "$CHIPMUNK_FREEZER"
    while [ $i -lt ${FREEZE_SPINS} ]; do
      read -r state < "$CHIPMUNK_FREEZER"
      [ "$state" = FROZEN ] && break
      i=$((i + 1))
    done
    [ $i -lt ${FREEZE_SPINS} ] || echo THAWED > "$CHIPMUNK_FREEZER"
  fi
fi
exec "$CHIPMUNK_REAL_CRIU" "$@"
`;
}
