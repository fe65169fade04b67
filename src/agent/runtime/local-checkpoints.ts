/**
 * Checkpoints taken on this node: the container runs on, its memory and files wait under
 * checkpoints/ID until the agent uploads them to the checkpoint store, then are discarded.
 */
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { ConflictError, RuntimeFailedError } from '../../shared/errors.js';
import { lastLines } from '../../shared/exec.js';
import { removeTree } from '../../shared/remove-tree.js';
import { copyTree, finishCopy, preCopy } from './checkpoint-files.js';
import { treeBytes, type RuntimeContext } from './context.js';
import { removeCriuNetworkLock } from './criu.js';
import { layerImagePath } from './rootfs.js';
import type { FrozenPhases, LocalCheckpoint, MigrationPaths } from './types.js';

export class LocalCheckpoints {
  constructor(private readonly ctx: RuntimeContext) {}

  /**
   * runc pause first: the cgroup freezer holds every task while the files are copied and CRIU
   * dumps (it dumps a paused container and leaves it paused); so files and memory are of the
   * same instant. A directory layer is copied before the freeze, while the container runs, and
   * only what changed since inside it (checkpoint-files.ts); an image layer (one file) wholly
   * inside it. The copy and the dump run one after the other: side by side they fought for the
   * disk and the CPU and froze PostgreSQL longer (bench/results/checkpoint-freeze.md). TCP connections are not
   * dumped (criu.conf: tcp-close): a restore from a checkpoint happens after a failure, when
   * those connections are gone anyway.
   */
  async checkpoint(name: string, checkpointId: string): Promise<LocalCheckpoint> {
    const { ctx } = this;
    const method = ctx.opts.checkpointFreeze ?? 'pre-copy';
    return ctx.withLock(name, async () => {
      const rec = await ctx.records.read(name);
      ctx.assertNotMigrating(rec);
      const id = ctx.runcId(rec);
      if ((await ctx.runc.state(id))?.status !== 'running') {
        throw new ConflictError(`container '${name}' is not running on node ${ctx.node}; only running containers can be checkpointed`, { name });
      }
      const dir = ctx.layout.checkpointDir(checkpointId);
      const paths: MigrationPaths = { images: join(dir, 'images'), files: join(dir, 'files') };
      const work = join(dir, 'criu-work');
      await removeTree(dir);
      await mkdir(paths.images, { recursive: true });
      await mkdir(work, { recursive: true });
      const what = `checkpoint of '${name}'`;
      const failed = (op: string, stderr: string) => new RuntimeFailedError(`${what} failed (${op}): ${lastLines(stderr, 3)}`, { op, stderr: lastLines(stderr, 20) });
      const files = join(ctx.layout.containerDir(name), 'files');

      const phases: FrozenPhases = { preCopyMs: 0, pauseMs: 0, filesMs: 0, dumpMs: 0, resumeMs: 0 };
      const timed = async <T>(phase: keyof FrozenPhases, step: () => Promise<T>): Promise<T> => {
        const began = Date.now();
        try {
          return await step();
        } finally {
          phases[phase] = Date.now() - began;
        }
      };
      const preCopied = method === 'pre-copy' && !existsSync(layerImagePath(files)) ? await timed('preCopyMs', () => preCopy(files, paths.files)) : undefined;
      const copyFiles = async () => {
        await ctx.syncLayer(name);
        if (preCopied) await finishCopy(preCopied);
        else await copyTree(files, paths.files);
      };
      const dump = () => ctx.criu.dumpLeavingRunning(id, what, paths.images, work);

      const frozenAt = Date.now();
      ctx.freezes.begin(name);
      const paused = await timed('pauseMs', () => ctx.runc.exec(['pause', id], { inHostNetns: true }));
      if (paused.code !== 0) {
        ctx.freezes.end(name);
        throw failed('runc pause', paused.stderr);
      }
      let failure: unknown;
      try {
        await timed('filesMs', copyFiles);
        await timed('dumpMs', dump);
      } catch (err) {
        failure = err;
      }
      const resumed = await timed('resumeMs', () => ctx.runc.exec(['resume', id], { inHostNetns: true }));
      ctx.freezes.end(name);
      const frozenMs = Date.now() - frozenAt;
      await removeCriuNetworkLock(await ctx.containerNetnsPath(rec));
      // A container left frozen is worse than a lost checkpoint: that error wins.
      if (resumed.code !== 0) throw failed('runc resume: the container may still be frozen', resumed.stderr);
      if (failure) throw failure;
      return { paths, frozenMs, frozenPhases: phases, imageBytes: await treeBytes(paths.images), filesBytes: await treeBytes(paths.files) };
    }).catch(async (err: unknown) => {
      const dir = ctx.layout.checkpointDir(checkpointId);
      const kept = await ctx.failedLogs.keepFor(err, 'checkpoint', checkpointId, join(dir, 'criu-work'));
      await removeTree(dir).catch(() => undefined);
      throw kept;
    });
  }

  async discardCheckpoint(checkpointId: string): Promise<void> {
    await removeTree(this.ctx.layout.checkpointDir(checkpointId));
  }

  async recoverInterruptedCheckpoints(): Promise<string[]> {
    const { ctx } = this;
    await removeTree(ctx.layout.checkpointsDir());
    // Agents up to chipmunk 0.1.0 kept them in snapshots/: an upgraded node drops those too.
    await removeTree(join(ctx.layout.dataDir, 'snapshots'));
    const resumed: string[] = [];
    for (const rec of await ctx.records.readable()) {
      const name = rec.spec.name;
      const id = ctx.runcId(rec);
      // chipmunk pauses containers only inside a checkpoint, so a paused one is a leftover;
      // except one a migration's dump froze (lazy mode): the controller settles that one.
      if (rec.migration || (await ctx.runc.state(id))?.status !== 'paused') continue;
      const res = await ctx.runc.exec(['resume', id], { timeoutMs: 30_000 });
      if (res.code !== 0) throw new RuntimeFailedError(`container '${name}' was left paused by an interrupted checkpoint and cannot be resumed: ${lastLines(res.stderr, 3)}`, { op: 'runc resume' });
      await removeCriuNetworkLock(await ctx.containerNetnsPath(rec));
      resumed.push(name);
    }
    return resumed;
  }
}
