/**
 * CRIU logs of failed dumps, checkpoints and restores, kept for the operator: the error names
 * the log, and the directory CRIU wrote it in (a checkpoint's, a migration's) is removed with
 * the rest of the failed attempt. They move to failed-logs/OP-ID/; the newest KEEP stay.
 */
import { existsSync } from 'node:fs';
import { mkdir, readdir, rename, stat, utimes } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { RuntimeFailedError } from '../../shared/errors.js';
import { removeTree } from '../../shared/remove-tree.js';

export const FAILED_LOGS_KEPT = 20;

export type FailedOperation = 'dump' | 'checkpoint' | 'restore';

export class FailedLogs {
  constructor(
    private readonly dir: string,
    private readonly keep = FAILED_LOGS_KEPT,
  ) {}

  /**
   * If `err` names a log in `workDir`, moves the logs there (*.log) to failed-logs/OP-ID/ and
   * returns the error naming the kept copy; any other error is returned as it is. Never throws:
   * failing to keep a log must not hide the failure it explains.
   */
  async keepFor(err: unknown, op: FailedOperation, id: string, workDir: string): Promise<unknown> {
    if (!(err instanceof RuntimeFailedError)) return err;
    const logPath = err.details.logPath;
    if (typeof logPath !== 'string' || relative(workDir, logPath).startsWith('..')) return err;
    try {
      const kept = join(this.dir, `${op}-${id}`);
      await removeTree(kept);
      await mkdir(kept, { recursive: true });
      for (const entry of existsSync(workDir) ? await readdir(workDir) : []) {
        if (entry.endsWith('.log')) await rename(join(workDir, entry), join(kept, entry));
      }
      // Ordered by when they failed, not by when CRIU last wrote to them.
      const now = new Date();
      await utimes(kept, now, now);
      await this.prune();
      const moved = (text: string) => text.split(workDir).join(kept);
      return new RuntimeFailedError(moved(err.message), { ...err.details, op: String(err.details.op), logPath: moved(logPath) }, err.cause);
    } catch {
      return err;
    }
  }

  /** The kept directories, oldest first. */
  async list(): Promise<string[]> {
    if (!existsSync(this.dir)) return [];
    const entries = await Promise.all((await readdir(this.dir)).map(async (name) => ({ name, mtimeMs: (await stat(join(this.dir, name))).mtimeMs })));
    return entries.sort((a, b) => a.mtimeMs - b.mtimeMs || a.name.localeCompare(b.name)).map((e) => e.name);
  }

  private async prune(): Promise<void> {
    const all = await this.list();
    for (const name of all.slice(0, Math.max(0, all.length - this.keep))) await removeTree(join(this.dir, name));
  }
}
