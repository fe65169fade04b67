/**
 * What this host can do for chipmunk: tools, kernel features and settings that container
 * migration relies on. `runHostChecks()` is the full list `chipmunk doctor` prints;
 * `detectCapabilities()` is the small summary the agent needs to choose a migration mode.
 *
 * Probes never throw: a tool that is absent, fails or hangs is itself a finding, reported as
 * a check result, so one broken probe cannot hide the others.
 */

import type { HostCapabilities } from '../protocol.js';
import { criuChecks, criuSupportsLazyMigration, probeCriu } from './criu-probe.js';
import { cgroupCheck, checkSysctl, checkSysResource, readCgroupMode } from './kernel-checks.js';
import { checkCniPlugins, checkLayerImageTool, checkPodman, checkRoot, checkRunc, checkTool } from './tool-checks.js';
import type { HostCheck } from './probe.js';

export type { HostCheck, HostCheckStatus } from './probe.js';
export { sysResourceCheck } from './kernel-checks.js';

export interface HostProbeOptions {
  /** CRIU binary to probe; defaults to $CHIPMUNK_CRIU, then the set-up's private install. */
  criuPath?: string;
}

const DEFAULT_CRIU_PATH = '/opt/chipmunk/bin/criu';

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

/** The CRIU binary the agent runs and the probes check: the one given, else $CHIPMUNK_CRIU, else the set-up's private install. */
export function resolveCriuPath(opts: HostProbeOptions): string {
  return opts.criuPath ?? process.env.CHIPMUNK_CRIU ?? DEFAULT_CRIU_PATH;
}
