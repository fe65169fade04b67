/**
 * The frozen window's steps CRIU took, read from its own logs (criu.ts runs CRIU; this reads what
 * it wrote): the source's dump and the target's restore report them (src/shared/steps.ts).
 */
import { readFile, stat } from 'node:fs/promises';
import type { MigrationStep } from '../../shared/protocol.js';

/**
 * The steps of a CRIU run inside its frozen window, from its log: each line carries the time
 * since CRIU started, `(SS.uuuuuu)`, and the log's modification time is when its last line was
 * written, which places the whole log on the wall clock. Read right when the run's part in the
 * window ends (a lazy dump's page server is ready: its log is quiet until the target pulls pages).
 * - dump: `criu-init` (start to freezing), `freeze` (the cgroup frozen, tasks seized),
 *   `network-lock`, `criu-dump` (frozen to dumped: the state, and in copy mode the memory).
 * - restore: `criu-init` (start to the first task forked), `criu-namespaces` (tasks forked into
 *   the namespaces, cgroups, mounts), `criu-restore` (files, sockets, memory mappings, up to
 *   "Tasks resumed"); within the namespaces, `prestart-hooks` (runc runs the bundle's hooks).
 * A line that is missing (another CRIU version, a failure) leaves its step out; nothing throws.
 */
export async function criuLogSteps(logPath: string, run: 'dump' | 'restore'): Promise<MigrationStep[]> {
  const [text, st] = await Promise.all([readFile(logPath, 'utf8').catch(() => ''), stat(logPath).catch(() => undefined)]);
  const lines = [...text.matchAll(/^\((\d+)\.(\d{6})\) (.*)$/gm)].map((m) => ({ s: Number(m[1]) * 1000 + Number(m[2]) / 1000, text: m[3]! }));
  const last = lines.at(-1);
  if (!st || !last) return [];
  const base = st.mtimeMs - last.s;
  const at = (pattern: RegExp, from = 0) => {
    const i = lines.findIndex((l, n) => n >= from && pattern.test(l.text));
    return i < 0 ? undefined : i;
  };
  const steps: MigrationStep[] = [];
  const span = (step: string, from: number | undefined, to: number | undefined) => {
    if (from === undefined || to === undefined || to < from) return;
    steps.push({ step, at: Math.round(base + lines[from]!.s), ms: Math.round((lines[to]!.s - lines[from]!.s) * 10) / 10 });
  };
  if (run === 'dump') {
    const freezing = at(/^freezing cgroup /);
    const frozen = at(/^freezing processes: .*done/, freezing) ?? at(/^freezer\.state=FROZEN/, freezing);
    const lock = at(/^net: Lock network/);
    const locked = lock === undefined ? undefined : at(/^Running network-lock scripts/, lock);
    const dumped = at(/^Running status-ready scripts/) ?? at(/^Dumping finished successfully/) ?? lines.length - 1;
    span('criu-init', 0, freezing);
    span('freeze', freezing, frozen);
    span('network-lock', lock, locked === undefined ? undefined : Math.min(locked + 1, lines.length - 1));
    span('criu-dump', frozen, dumped);
  } else {
    const forking = at(/^Forking task /);
    const namespaced = at(/^Running post-setup-namespaces scripts/, forking);
    const resumed = at(/^Restore finished successfully/, namespaced) ?? lines.length - 1;
    // runc's answer to the setup-namespaces notice: it ran the OCI prestart hooks meanwhile.
    const hooks = at(/^Running setup-namespaces scripts/, forking);
    const hooksDone = hooks === undefined ? undefined : lines.findIndex((l, n) => n > hooks && !/^\s*RPC$/.test(l.text));
    span('criu-init', 0, forking);
    span('criu-namespaces', forking, namespaced);
    span('prestart-hooks', hooks, hooksDone !== undefined && hooksDone >= 0 ? hooksDone : undefined);
    span('criu-restore', namespaced, resumed);
  }
  return steps;
}
