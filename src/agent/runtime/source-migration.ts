/**
 * A migration as its source node sees it: dump the container (it stops running here), then
 * either roll back (run it here again) or finish (serve the last lazy pages, remove it).
 */
import { existsSync } from 'node:fs';
import { mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CapabilityMissingError, ConflictError, InvalidInputError, RuntimeFailedError } from '../../shared/errors.js';
import type { AgentContainer, DumpState } from '../../shared/protocol.js';
import { leverOff } from '../../shared/downtime-levers.js';
import { StepClock } from '../../shared/steps.js';
import { within } from '../../shared/time.js';
import type { RuntimeContext, SourceMigration } from './context.js';
import { treeBytes } from './context.js';
import { resetUnrestorableConnections } from './connections.js';
import { CRIU_LOG, markKeptConnections, PAGE_DRAIN_TIMEOUT_MS, removeCriuNetworkLock, writeCriuOptions } from './criu.js';
import { killProcessTree } from './process-tree.js';
import type { ContainerRecord } from './records.js';
import { restoreIncarnation } from './target-restore.js';
import type { DumpOptions, DumpOutcome, MigrationPaths } from './types.js';

/** How long a lazy rollback waits for the frozen incarnation to serve its last page and go before it answers. */
const ROLLBACK_DRAIN_MS = 60_000;

export class SourceMigrations {
  constructor(private readonly ctx: RuntimeContext) {}

  /**
   * Source side (a dump of this node's): the container's own files. Target side: a staging
   * directory that `restore` moves into place, so an aborted transfer leaves nothing under
   * containers/.
   */
  migrationPaths(migrationId: string): MigrationPaths {
    const name = this.ctx.sources.get(migrationId)?.name;
    return {
      images: this.ctx.layout.migrationImages(migrationId),
      files: name ? join(this.ctx.layout.containerDir(name), 'files') : join(this.ctx.layout.migrationDir(migrationId), 'files'),
    };
  }

  async dump(name: string, opts: DumpOptions): Promise<DumpOutcome> {
    const { ctx } = this;
    if (opts.mode === 'lazy' && !ctx.opts.capabilities.lazyMigration) {
      throw new CapabilityMissingError(`lazy migration needs userfaultfd, which node ${ctx.node} lacks: use --mode copy`);
    }
    if (opts.mode === 'lazy' && !opts.pageServer) throw new InvalidInputError('a lazy dump needs a page server address and port');
    return ctx.withLock(name, async () => {
      const rec = await ctx.records.read(name);
      ctx.assertNotMigrating(rec);
      const id = ctx.runcId(rec);
      if ((await ctx.runc.state(id))?.status !== 'running') {
        throw new ConflictError(`container '${name}' is not running on node ${ctx.node}; only running containers migrate`, { name });
      }
      const images = ctx.layout.migrationImages(opts.migrationId);
      const work = ctx.layout.criuWorkDir(opts.migrationId);
      await mkdir(images, { recursive: true });
      await mkdir(work, { recursive: true });
      rec.migration = { id: opts.migrationId, role: 'source', mode: opts.mode };
      delete rec.restoredBy;
      await ctx.records.write(rec);

      const mig: SourceMigration = { name, mode: opts.mode, pageServer: opts.pageServer };
      ctx.sources.set(opts.migrationId, mig);
      let frozenAt = Date.now();
      // A container with a cluster address keeps it on the target, and with it its connections (criu.ts).
      const keepConnections = rec.spec.address !== undefined;
      const containerDir = ctx.layout.containerDir(name);
      if (keepConnections) {
        await writeCriuOptions(containerDir, 'dump', true);
        await markKeptConnections(images);
      }
      const steps = opts.steps ?? new StepClock();
      try {
        // What the target could not restore is reset now, or the whole move would roll back (connections.ts).
        const netns = keepConnections ? await ctx.containerNetnsPath(rec) : undefined;
        if (netns) await steps.time('reset-connections', () => resetUnrestorableConnections(netns, rec.spec.address!));
        const frozenFirst = !leverOff('pre-freeze');
        await ctx.criu.dump(id, { name, images, work, mode: opts.mode, pageServer: opts.pageServer, steps, frozenFirst }, (dump) => {
          frozenAt = Date.now();
          mig.dump = dump;
        });
      } catch (err) {
        // The container runs here again (Criu.dump), minus the network lock CRIU may have left.
        await removeCriuNetworkLock(await ctx.containerNetnsPath(rec));
        const current = await ctx.records.read(name);
        delete current.migration;
        await ctx.records.write(current);
        ctx.sources.delete(opts.migrationId);
        const kept = await ctx.failedLogs.keepFor(err, 'dump', opts.migrationId, work);
        await ctx.removeMigrationDir(opts.migrationId);
        throw kept;
      } finally {
        // A later checkpoint of this container (after a rollback) must not keep them.
        if (keepConnections) await writeCriuOptions(containerDir, 'dump').catch(() => undefined);
      }
      // The container is dumped and gone: its layer's last writes go into the image, which travels.
      const sizes = await steps.time('sync-layer', async () => {
        await ctx.syncLayer(name);
        return { imageBytes: await treeBytes(images), upperBytes: await treeBytes(join(ctx.layout.containerDir(name), 'files')) };
      });
      // When it froze: just before the dump's CRIU started (freeze-first.ts), or at CRIU's own
      // freeze (its log names it; runc and CRIU start while the container still runs).
      const freeze = steps.steps.find((s) => s.step === 'pause') ?? steps.steps.find((s) => s.step === 'freeze');
      return { ...sizes, frozenAt: freeze?.at ?? frozenAt };
    });
  }

