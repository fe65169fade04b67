/**
 * The per-container record the real runtime keeps on disk (containers/NAME/state.json): what
 * this node knows of a container that runc's own state does not say.
 *
 * Written durably (temporary file, fsync, rename, fsync of the directory), after the previous
 * good record is saved as state.json.prev. Read honestly: no file is "no such container", but
 * a file that cannot be read, parsed or validated is a damaged record (StateCorruptError), never
 * an absent one; the previous copy stands in for it, with a warning, when it is good.
 */
import { existsSync } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Type, type Static } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import { writeFileDurably } from '../../shared/durable.js';
import { NotFoundError, StateCorruptError } from '../../shared/errors.js';
import { ContainerSpec, MigrationMode } from '../../shared/protocol.js';
import type { NodeLayout } from './layout.js';

const ImageConfigRecord = Type.Object({
  id: Type.String(),
  entrypoint: Type.Array(Type.String()),
  cmd: Type.Array(Type.String()),
  env: Type.Array(Type.String()),
  workingDir: Type.String(),
  lowerDirs: Type.Optional(Type.String()),
});

/** What this node persists about one container. */
export const ContainerRecord = Type.Object({
  spec: ContainerSpec,
  /** The image as resolved when the container was created here (or prepared for a restore). */
  image: ImageConfigRecord,
  generation: Type.Integer({ minimum: 0 }),
  /** The network namespace CNI attached (with a user namespace, a staging one: network.ts). */
  netns: Type.String(),
  ip: Type.String(),
  /**
   * The incarnation runs in a user namespace of its own (bundle.ts): set at run from the node's
   * setting, at a restore from the dump. Absent in records of older agents: none.
   */
  userNamespace: Type.Optional(Type.Boolean()),
  createdAt: Type.String(),
  /** Set when the operator stopped it or it exited; cleared when it runs again. */
  stopped: Type.Optional(Type.Boolean()),
  /** Set while a migration has frozen or is restoring this container. */
  migration: Type.Optional(Type.Object({ id: Type.String(), role: Type.Union([Type.Literal('source'), Type.Literal('target')]), mode: MigrationMode })),
  /**
   * Target side: the migration whose restore brought it here. The mark above is gone once the
   * restore returns, but the migration can still fail after it (verify) and abortRestore must
   * then find and remove it. Cleared when the container starts its next migration.
   */
  restoredBy: Type.Optional(Type.String()),
});
export type ContainerRecord = Static<typeof ContainerRecord>;

export type RecordWarning = (message: string, details: Record<string, unknown>) => void;

type Loaded = { state: 'ok'; record: ContainerRecord; raw: string } | { state: 'missing' } | { state: 'damaged'; reason: string };

export class RecordStore {
  /** Damaged records already warned about (by path), so a fallback is reported once, not on every read. */
  private readonly warned = new Set<string>();

  constructor(
    private readonly layout: NodeLayout,
    private readonly node: string,
    private readonly warn: RecordWarning,
  ) {}

  path(name: string): string {
    return join(this.layout.containerDir(name), 'state.json');
  }

  /** Names of the containers this node has a directory for. */
  async names(): Promise<string[]> {
    const dir = this.layout.containersDir();
    return existsSync(dir) ? (await readdir(dir)).sort() : [];
  }

  /** NotFoundError if there is no record; StateCorruptError if it and its previous copy are damaged. */
  async read(name: string): Promise<ContainerRecord> {
    const path = this.path(name);
    const current = await this.load(path, name);
    if (current.state === 'ok') {
      this.warned.delete(path);
      return current.record;
    }
    if (current.state === 'missing') throw new NotFoundError(`no container named '${name}' on node ${this.node}`, { name, node: this.node });
    const previous = await this.load(`${path}.prev`, name);
    if (previous.state === 'ok') {
      if (!this.warned.has(path)) {
        this.warned.add(path);
        this.warn(`the record of container '${name}' is damaged (${current.reason}); using the previous copy ${path}.prev until the next change rewrites it`, {
          name,
          path,
          reason: current.reason,
        });
      }
      return previous.record;
    }
    throw new StateCorruptError(
      `the record of container '${name}' on node ${this.node} is damaged: ${path}: ${current.reason}, and there is no good previous copy ` +
        `(${path}.prev: ${previous.state === 'missing' ? 'absent' : previous.reason}). The container may still run (\`runc --root ${this.layout.runcRoot()} list\`): ` +
        `repair the file from a backup, or stop the container with runc and remove ${this.layout.containerDir(name)}`,
      { path, name, node: this.node, reason: current.reason },
    );
  }

  /** The record, or undefined if there is none; a damaged one throws (it is not absent). */
  async find(name: string): Promise<ContainerRecord | undefined> {
    try {
      return await this.read(name);
    } catch (err) {
      if (err instanceof NotFoundError) return undefined;
      throw err;
    }
  }

  /**
   * Every readable record, for the scans that look for one among all (a migration's, a port's
   * user): a damaged record is reported and passed over, so one bad file does not stop the rest.
   */
  async readable(): Promise<ContainerRecord[]> {
    const out: ContainerRecord[] = [];
    for (const name of await this.names()) {
      try {
        const rec = await this.find(name);
        if (rec) out.push(rec);
      } catch (err) {
        if (!(err instanceof StateCorruptError)) throw err;
        this.warn(`skipping container '${name}': ${err.message}`, { name, path: err.details.path });
      }
    }
    return out;
  }

  async write(rec: ContainerRecord): Promise<void> {
    const path = this.path(rec.spec.name);
    const current = await this.load(path, rec.spec.name);
    // Only a good record becomes the fallback: a damaged one would push the last good copy out.
    if (current.state === 'ok') await writeFileDurably(`${path}.prev`, current.raw);
    await writeFileDurably(path, JSON.stringify(rec, null, 2));
    this.warned.delete(path);
  }

  private async load(path: string, name: string): Promise<Loaded> {
    let raw: string;
    try {
      raw = await readFile(path, 'utf8');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return { state: 'missing' };
      return { state: 'damaged', reason: `cannot be read (${code ?? (err as Error).message})` };
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(raw);
    } catch (err) {
      return { state: 'damaged', reason: `not valid JSON (${(err as Error).message})` };
    }
    if (!Value.Check(ContainerRecord, parsed)) {
      const first = [...Value.Errors(ContainerRecord, parsed)][0];
      return { state: 'damaged', reason: `not a container record (${first?.path || '/'}: ${first?.message})` };
    }
    if (parsed.spec.name !== name) return { state: 'damaged', reason: `it describes container '${parsed.spec.name}'` };
    return { state: 'ok', record: parsed, raw };
  }
}
