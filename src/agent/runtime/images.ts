/**
 * Images come from Podman's store: chipmunk does not pull or build, it reads what `podman
 * images` lists. An image's layers are the read-only lower layers of every container made
 * from it.
 */
import { InvalidInputError } from '../../shared/errors.js';
import { run, runUnchecked } from '../../shared/exec.js';

export interface ImageConfig {
  id: string;
  entrypoint: string[];
  cmd: string[];
  env: string[];
  workingDir: string;
  /** overlay lowerdir= value: the image's layer directories, top first. */
  lowerDirs?: string;
}

const podmanEnv = (): NodeJS.ProcessEnv => ({ ...process.env, CONTAINERS_CONF: process.env.CONTAINERS_CONF ?? '/etc/chipmunk/containers.conf' });

export async function inspectImage(ref: string): Promise<ImageConfig> {
  const res = await runUnchecked('podman', ['image', 'inspect', '--format', 'json', ref], { env: podmanEnv(), timeoutMs: 30_000 });
  if (res.code !== 0) {
    throw new InvalidInputError(`unknown image '${ref}': it is not in this node's Podman store ('podman images' lists what is there; build or load it first)`, {
      image: ref,
    });
  }
  const [img] = JSON.parse(res.stdout) as Array<{
    Id: string;
    Config?: { Entrypoint?: string[]; Cmd?: string[]; Env?: string[]; WorkingDir?: string };
    GraphDriver?: { Name?: string; Data?: { UpperDir?: string; LowerDir?: string } };
  }>;
  const layers = img.GraphDriver?.Name === 'overlay' ? [img.GraphDriver.Data?.UpperDir, img.GraphDriver.Data?.LowerDir].filter(Boolean) : [];
  return {
    id: img.Id,
    entrypoint: img.Config?.Entrypoint ?? [],
    cmd: img.Config?.Cmd ?? [],
    env: img.Config?.Env ?? [],
    workingDir: img.Config?.WorkingDir || '/',
    ...(layers.length ? { lowerDirs: layers.join(':') } : {}),
  };
}

/**
 * The overlay lower layers for a container of this image. With Podman's overlay driver these
 * are the image's own layer directories, used directly: CRIU cannot dump a process whose
 * mapped files live on a nested overlay (`podman image mount` output) it cannot see from the
 * container's mount namespace. Other drivers fall back to the image mount.
 */
export async function imageLowerDirs(image: ImageConfig): Promise<string> {
  if (image.lowerDirs) return image.lowerDirs;
  const res = await run('podman', ['image', 'mount', image.id], { env: podmanEnv(), op: 'podman image mount', timeoutMs: 60_000 });
  return res.stdout.trim();
}
