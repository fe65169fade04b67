/**
 * The OCI runtime config (config.json) runc runs a container from. Written anew for every
 * incarnation: a restore on another node differs in root path, network namespace and cgroup.
 */
import type { ContainerSpec } from '../../shared/protocol.js';
import type { EtcMounts } from './etc-files.js';
import type { ImageConfig } from './images.js';
import { interfaceMoveHook } from './network.js';

export interface BundleInputs {
  spec: ContainerSpec;
  image: ImageConfig;
  rootfs: string;
  /** The namespace CNI attached: the container's own, or with a user namespace a staging one (network.ts). */
  netns: string;
  netnsPath: string;
  /** Run it in a user namespace of its own (USER_NAMESPACE_IDS). */
  userNamespace: boolean;
  cgroupsPath: string;
  hostname: string;
  /** CRIU config file runc passes to CRIU (org.criu.config), e.g. restore options. */
  criuConfigPath: string;
  /** /etc/hosts, /etc/resolv.conf, /etc/hostname of this incarnation (etc-files.ts). */
  etcMounts: EtcMounts;
  /** Host directory of each named volume of the spec. */
  volumeDir(name: string): string;
}

const DEFAULT_CAPS = [
  'CAP_CHOWN', 'CAP_DAC_OVERRIDE', 'CAP_FSETID', 'CAP_FOWNER', 'CAP_MKNOD', 'CAP_NET_RAW', 'CAP_SETGID',
  'CAP_SETUID', 'CAP_SETFCAP', 'CAP_SETPCAP', 'CAP_NET_BIND_SERVICE', 'CAP_SYS_CHROOT', 'CAP_KILL', 'CAP_AUDIT_WRITE',
];

/**
 * The ids of a container's own user namespace: the host's, one to one, so the image's files
 * (Podman's layers, owned by host ids) are owned inside by whom the image says, volumes and the
 * writable layer need no change of owner, and a restore on any node maps the same way. What the
 * namespace changes is who holds capabilities: the container's root holds them only over what
 * its user namespace owns, and the host's root, its owner, holds every one inside it (CRIU
 * needs CAP_SYS_RESOURCE there to dump non-root processes, criu.ts). A range of ids of its own
 * would also keep its root from being the host's (docs/compatibility.md: why not yet).
 */
export const USER_NAMESPACE_IDS = [{ containerID: 0, hostID: 0, size: 4294967295 }];

export function processArgs(spec: ContainerSpec, image: ImageConfig): string[] {
  const args = spec.command.length > 0 ? [...image.entrypoint, ...spec.command] : [...image.entrypoint, ...image.cmd];
  return args;
}

export function buildOciConfig(b: BundleInputs): Record<string, unknown> {
  const env = new Map<string, string>();
  for (const kv of ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', ...b.image.env]) {
    const i = kv.indexOf('=');
    if (i > 0) env.set(kv.slice(0, i), kv.slice(i + 1));
  }
  for (const [k, v] of Object.entries(b.spec.env)) env.set(k, v);
  const resources: Record<string, unknown> = { devices: [{ allow: false, access: 'rwm' }] };
  if (b.spec.memoryBytes > 0) resources.memory = { limit: b.spec.memoryBytes };

  return {
    ociVersion: '1.0.2',
    annotations: { 'org.criu.config': b.criuConfigPath },
    process: {
      terminal: false,
      user: { uid: 0, gid: 0 },
      args: processArgs(b.spec, b.image),
      env: [...env].map(([k, v]) => `${k}=${v}`),
      cwd: b.image.workingDir || '/',
      // No rlimits: the container inherits the agent's. Raising any (what runc's default
      // spec does for NOFILE) needs CAP_SYS_RESOURCE, which hosts like ours do not grant.
      capabilities: { bounding: DEFAULT_CAPS, effective: DEFAULT_CAPS, permitted: DEFAULT_CAPS, ambient: DEFAULT_CAPS },
      noNewPrivileges: true,
    },
    root: { path: b.rootfs, readonly: false },
    hostname: b.hostname,
    mounts: [
      { destination: '/proc', type: 'proc', source: 'proc' },
      { destination: '/dev', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'strictatime', 'mode=755', 'size=65536k'] },
      { destination: '/dev/pts', type: 'devpts', source: 'devpts', options: ['nosuid', 'noexec', 'newinstance', 'ptmxmode=0666', 'mode=0620', 'gid=5'] },
      { destination: '/dev/shm', type: 'tmpfs', source: 'shm', options: ['nosuid', 'noexec', 'nodev', 'mode=1777', 'size=65536k'] },
      { destination: '/dev/mqueue', type: 'mqueue', source: 'mqueue', options: ['nosuid', 'noexec', 'nodev'] },
      { destination: '/sys', type: 'sysfs', source: 'sysfs', options: ['nosuid', 'noexec', 'nodev', 'ro'] },
      // Bind mounts: runc declares them to CRIU as external mounts, and maps them to this
      // config's sources on restore, so a volume follows its container to the new node and
      // the /etc files are the new node's (its address).
      ...b.etcMounts.map((m) => ({ destination: m.destination, type: 'bind', source: m.source, options: ['rbind', 'ro'] })),
      ...(b.spec.volumes ?? []).map((v) => ({ destination: v.path, type: 'bind', source: b.volumeDir(v.name), options: ['rbind', 'rw'] })),
    ],
    ...(b.userNamespace ? { hooks: { prestart: [interfaceMoveHook(b.netns, b.spec.address)] } } : {}),
    linux: {
      cgroupsPath: b.cgroupsPath,
      resources,
      namespaces: [
        { type: 'pid' },
        // In a user namespace, runc makes the network namespace and the hook moves the attached interface in.
        b.userNamespace ? { type: 'network' } : { type: 'network', path: b.netnsPath },
        { type: 'ipc' },
        { type: 'uts' },
        { type: 'mount' },
        ...(b.userNamespace ? [{ type: 'user' }] : []),
      ],
      ...(b.userNamespace ? { uidMappings: USER_NAMESPACE_IDS, gidMappings: USER_NAMESPACE_IDS } : {}),
      maskedPaths: [
        '/proc/acpi', '/proc/asound', '/proc/kcore', '/proc/keys', '/proc/latency_stats', '/proc/timer_list',
        '/proc/timer_stats', '/proc/sched_debug', '/sys/firmware', '/proc/scsi',
      ],
      readonlyPaths: ['/proc/bus', '/proc/fs', '/proc/irq', '/proc/sys', '/proc/sysrq-trigger'],
    },
  };
}
