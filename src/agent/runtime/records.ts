/**
 * The per-container record the real runtime keeps on disk (containers/NAME/state.json): what
 * this node knows of a container that runc's own state does not say.
 */
import { existsSync } from 'node:fs';
import { readdir, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { NotFoundError } from '../../shared/errors.js';
import type { ContainerSpec, MigrationMode } from '../../shared/protocol.js';
import type { ImageConfig } from './images.js';
import type { NodeLayout } from './layout.js';

/** What this node persists about one container. */
export interface ContainerRecord {
  spec: ContainerSpec;
  /** The image as resolved when the container was created here (or prepared for a restore). */
  image: ImageConfig;
  generation: number;
  netns: string;
  ip: string;
  createdAt: string;
  /** Set when the operator stopped it or it exited; cleared when it runs again. */
  stopped?: boolean;
  /** Set while a migration has frozen or is restoring this container. */
  migration?: { id: string; role: 'source' | 'target'; mode: MigrationMode };
  /**
   * Target side: the migration whose restore brought it here. The mark above is gone once the
   * restore returns, but the migration can still fail after it (verify) and abortRestore must
   * then find and remove it. Cleared when the container starts its next migration.
   */
  restoredBy?: string;
}

export class RecordStore {
  constructor(
    private readonly layout: NodeLayout,
    private readonly node: string,
  ) {}

  private path(name: string): string {
    return join(this.layout.containerDir(name), 'state.json');
  }

  /** Names of the containers this node has a directory for. */
  async names(): Promise<string[]> {
    const dir = this.layout.containersDir();
    return existsSync(dir) ? (await readdir(dir)).sort() : [];
  }

  async read(name: string): Promise<ContainerRecord> {
    try {
      return JSON.parse(await readFile(this.path(name), 'utf8')) as ContainerRecord;
    } catch {
      throw new NotFoundError(`no container named '${name}' on node ${this.node}`, { name, node: this.node });
    }
  }

  /** The record, or undefined if there is none. */
  async find(name: string): Promise<ContainerRecord | undefined> {
    return this.read(name).catch(() => undefined);
  }

  async write(rec: ContainerRecord): Promise<void> {
    const path = this.path(rec.spec.name);
    await writeFile(`${path}.tmp`, JSON.stringify(rec, null, 2));
    await rename(`${path}.tmp`, path);
  }
}
