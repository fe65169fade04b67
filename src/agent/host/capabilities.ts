/**
 * What this host can do for chipmunk: tools, kernel features and settings that container
 * migration relies on. `runHostChecks()` is the full list `chipmunk doctor` prints;
 * `detectCapabilities()` is the small summary the agent needs to choose a migration mode.
 *
 * Probes never throw: a tool that is absent, fails or hangs is itself a finding, reported as
 * a check result, so one broken probe cannot hide the others.
 */

import { execFile, type ExecFileException } from 'node:child_process';
import { access, constants, readFile } from 'node:fs/promises';

export type HostCheckStatus = 'ok' | 'warn' | 'missing';

export interface HostCheck {
  id: string;
  title: string;
  status: HostCheckStatus;
  detail: string;
  /** What to run (or do) to turn a non-ok check into ok. */
  fix?: string;
}

export type CgroupMode = 'v1' | 'v2' | 'hybrid' | 'none';

export interface HostCapabilities {
  /** Post-copy migration: CRIU >= 4.2 and userfaultfd for non-cooperative processes. */
  lazyMigration: boolean;
  /** Soft-dirty page tracking, which CRIU pre-dump (iterative pre-copy) needs. */
  softDirty: boolean;
  criuVersion?: string;
  cgroupMode: CgroupMode;
}

export interface HostProbeOptions {
  /** CRIU binary to probe; defaults to $CHIPMUNK_CRIU, then the set-up's private install. */
  criuPath?: string;
}

const DEFAULT_CRIU_PATH = '/opt/chipmunk/bin/criu';
const CHIPMUNK_CONTAINERS_CONF = '/etc/chipmunk/containers.conf';
const CNI_PLUGIN_DIR = '/usr/lib/cni';

/** Older CRIU fails on this project's kernels (vDSO layout) or cannot dump inet sockets. */
const CRIU_MIN_VERSION = [4, 2] as const;
const CNI_PLUGINS = ['bridge', 'host-local', 'portmap', 'loopback'] as const;
const PROBE_TIMEOUT_MS = 10_000;
const CAP_SYS_RESOURCE_BIT = 24n;
const RUN_SETUP = 'npm run setup';

export async function runHostChecks(opts: HostProbeOptions = {}): Promise<HostCheck[]> {
  const criuPath = resolveCriuPath(opts);
  const [criu, runc, cgroup, sysResource, pipePages, pipeMaxSize, uffd, ipForward, podman, cni, iptables, nsenter, ip, tar, mkfsExt4] = await Promise.all([
    probeCriu(criuPath, { withSelfCheck: true }),
    checkRunc(),
    readCgroupMode(),
    checkSysResource(),
    checkSysctl({
      id: 'pipe-user-pages-soft',
      key: 'fs.pipe-user-pages-soft',
      want: '0',
      why: 'lazy dumps of large memory fail with "page-pipe: tee: Operation not permitted" under the per-user pipe page budget',
    }),
    checkSysctl({
      id: 'pipe-max-size',
      key: 'fs.pipe-max-size',
      want: '268435456',
      atLeast: true,
      why: 'the lazy page server grows its pipes past the 1 MiB default, which needs CAP_SYS_RESOURCE otherwise ("page-pipe: tee: Operation not permitted")',
    }),
    checkSysctl({
      id: 'unprivileged-userfaultfd',
      key: 'vm.unprivileged_userfaultfd',
      want: '1',
      why: 'a lazy restore of a container in its own user namespace opens its userfaultfd without the host\'s CAP_SYS_PTRACE ("Unable to open an userfaultfd descriptor: Operation not permitted")',
    }),
    checkSysctl({
      id: 'ip-forward',
      key: 'net.ipv4.ip_forward',
      want: '1',
      why: 'container traffic is routed between the CNI bridge and other hosts',
    }),
    checkPodman(),
    checkCniPlugins(),
    checkTool({ id: 'iptables', command: 'iptables', args: ['--version'], why: 'CNI port mappings and masquerading' }),
    checkTool({ id: 'nsenter', command: 'nsenter', args: ['--version'], why: 'enters network namespaces without remounting /sys' }),
    checkTool({ id: 'ip', command: 'ip', args: ['-V'], why: 'network namespaces and veth links' }),
    checkTool({ id: 'tar', command: 'tar', args: ['--version'], why: 'packs CRIU images for transfer' }),
    checkLayerImageTool(),
  ]);
  return [
    checkRoot(),
    runc,
    ...criuChecks(criuPath, criu),
    cgroupCheck(cgroup),
    sysResource,
    pipePages,
    pipeMaxSize,
    uffd,
    ipForward,
    podman,
    cni,
    iptables,
    nsenter,
    ip,
    tar,
    mkfsExt4,
  ];
}

