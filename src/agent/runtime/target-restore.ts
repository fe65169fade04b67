/**
 * A migration (or a restore from a stored checkpoint) as its target node sees it: prepare the
 * network before the source freezes, restore from the fetched trees, then settle (last lazy
 * page in) or abort (nothing of it left).
 */
import { existsSync } from 'node:fs';
import { mkdir, readdir, rename } from 'node:fs/promises';
import { join } from 'node:path';
import { leverOff } from '../../shared/downtime-levers.js';
import { ConflictError, InvalidInputError, RuntimeFailedError } from '../../shared/errors.js';
import type { AgentContainer, ContainerSpec, MigrationMode } from '../../shared/protocol.js';
import { StepClock } from '../../shared/steps.js';
import type { RuntimeContext } from './context.js';
import { CRIU_LOG, PAGE_DRAIN_TIMEOUT_MS, assertLazyRestorePossible, criuFailureSummary, dumpedWithUserNamespace, keptConnections, killOrphanedCriuProcesses, writeCriuOptions, type PageServer } from './criu.js';
import { prepareCriuKernelCache } from '../host/criu-kernel-cache.js';
import { criuLogSteps } from './criu-steps.js';
import type { ImageConfig } from './images.js';
import type { ContainerRecord } from './records.js';
import type { PrepareOptions, RestoreOptions } from './types.js';

export class TargetRestores {
  constructor(private readonly ctx: RuntimeContext) {}

  async prepareRestore(spec: ContainerSpec, opts: PrepareOptions): Promise<void> {
    const { ctx } = this;
    // Before the freeze: the restore's CRIU runs (restore, lazy-pages daemon) then skip probing the kernel.
    if (!leverOff('kerndat-cache')) await prepareCriuKernelCache(ctx.opts.criuPath);
    await ctx.withLock(spec.name, async () => {
      const existing = await ctx.records.find(spec.name);
      if (existing?.migration?.id === opts.migrationId && existing.migration.role === 'target') return;
      if (existing) throw new ConflictError(`node ${ctx.node} already has a container named '${spec.name}'`, { name: spec.name });
      await ctx.assertPortsFree(spec);
      const image = await ctx.images.inspect(spec.image);
      const rec = this.targetRecord(spec, image, opts);
      await mkdir(ctx.layout.containerDir(spec.name), { recursive: true });
      await ctx.records.write(rec);
      try {
        rec.ip = (await ctx.network.attach(rec.netns, ctx.cniId(rec), spec)).ip;
        await ctx.records.write(rec);
      } catch (err) {
        await ctx.removeContainerDir(spec.name).catch(() => undefined);
        throw err;
      }
    });
  }

  async restore(spec: ContainerSpec, opts: RestoreOptions): Promise<AgentContainer> {
    const { ctx } = this;
    if (opts.mode === 'lazy' && !opts.pageServer) throw new InvalidInputError('lazy restore needs the source page server address and port');
    return ctx.withLock(spec.name, async () => {
      const dir = ctx.layout.containerDir(spec.name);
      const prepared = await ctx.records.find(spec.name);
      const isPrepared = prepared?.migration?.id === opts.migrationId && prepared.migration.role === 'target';
      if (prepared && !isPrepared) {
        throw new ConflictError(`node ${ctx.node} already has a container named '${spec.name}'`, { name: spec.name });
      }
      if (!isPrepared) await ctx.assertPortsFree(spec);
      // Prepared: image and network were resolved before the freeze; nothing to ask Podman now.
      const rec = isPrepared ? prepared! : this.targetRecord(spec, await ctx.images.inspect(spec.image), opts);
      await mkdir(dir, { recursive: true });
      const incoming = join(ctx.layout.migrationDir(opts.migrationId), 'files');
      if (existsSync(incoming)) await rename(incoming, join(dir, 'files'));
      await mkdir(join(dir, 'files'), { recursive: true });
      await mkdir(ctx.layout.logDir(spec.name), { recursive: true });
      await ctx.records.write(rec);
      try {
        if (!rec.ip) {
          rec.ip = (await ctx.network.attach(rec.netns, ctx.cniId(rec), spec)).ip;
          await ctx.records.write(rec);
        }
        // Its network was attached for this migration (prepare, or just above): the staged interface is there.
        const restored = await restoreIncarnation(ctx, rec, rec.image, opts.migrationId, opts.mode, opts.pageServer, opts.steps, true);
        delete restored.migration;
        restored.restoredBy = opts.migrationId;
        await ctx.records.write(restored);
        return await ctx.view(restored);
      } catch (err) {
        // Leave nothing of a failed restore: the source still has the container.
        await ctx.network.detach(rec.netns, ctx.cniId(rec), spec).catch(() => undefined);
        await ctx.removeContainerDir(spec.name).catch(() => undefined);
        throw err;
      }
    });
  }

