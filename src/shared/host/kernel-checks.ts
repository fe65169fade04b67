/** Kernel settings and features that containers and their migrations rely on. */
import { readText, type HostCheck } from './probe.js';

type CgroupMode = 'v1' | 'v2' | 'hybrid' | 'none';

const CAP_SYS_RESOURCE_BIT = 24n;

export async function checkSysctl(spec: { id: string; key: string; want: string; why: string; atLeast?: boolean }): Promise<HostCheck> {
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
export async function readCgroupMode(): Promise<CgroupMode> {
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
export function cgroupCheck(mode: CgroupMode): HostCheck {
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
export async function checkSysResource(): Promise<HostCheck> {
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