/**
 * mkfs.ext4 makes image writable layers (`chipmunk agent --writable-layer image`), an opt-in:
 * without it only that option fails, so its absence is a warning, not a missing piece.
 */
async function checkLayerImageTool(): Promise<HostCheck> {
  const check = await checkTool({
    id: 'mkfs-ext4',
    command: 'mkfs.ext4',
    args: ['-V'],
    why: "image writable layers (agent --writable-layer image), which keep files' inode numbers across moves",
  });
  return check.status === 'ok' ? check : { ...check, status: 'warn' };
}

/**
 * Only the probes that decide the migration mode (a few short CRIU runs and a file read),
 * so the agent can call it at start. The result is plain data: cache it as long as the host
 * (kernel, CRIU install) does not change.
 */
export async function detectCapabilities(opts: HostProbeOptions = {}): Promise<HostCapabilities> {
  const [criu, cgroupMode] = await Promise.all([probeCriu(resolveCriuPath(opts), { withSelfCheck: false }), readCgroupMode()]);
  if (criu.version === undefined) return { lazyMigration: false, softDirty: false, cgroupMode };
  return {
    lazyMigration: criuSupportsLazyMigration(criu),
    softDirty: criu.dirtyTracking.status === 'supported',
    criuVersion: criu.version,
    cgroupMode,
  };
}

function resolveCriuPath(opts: HostProbeOptions): string {
  return opts.criuPath ?? process.env.CHIPMUNK_CRIU ?? DEFAULT_CRIU_PATH;
}

// ---------------------------------------------------------------- running commands

interface CommandResult {
  ok: boolean;
  /** stdout then stderr, trimmed: CRIU writes verdicts to one or the other depending on the check. */
  output: string;
  /** Why the command did not succeed: not found, timed out, exit code. */
  failure?: string;
}

function runCommand(command: string, args: string[]): Promise<CommandResult> {
  return new Promise((resolve) => {
    execFile(command, args, { timeout: PROBE_TIMEOUT_MS, encoding: 'utf8' }, (err, stdout, stderr) => {
      const output = `${stdout}\n${stderr}`.trim();
      if (!err) return resolve({ ok: true, output });
      resolve({ ok: false, output, failure: describeExecFailure(command, err) });
    });
  });
}

function describeExecFailure(command: string, err: ExecFileException): string {
  if (err.code === 'ENOENT') return `${command} not found`;
  if (err.code === 'EACCES') return `${command} is not executable`;
  if (err.killed) return `${command} timed out after ${PROBE_TIMEOUT_MS / 1000} s`;
  if (err.signal) return `${command} was killed by ${err.signal}`;
  if (typeof err.code === 'number') return `${command} exited with code ${err.code}`;
  return `${command} failed: ${err.message}`;
}

function firstLine(text: string): string {
  return text.split('\n', 1)[0]!.trim();
}

/** File contents, or undefined when it cannot be read (the caller reports what that means). */
async function readText(path: string): Promise<string | undefined> {
  try {
    return await readFile(path, 'utf8');
  } catch {
    return undefined;
  }
}

// ---------------------------------------------------------------- CRIU

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

type CriuProbe = CriuUnavailable | CriuRuns;

