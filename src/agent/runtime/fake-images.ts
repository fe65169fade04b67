/**
 * What FakeRuntime writes where RuncRuntime has CRIU images and a layer's files, so the transfer
 * layer moves real trees between two fakes: images/fake-criu-images.json (spec, generation,
 * state) and files/fake-files.json (logs). Also the page servers of lazy dumps in flight, shared
 * by all fakes of the process, so a lazy restore from an address nobody serves fails as for real.
 */
import { mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { ContainerSpec, MigrationMode } from '../../shared/protocol.js';
import type { MigrationPaths } from './types.js';

export interface FakeCriuImages {
  /** The migration or checkpoint that wrote it. */
  migrationId: string;
  mode: MigrationMode;
  spec: ContainerSpec;
  generation: number;
  state: Record<string, unknown>;
}

export interface FakeLogs {
  stdout: string;
  stderr: string;
}

const IMAGE_FILE = 'fake-criu-images.json';
const FILES_FILE = 'fake-files.json';

/** Writes both trees; the sizes of what was written, as a dump reports them. */
export async function writeFakeImages(paths: MigrationPaths, image: FakeCriuImages, logs: FakeLogs): Promise<{ imageBytes: number; filesBytes: number }> {
  await mkdir(paths.images, { recursive: true });
  await mkdir(paths.files, { recursive: true });
  await writeFile(join(paths.images, IMAGE_FILE), JSON.stringify(image));
  await writeFile(join(paths.files, FILES_FILE), JSON.stringify({ logs }));
  return {
    imageBytes: (await stat(join(paths.images, IMAGE_FILE))).size,
    filesBytes: (await stat(join(paths.files, FILES_FILE))).size,
  };
}

/** The images, undefined when there are none (a restore then fails as runc's would); the logs when the files tree has them. */
export async function readFakeImages(paths: MigrationPaths): Promise<{ image?: FakeCriuImages; logs?: FakeLogs }> {
  const image = await readJson<FakeCriuImages>(join(paths.images, IMAGE_FILE));
  const files = await readJson<{ logs: FakeLogs }>(join(paths.files, FILES_FILE));
  return { ...(image ? { image } : {}), ...(files ? { logs: files.logs } : {}) };
}

async function readJson<T>(path: string): Promise<T | undefined> {
  try {
    return JSON.parse(await readFile(path, 'utf8')) as T;
  } catch {
    return undefined;
  }
}

/** Page servers of lazy dumps in flight, "address:port", across all fakes. */
const pageServers = new Set<string>();

export const fakePageServers = {
  key: (ps: { address: string; port: number }): string => `${ps.address}:${ps.port}`,
  has: (key: string): boolean => pageServers.has(key),
  add: (key: string): void => void pageServers.add(key),
  delete: (key: string): void => void pageServers.delete(key),
};
