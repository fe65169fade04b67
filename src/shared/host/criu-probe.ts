/**
 * CRIU's probes: its version, the kernel features it reports (userfaultfd for lazy migration,
 * soft-dirty tracking for pre-copy) and, for the doctor, its own `criu check`.
 */
import { RUN_SETUP, firstLine, runCommand, type HostCheck } from './probe.js';

/** Older CRIU fails on this project's kernels (vDSO layout) or cannot dump inet sockets. */
const CRIU_MIN_VERSION = [4, 2] as const;

type FeatureStatus = 'supported' | 'unsupported' | 'unknown-feature';

interface FeatureProbe {
  status: FeatureStatus;
  output: string;
}

interface SelfCheck {
  ok: boolean;
  output: string;
}

/** CRIU that did not run (absent, broken, no version): nothing else about it can be probed. */
interface CriuUnavailable {
  version?: undefined;
  failure: string;
}

interface CriuRuns {
  version: string;
  uffdNoncoop: FeatureProbe;
  /** Not every CRIU knows a `lazy_pages` feature name; `unknown-feature` then, not a failure. */
  lazyPages: FeatureProbe;
  dirtyTracking: FeatureProbe;
  /** `criu check`, only when asked for (the doctor wants it, the agent does not). */
  selfCheck?: SelfCheck;
}

export type CriuProbe = CriuUnavailable | CriuRuns;

export async function probeCriu(criuPath: string, opts: { withSelfCheck: boolean }): Promise<CriuProbe> {
  const versionRun = await runCommand(criuPath, ['--version']);
  const version = /^Version:\s*(\S+)/m.exec(versionRun.output)?.[1];
  if (version === undefined) {
    return { failure: versionRun.failure ?? `${criuPath} printed no version: ${firstLine(versionRun.output)}` };
  }
  const [uffdNoncoop, lazyPages, dirtyTracking, selfCheck] = await Promise.all([
    probeCriuFeature(criuPath, 'uffd-noncoop'),
    probeCriuFeature(criuPath, 'lazy_pages'),
    probeCriuFeature(criuPath, 'mem_dirty_track'),
    opts.withSelfCheck ? runCriuSelfCheck(criuPath) : undefined,
  ]);
  return { version, uffdNoncoop, lazyPages, dirtyTracking, ...(selfCheck ? { selfCheck } : {}) };
}

async function probeCriuFeature(criuPath: string, feature: string): Promise<FeatureProbe> {
  const run = await runCommand(criuPath, ['check', '--feature', feature]);
  if (run.ok) return { status: 'supported', output: run.output };
  if (/Unknown feature/i.test(run.output)) return { status: 'unknown-feature', output: run.output };
  return { status: 'unsupported', output: run.output || (run.failure ?? '') };
}

async function runCriuSelfCheck(criuPath: string): Promise<SelfCheck> {
  const run = await runCommand(criuPath, ['check']);
  // "Looks good but some kernel features are missing" also exits 0: only the plain verdict is ok.
  const ok = run.ok && /Looks good\./.test(run.output) && !/Looks good but/.test(run.output);
  return { ok, output: run.output || (run.failure ?? '') };
}

function versionAtLeast(version: string, minimum: readonly number[]): boolean {
  // "4.2.1", "4.2+ds1": compare the leading numeric components only.
  const parts = version.split('.').map((p) => Number.parseInt(p, 10) || 0);
  for (const [i, want] of minimum.entries()) {
    const have = parts[i] ?? 0;
    if (have !== want) return have > want;
  }
  return true;
}

export function criuSupportsLazyMigration(criu: CriuRuns): boolean {
  return (
    versionAtLeast(criu.version, CRIU_MIN_VERSION) &&
    criu.uffdNoncoop.status === 'supported' &&
    criu.lazyPages.status !== 'unsupported'
  );
}

