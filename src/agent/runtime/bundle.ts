/**
 * The OCI runtime config (config.json) runc runs a container from. Written anew for every
 * incarnation: a restore on another node differs in root path, network namespace and cgroup.
 */
import type { ContainerSpec } from '../../shared/protocol.js';
import type { EtcMounts } from './etc-files.js';
import type { ImageConfig } from './images.js';

export interface BundleInputs {
  spec: ContainerSpec;
  image: ImageConfig;
  rootfs: string;
  netnsPath: string;
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
    linux: {
      cgroupsPath: b.cgroupsPath,
      resources,
      namespaces: [
        { type: 'pid' },
        { type: 'network', path: b.netnsPath },
        { type: 'ipc' },
        { type: 'uts' },
        { type: 'mount' },
      ],
      maskedPaths: [
        '/proc/acpi', '/proc/asound', '/proc/kcore', '/proc/keys', '/proc/latency_stats', '/proc/timer_list',
        '/proc/timer_stats', '/proc/sched_debug', '/sys/firmware', '/proc/scsi',
      ],
      readonlyPaths: ['/proc/bus', '/proc/fs', '/proc/irq', '/proc/sys', '/proc/sysrq-trigger'],
    },
  };
}