  private targetRecord(spec: ContainerSpec, image: ImageConfig, opts: { migrationId: string; generation: number; mode: MigrationMode }): ContainerRecord {
    return {
      spec,
      image,
      generation: opts.generation,
      netns: this.ctx.layout.netnsName(spec.name, opts.generation),
      ip: '',
      createdAt: new Date().toISOString(),
      migration: { id: opts.migrationId, role: 'target', mode: opts.mode },
    };
  }

  async settleRestore(migrationId: string): Promise<{ lazyPagesBytes: number }> {
    const { ctx } = this;
    const lazyPages = await ctx.criu.lazyPagesEnded(migrationId, PAGE_DRAIN_TIMEOUT_MS);
    const work = ctx.layout.criuWorkDir(migrationId);
    const lazyPagesBytes = await ctx.criu.lazyPagesBytes(work);
    let lazyPagesFailed: string | undefined;
    if (lazyPages.failed) {
      // Its log (kept, in failed-logs/) says why; CRIU's own words go into the message.
      const logPath = join(work, CRIU_LOG.lazyPages);
      const summary = await criuFailureSummary(logPath);
      const kept = await ctx.failedLogs.keepFor(new RuntimeFailedError(lazyPages.failed, { op: 'criu lazy-pages', logPath }), 'restore', migrationId, work);
      lazyPagesFailed = `${lazyPages.failed}${summary ? `: ${summary}` : ''}${kept instanceof RuntimeFailedError && typeof kept.details.logPath === 'string' ? ` (log: ${kept.details.logPath})` : ''}`;
    }
    await ctx.removeMigrationDir(migrationId);
    // Settled: the copy is the container now, and no later abort of this migration may touch it.
    const name = await ctx.findByMigration(migrationId, 'target').catch(() => undefined);
    if (name) {
      await ctx.withLock(name, async () => {
        const rec = await ctx.records.read(name);
        if (rec.restoredBy !== migrationId) return;
        delete rec.restoredBy;
        await ctx.records.write(rec);
      });
    }
    return { lazyPagesBytes, ...(lazyPagesFailed ? { lazyPagesFailed } : {}) };
  }

  /**
   * At agent start: a copy this node was restoring or preparing as a target that does not run,
   * and migration data no container record refers to (a restore from the checkpoint store, or a
   * target's staging, whose agent died), are removed. Returns what went.
   */
  async removeAbandoned(): Promise<string[]> {
    const { ctx } = this;
    const removed: string[] = [];
    const records = await ctx.records.readable();
    const kept: ContainerRecord[] = [];
    for (const rec of records) {
      // A target's copy (prepared, restoring, or restored and not yet settled) that does not run died with the agent's host.
      const targetOf = rec.migration?.role === 'target' ? rec.migration.id : rec.restoredBy;
      if (!targetOf || (await ctx.runc.state(ctx.runcId(rec)))?.status === 'running') {
        kept.push(rec);
        continue;
      }
      await killOrphanedCriuProcesses(ctx.layout.migrationImages(targetOf));
      await ctx.withLock(rec.spec.name, () => ctx.removeContainer(rec));
      await ctx.removeMigrationDir(targetOf);
      removed.push(`${rec.spec.name} (target of ${targetOf})`);
    }
    // A source's dump, and a running restored copy's images until the controller settles it (lazy pages may still arrive), stay.
    const referenced = new Set(kept.flatMap((rec) => [rec.migration?.role === 'source' ? rec.migration.id : undefined, rec.restoredBy]).filter((id): id is string => id !== undefined));
    const migrations = join(ctx.layout.dataDir, 'migrations');
    for (const id of existsSync(migrations) ? await readdir(migrations) : []) {
      if (referenced.has(id)) continue;
      await ctx.removeMigrationDir(id);
      removed.push(`migrations/${id}`);
    }
    return removed;
  }