async function probeCriu(criuPath: string, opts: { withSelfCheck: boolean }): Promise<CriuProbe> {
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

function criuSupportsLazyMigration(criu: CriuRuns): boolean {
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

function criuChecks(criuPath: string, criu: CriuProbe): HostCheck[] {
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

// ---------------------------------------------------------------- other tools

function checkRoot(): HostCheck {
  const uid = process.getuid?.();
  if (uid === 0) return { id: 'root', title: 'root user', status: 'ok', detail: 'uid 0' };
  return {
    id: 'root',
    title: 'root user',
    status: 'missing',
    detail: `uid ${uid ?? 'unknown'}: CRIU, runc and network namespaces need root`,
    fix: 'run chipmunk as root',
  };
}

async function checkRunc(): Promise<HostCheck> {
  const run = await runCommand('runc', ['--version']);
  const version = /^runc version\s+(\S+)/m.exec(run.output)?.[1];
  if (run.ok && version) return { id: 'runc', title: 'runc', status: 'ok', detail: version };
  return { id: 'runc', title: 'runc', status: 'missing', detail: run.failure ?? firstLine(run.output), fix: RUN_SETUP };
}

async function checkTool(spec: { id: string; command: string; args: string[]; why: string }): Promise<HostCheck> {
  const run = await runCommand(spec.command, spec.args);
  if (run.ok) return { id: spec.id, title: spec.command, status: 'ok', detail: firstLine(run.output) };
  return {
    id: spec.id,
    title: spec.command,
    status: 'missing',
    detail: `${run.failure ?? firstLine(run.output)} (needed: ${spec.why})`,
    fix: RUN_SETUP,
  };
}

async function checkPodman(): Promise<HostCheck> {
  const title = 'podman + containers.conf';
  const run = await runCommand('podman', ['--version']);
  if (!run.ok) return { id: 'podman', title, status: 'missing', detail: run.failure ?? firstLine(run.output), fix: RUN_SETUP };
  const conf = await readText(CHIPMUNK_CONTAINERS_CONF);
  // crun refuses hybrid cgroups, so podman must be told to use runc.
  if (conf === undefined || !/runtime\s*=\s*"runc"/.test(conf)) {
    const problem = conf === undefined ? 'is missing' : 'does not select runtime "runc"';
    return { id: 'podman', title, status: 'missing', detail: `${firstLine(run.output)}; ${CHIPMUNK_CONTAINERS_CONF} ${problem}`, fix: RUN_SETUP };
  }
  return { id: 'podman', title, status: 'ok', detail: `${firstLine(run.output)}; ${CHIPMUNK_CONTAINERS_CONF}` };
}

async function checkCniPlugins(): Promise<HostCheck> {
  const title = 'CNI plugins';
  const absent: string[] = [];
  await Promise.all(
    CNI_PLUGINS.map(async (plugin) => {
      try {
        await access(`${CNI_PLUGIN_DIR}/${plugin}`, constants.X_OK);
      } catch {
        absent.push(plugin);
      }
    }),
  );
  if (absent.length === 0) return { id: 'cni-plugins', title, status: 'ok', detail: `${CNI_PLUGINS.join(', ')} in ${CNI_PLUGIN_DIR}` };
  return {
    id: 'cni-plugins',
    title,
    status: 'missing',
    detail: `not executable in ${CNI_PLUGIN_DIR}: ${absent.sort().join(', ')}`,
    fix: RUN_SETUP,
  };
}

// ---------------------------------------------------------------- kernel settings

async function checkSysctl(spec: { id: string; key: string; want: string; why: string; atLeast?: boolean }): Promise<HostCheck> {
  const raw = await readText(`/proc/sys/${spec.key.replaceAll('.', '/')}`);
  const value = raw?.trim();
  const good = spec.atLeast ? value !== undefined && Number(value) >= Number(spec.want) : value === spec.want;
  if (good) return { id: spec.id, title: spec.key, status: 'ok', detail: `${spec.key} = ${value}` };
  return {
    id: spec.id,
    title: spec.key,
    status: 'missing',
    detail: `${spec.key} = ${value ?? 'unreadable'}, want ${spec.atLeast ? 'at least ' : ''}${spec.want}: ${spec.why}`,
    fix: `sysctl -w ${spec.key}=${spec.want}`,
  };
}

async function readCgroupMode(): Promise<CgroupMode> {
  const mountinfo = await readText('/proc/self/mountinfo');
  if (mountinfo === undefined) return 'none';
  let v1 = false;
  let unified = false;
  let rootIsV2 = false;
  for (const line of mountinfo.split('\n')) {
    // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS"
    const [before, after] = line.split(' - ');
    const mountPoint = before?.split(' ')[4];
    const fsType = after?.split(' ')[0];
    if (!mountPoint?.startsWith('/sys/fs/cgroup')) continue;
    if (fsType === 'cgroup') v1 = true;
    if (fsType === 'cgroup2') {
      unified = true;
      if (mountPoint === '/sys/fs/cgroup') rootIsV2 = true;
    }
  }
  if (rootIsV2 && !v1) return 'v2';
  if (v1 && unified) return 'hybrid';
  if (v1) return 'v1';
  return unified ? 'v2' : 'none';
}

function cgroupCheck(mode: CgroupMode): HostCheck {
  const title = 'cgroup mode';
  if (mode === 'none') {
    return {
      id: 'cgroup',
      title,
      status: 'missing',
      detail: 'no cgroup file system under /sys/fs/cgroup: runc fails with "no cgroup mount found in mountinfo"',
      fix: 'mount cgroup2 on /sys/fs/cgroup (inside `ip netns exec`, use `nsenter --net=` instead)',
    };
  }
  // runc handles all three; crun, which refuses hybrid, is not used.
  return { id: 'cgroup', title, status: 'ok', detail: `${mode} (runc supports it)` };
}

async function checkSysResource(): Promise<HostCheck> {
  const [limits, status] = await Promise.all([readText('/proc/self/limits'), readText('/proc/self/status')]);
  return sysResourceCheck(limits, status);
}

/**
 * What CAP_SYS_RESOURCE's absence costs, from /proc/self/limits and /proc/self/status. CRIU
 * reads every dumped task's rlimits, which for a task of another user needs the capability in
 * the task's user namespace: without it on the host, a container that shares the host's user
 * namespace (agent --userns off) cannot be checkpointed or migrated once it runs a non-root
 * process (PostgreSQL, anything that drops root). A container in a user namespace of its own
 * (the agent's default) is not affected: the host's root, its owner, holds every capability
 * there. Containers also get the agent's rlimits, never raised ones (setrlimit would fail).
 */
export function sysResourceCheck(limits: string | undefined, status: string | undefined): HostCheck {
  const id = 'cap-sys-resource';
  const title = 'CAP_SYS_RESOURCE';
  const nofile = limits && /^Max open files\s+(\S+)\s+(\S+)/m.exec(limits);
  const limit = nofile ? `nofile ${nofile[1]}/${nofile[2]} (soft/hard)` : 'nofile unreadable';
  const capEff = status && /^CapEff:\s*([0-9a-f]+)/m.exec(status)?.[1];
  if (!capEff) return { id, title, status: 'warn', detail: `CapEff unreadable in /proc/self/status; ${limit}` };
  if ((BigInt(`0x${capEff}`) >> CAP_SYS_RESOURCE_BIT) & 1n) return { id, title, status: 'ok', detail: `present; ${limit}` };
  return {
    id,
    title,
    status: 'warn',
    detail:
      'absent: non-root processes in containers without a user namespace of their own (agent --userns off) cannot be checkpointed or migrated ' +
      `(CRIU may not read their rlimits); containers in their own user namespace (the default) are not affected. Containers keep the agent's rlimits, never raised (${limit})`,
    fix: 'keep the agent\'s --userns on (the default), or grant the agent CAP_SYS_RESOURCE',
  };
}