const CRIU_TITLES = {
  criu: `CRIU >= ${CRIU_MIN_VERSION.join('.')}`,
  'criu-check': 'criu check',
  uffd: 'userfaultfd (lazy migration)',
  'soft-dirty': 'soft-dirty tracking (pre-copy)',
} as const;
export function criuChecks(criuPath: string, criu: CriuProbe): HostCheck[] {
  if (criu.version === undefined) {
    // Keep every CRIU check in the list (stable ids for JSON readers); the fix is on the first.
    const notProbed = `not probed: criu at ${criuPath} does not run`;
    return [
      { id: 'criu', title: CRIU_TITLES.criu, status: 'missing', detail: criu.failure, fix: RUN_SETUP },
      { id: 'criu-check', title: CRIU_TITLES['criu-check'], status: 'missing', detail: notProbed },
      { id: 'uffd', title: CRIU_TITLES.uffd, status: 'missing', detail: notProbed },
      { id: 'soft-dirty', title: CRIU_TITLES['soft-dirty'], status: 'warn', detail: notProbed },
    ];
  }
  return [criuVersionCheck(criuPath, criu.version), criuSelfCheck(criu.selfCheck), uffdCheck(criu), softDirtyCheck(criu.dirtyTracking)];
}

function criuVersionCheck(criuPath: string, version: string): HostCheck {
  const title = CRIU_TITLES.criu;
  if (versionAtLeast(version, CRIU_MIN_VERSION)) return { id: 'criu', title, status: 'ok', detail: `${version} at ${criuPath}` };
  return {
    id: 'criu',
    title,
    status: 'missing',
    detail: `${version} at ${criuPath}: older CRIU fails on kernels >= 6.13 or cannot dump inet sockets`,
    fix: RUN_SETUP,
  };
}

function criuSelfCheck(selfCheck: SelfCheck | undefined): HostCheck {
  const title = CRIU_TITLES['criu-check'];
  if (selfCheck?.ok) return { id: 'criu-check', title, status: 'ok', detail: 'Looks good.' };
  return {
    id: 'criu-check',
    title,
    status: 'missing',
    detail: firstLine(selfCheck?.output ?? '') || 'criu check gave no verdict',
    fix: 'run `criu check --all` as root and address what it reports',
  };
}

const USERFAULTFD_KERNEL_FIX = 'boot a kernel built with CONFIG_USERFAULTFD=y';

function uffdCheck(criu: CriuRuns): HostCheck {
  const title = CRIU_TITLES.uffd;
  if (criu.uffdNoncoop.status !== 'supported') {
    return {
      id: 'uffd',
      title,
      status: 'missing',
      detail: `uffd-noncoop: ${firstLine(criu.uffdNoncoop.output) || 'not supported'}; only stop-and-copy migration is possible`,
      fix: USERFAULTFD_KERNEL_FIX,
    };
  }
  if (criu.lazyPages.status === 'unsupported') {
    const detail = `lazy_pages: ${firstLine(criu.lazyPages.output) || 'not supported'}`;
    return { id: 'uffd', title, status: 'missing', detail, fix: USERFAULTFD_KERNEL_FIX };
  }
  const lazyPagesNote = criu.lazyPages.status === 'supported' ? 'lazy_pages supported' : 'this criu has no separate lazy_pages check';
  return { id: 'uffd', title, status: 'ok', detail: `uffd-noncoop supported; ${lazyPagesNote}` };
}

function softDirtyCheck(dirtyTracking: FeatureProbe): HostCheck {
  const title = CRIU_TITLES['soft-dirty'];
  if (dirtyTracking.status === 'supported') {
    return { id: 'soft-dirty', title, status: 'ok', detail: 'mem_dirty_track supported: pre-copy (criu pre-dump) is possible' };
  }
  // Lazy migration does not need it, so its absence only removes one migration mode: a warning.
  // CRIU prints e.g. "Warn  (criu/cr-check.c:824): Dirty tracking is OFF. Memory snapshot will not work."
  const criuSays = firstLine(dirtyTracking.output).replace(/^Warn\s+\([^)]*\):\s*/, '').replace(/\.$/, '') || 'not supported';
  return {
    id: 'soft-dirty',
    title,
    status: 'warn',
    detail: `mem_dirty_track: ${criuSays}; pre-copy is unavailable, lazy migration still works`,
    fix: 'for pre-copy, boot a kernel built with CONFIG_MEM_SOFT_DIRTY=y',
  };
}
