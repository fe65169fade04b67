/**
 * Images come from Podman's store: chipmunk does not pull or build, it reads what `podman
 * images` lists. An image's layers are the read-only lower layers of every container made
 * from it. A node whose store lacks an image a migration needs gets it from the source node
 * (`exportImage` there, `importImage` here).
 */
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
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

/** A Podman store: the machine's default one, or a private one (--root/--runroot). */
export interface ImageStoreOptions {
  root?: string;
  runroot?: string;
}

export class ImageStore {
  private readonly globalArgs: string[];

  constructor(store: ImageStoreOptions = {}) {
    this.globalArgs = [...(store.root ? ['--root', store.root] : []), ...(store.runroot ? ['--runroot', store.runroot] : [])];
  }

  private podman(args: string[], op: string, timeoutMs = 60_000) {
    return run('podman', [...this.globalArgs, ...args], { env: podmanEnv(), op, timeoutMs });
  }

  async exists(ref: string): Promise<boolean> {
    return (await runUnchecked('podman', [...this.globalArgs, 'image', 'exists', ref], { env: podmanEnv(), timeoutMs: 30_000 })).code === 0;
  }

  async inspect(ref: string): Promise<ImageConfig> {
    const res = await runUnchecked('podman', [...this.globalArgs, 'image', 'inspect', '--format', 'json', ref], { env: podmanEnv(), timeoutMs: 30_000 });
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
  async lowerDirs(image: ImageConfig): Promise<string> {
    if (image.lowerDirs) return image.lowerDirs;
    return (await this.podman(['image', 'mount', image.id], 'podman image mount')).stdout.trim();
  }

  /** Writes the image as a docker-archive into `dir` (for the transfer layer to send). */
  async exportTo(ref: string, dir: string): Promise<void> {
    await this.inspect(ref);
    await mkdir(dir, { recursive: true });
    await this.podman(['image', 'save', '--format', 'docker-archive', '-o', join(dir, 'image.tar'), ref], 'podman image save', 600_000);
  }

  /** Loads an archive written by `exportTo`, and names it `ref` as on the source. */
  async importFrom(dir: string, ref: string): Promise<void> {
    const res = await this.podman(['image', 'load', '-i', join(dir, 'image.tar')], 'podman image load', 600_000);
    if (!(await this.exists(ref))) {
      const loaded = /Loaded image(?:\(s\))?: (\S+)/.exec(res.stdout)?.[1];
      if (!loaded) throw new InvalidInputError(`image archive for '${ref}' loaded nothing`, { image: ref });
      await this.podman(['image', 'tag', loaded, ref], 'podman image tag');
    }
  }
}

const podmanEnv = (): NodeJS.ProcessEnv => ({ ...process.env, CONTAINERS_CONF: process.env.CONTAINERS_CONF ?? '/etc/chipmunk/containers.conf' });