  async rollback(migrationId: string): Promise<AgentContainer> {
    const { ctx } = this;
    const mig = ctx.sources.get(migrationId);
    const name = mig?.name ?? (await ctx.findByMigration(migrationId, 'source'));
    return ctx.withLock(name, async () => {
      const rec = await ctx.records.read(name);
      // A failed dump unfreezes the container: then it simply still runs here.
      if ((await ctx.runc.state(ctx.runcId(rec)))?.status === 'running' && !isDumping(mig)) {
        await removeCriuNetworkLock(await ctx.containerNetnsPath(rec));
        delete rec.migration;
        await ctx.records.write(rec);
        ctx.sources.delete(migrationId);
        await ctx.removeMigrationDir(migrationId);
        return ctx.view(rec);
      }
      const mode = mig?.mode ?? rec.migration?.mode ?? 'copy';
      if (mode === 'lazy' && isDumping(mig) && (await hasPeer(mig!.dump!.process.pid, mig!.pageServer!.port))) {
        throw new RuntimeFailedError(`cannot roll '${name}' back on node ${ctx.node}: a target is connected to its page server and pulls its memory pages`, { op: 'rollback' });
      }
      if (mode === 'lazy' && !isDumping(mig)) {
        throw new RuntimeFailedError(
          `cannot roll '${name}' back on node ${ctx.node}: its lazy page server has already ended, so its memory is gone`,
          { op: 'rollback', logPath: join(ctx.layout.criuWorkDir(migrationId), CRIU_LOG.dump) },
        );
      }
      const restored = mode === 'copy' ? await this.rollbackCopy(rec, migrationId) : await this.rollbackLazy(rec, migrationId, mig!);
      delete restored.migration;
      await ctx.records.write(restored);
      ctx.sources.delete(migrationId);
      // In lazy mode the restored container is still pulling its memory from the page server:
      // the images go once both CRIU processes are done. Nobody waits for it.
      void this.discardWhenServed(migrationId, mig).catch(() => undefined);
      return ctx.view(restored);
    });
  }

  /**
   * Whether `rollback` can still run the container here. Copy mode: while the dump's images are
   * on disk. Lazy mode: while the page server runs and no target is connected to it; once a
   * target pulls pages the memory is split between the nodes and only the target can go on.
   */
  async dumpState(migrationId: string): Promise<DumpState> {
    const { ctx } = this;
    const mig = ctx.sources.get(migrationId);
    const name = mig?.name ?? (await ctx.findByMigration(migrationId, 'source').catch(() => undefined));
    const no = (reason: string): DumpState => ({ migrationId, canRollBack: false, reason });
    if (!name) return no(`node ${ctx.node} has no dump of migration ${migrationId}`);
    const rec = await ctx.records.read(name);
    if ((await ctx.runc.state(ctx.runcId(rec)))?.status === 'running' && !isDumping(mig)) return { migrationId, canRollBack: true };
    const mode = mig?.mode ?? rec.migration?.mode ?? 'copy';
    if (mode === 'copy') return existsSync(ctx.layout.migrationImages(migrationId)) ? { migrationId, canRollBack: true } : no(`the images of its dump on ${ctx.node} are gone`);
    if (!isDumping(mig)) return no(`the lazy page server on ${ctx.node} has ended: the memory went to the target, or is gone`);
    if (await hasPeer(mig!.dump!.process.pid, mig!.pageServer!.port)) return no(`a target is connected to the page server on ${ctx.node} and pulls memory pages from it`);
    return { migrationId, canRollBack: true };
  }