  async abortRestore(migrationId: string): Promise<void> {
    const { ctx } = this;
    ctx.criu.killLazyPages(migrationId);
    await killOrphanedCriuProcesses(ctx.layout.migrationImages(migrationId));
    const name = await ctx.findByMigration(migrationId, 'target').catch(() => undefined);
    if (name) await ctx.withLock(name, async () => ctx.removeContainer(await ctx.records.read(name)));
    // A failed restore's logs, which its error names, were kept in failed-logs/ already.
    await ctx.removeMigrationDir(migrationId);
  }
}

/**
 * Restores `rec` (generation already set) from the migration's images into its record's
 * network namespace; on failure nothing of the new incarnation is left. `freshNetwork`: the
 * namespace was attached for this restore, so its staged interface needs no check.
 */
export async function restoreIncarnation(
  ctx: RuntimeContext,
  rec: ContainerRecord,
  image: ImageConfig,
  migrationId: string,
  mode: MigrationMode,
  pageServer: PageServer | undefined,
  steps = new StepClock(),
  freshNetwork = false,
): Promise<ContainerRecord> {
  const name = rec.spec.name;
  const work = ctx.layout.criuWorkDir(migrationId);
  const containerDir = ctx.layout.containerDir(name);
  const images = ctx.layout.migrationImages(migrationId);
  await mkdir(work, { recursive: true });
  rec.userNamespace = await dumpedWithUserNamespace(images);
  if (mode === 'lazy') await assertLazyRestorePossible(rec.userNamespace);
  const command = () => ctx.criu.restoreCommand(migrationId, { images, work, bundle: containerDir, mode, pageServer });
  // The lazy-pages daemon needs only the images: it starts while the bundle is made.
  const early = mode === 'lazy' && !leverOff('daemon-overlap') ? steps.time('lazy-pages-daemon', command) : undefined;
  early?.catch(() => undefined);
  try {
    await steps.time('bundle', async () => {
      // A rollback's namespace gave its interface to the dumped incarnation; a fresh one still holds it.
      if (!freshNetwork || leverOff('fresh-network')) await ctx.ensureStagedInterface(rec);
      await ctx.addClusterAddress(rec);
      await ctx.mountContainerRootfs(name, image);
      await ctx.writeBundle(rec, image);
      await writeCriuOptions(containerDir, 'restore', keptConnections(images));
    });
  } catch (err) {
    await early?.catch(() => undefined);
    ctx.criu.killLazyPages(migrationId);
    throw err;
  }
  try {
    const restore = await (early ?? (mode === 'lazy' ? steps.time('lazy-pages-daemon', command) : command()));
    await steps.time('runc-restore', () => ctx.runc.start(ctx.startTarget(name), [...restore.args, ctx.runcId(rec)], 'runc restore', restore.log, restore.daemonFailed));
    steps.addAll(await criuLogSteps(restore.log, 'restore'));
    // The network's unlock: packets for the address reach the restored copy from here on.
    await steps.time('route-address', () => ctx.routeClusterAddress(rec));
  } catch (err) {
    ctx.criu.killLazyPages(migrationId);
    await ctx.runc.destroy(ctx.runcId(rec));
    throw await ctx.failedLogs.keepFor(err, 'restore', migrationId, work);
  } finally {
    await writeCriuOptions(containerDir, 'dump').catch(() => undefined);
  }
  delete rec.stopped;
  return rec;
}
