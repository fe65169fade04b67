/** The tools besides CRIU that chipmunk runs on a host, and whether root runs it. */
import { access, constants } from 'node:fs/promises';
import { RUN_SETUP, firstLine, readText, runCommand, type HostCheck } from './probe.js';

const CHIPMUNK_CONTAINERS_CONF = '/etc/chipmunk/containers.conf';
const CNI_PLUGIN_DIR = '/usr/lib/cni';
const CNI_PLUGINS = ['bridge', 'host-local', 'portmap', 'loopback'] as const;

export function checkRoot(): HostCheck {
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
export async function checkRunc(): Promise<HostCheck> {
  const run = await runCommand('runc', ['--version']);
  const version = /^runc version\s+(\S+)/m.exec(run.output)?.[1];
  if (run.ok && version) return { id: 'runc', title: 'runc', status: 'ok', detail: version };
  return { id: 'runc', title: 'runc', status: 'missing', detail: run.failure ?? firstLine(run.output), fix: RUN_SETUP };
}
export async function checkTool(spec: { id: string; command: string; args: string[]; why: string }): Promise<HostCheck> {
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
export async function checkPodman(): Promise<HostCheck> {
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
export async function checkCniPlugins(): Promise<HostCheck> {
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

/**
 * mkfs.ext4 makes image writable layers (`chipmunk agent --writable-layer image`), an opt-in:
 * without it only that option fails, so its absence is a warning, not a missing piece.
 */
export async function checkLayerImageTool(): Promise<HostCheck> {
  const check = await checkTool({
    id: 'mkfs-ext4',
    command: 'mkfs.ext4',
    args: ['-V'],
    why: "image writable layers (agent --writable-layer image), which keep files' inode numbers across moves",
  });
  return check.status === 'ok' ? check : { ...check, status: 'warn' };
}