  /** Same network namespace as before: the container keeps its address. */
  private async rollbackCopy(rec: ContainerRecord, migrationId: string): Promise<ContainerRecord> {
    await this.ctx.runc.destroy(this.ctx.runcId(rec));
    rec.generation += 1;
    return restoreIncarnation(this.ctx, rec, rec.image, migrationId, 'copy', undefined);
  }

  /**
   * The page server sends the frozen tasks' own pages (spliced, not copied) and CRIU kills
   * those tasks after the last one. Killing them earlier corrupts memory it still serves
   * (exiting threads' kernel writes: clear_child_tid, robust futexes; the restored process then
   * crashes at random), and while they live they hold their sockets: so a new namespace (new
   * address), the published ports moved over, and the frozen incarnation and its namespace
   * deleted once the dump's process is done.
   */
  private async rollbackLazy(rec: ContainerRecord, migrationId: string, mig: SourceMigration): Promise<ContainerRecord> {
    const { ctx } = this;
    const frozen = { runcId: ctx.runcId(rec), netns: rec.netns, cniId: ctx.cniId(rec) };
    rec.generation += 1;
    await ctx.network.unmapPorts(frozen.netns, frozen.cniId, rec.spec);
    rec.netns = ctx.layout.netnsName(rec.spec.name, rec.generation);
    let restored: ContainerRecord;
    try {
      rec.ip = (await ctx.network.attach(rec.netns, ctx.cniId(rec), rec.spec)).ip;
      restored = await restoreIncarnation(ctx, rec, rec.image, migrationId, 'lazy', mig.pageServer);
    } catch (err) {
      await ctx.network.detach(rec.netns, ctx.cniId(rec), rec.spec).catch(() => undefined);
      throw err;
    }
    const frozenGone = mig.dump!.done
      .then(async () => {
        await ctx.runc.destroy(frozen.runcId);
        await ctx.network.detach(frozen.netns, frozen.cniId, { ports: [] });
      })
      .catch(() => undefined);
    // The frozen incarnation goes once its last page is served (killing it earlier corrupts the
    // memory it still serves): waited for, bounded, so the caller sees one copy when this returns.
    await within(frozenGone, ROLLBACK_DRAIN_MS);
    return restored;
  }

  /** After a rollback: waits for the lazy-pages daemon and the page server to end, then drops the images. */
  private async discardWhenServed(migrationId: string, mig: SourceMigration | undefined): Promise<void> {
    const waits: Array<Promise<unknown>> = [this.ctx.criu.lazyPagesEnded(migrationId, PAGE_DRAIN_TIMEOUT_MS)];
    if (mig?.dump) waits.push(mig.dump.done);
    await within(Promise.all(waits), PAGE_DRAIN_TIMEOUT_MS);
    await this.ctx.removeMigrationDir(migrationId);
  }

  async finishMigration(migrationId: string): Promise<void> {
    const { ctx } = this;
    const mig = ctx.sources.get(migrationId);
    const name = mig?.name ?? (await ctx.findByMigration(migrationId, 'source').catch(() => undefined));
    if (mig) {
      const drained = mig.dump ? await within(mig.dump.done, PAGE_DRAIN_TIMEOUT_MS) : true;
      if (!drained && mig.dump?.process.pid !== undefined) await killProcessTree(mig.dump.process.pid);
      ctx.sources.delete(migrationId);
    }
    if (name) {
      await ctx.withLock(name, async () => {
        const rec = await ctx.records.find(name);
        if (rec) await ctx.removeContainer(rec);
      });
    }
    await ctx.removeMigrationDir(migrationId);
  }
}

/** The dump's `runc checkpoint` still runs: in lazy mode, its page server still holds the memory. */
function isDumping(mig: SourceMigration | undefined): boolean {
  const child = mig?.dump?.process;
  return child !== undefined && child.exitCode === null && child.signalCode === null;
}

/**
 * Whether a TCP connection to local `port` is established in the network namespace of process
 * `pid` (the page server's: it runs in the node's namespace, which need not be this process's).
 */
async function hasPeer(pid: number | undefined, port: number): Promise<boolean> {
  if (pid === undefined) return false;
  const ESTABLISHED = '01';
  for (const table of ['tcp', 'tcp6']) {
    const text = await readFile(`/proc/${pid}/net/${table}`, 'utf8').catch(() => '');
    for (const line of text.split('\n').slice(1)) {
      const [, local, , state] = line.trim().split(/\s+/);
      if (state === ESTABLISHED && local && parseInt(local.split(':')[1] ?? '', 16) === port) return true;
    }
  }
  return false;
}
