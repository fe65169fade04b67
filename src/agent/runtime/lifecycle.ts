/**
 * Containers that stay on this node: run, inspect, stop, remove, logs, stats.
 */
import { existsSync } from 'node:fs';
import { mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ConflictError, InvalidInputError, NotFoundError, StateCorruptError } from '../../shared/errors.js';
import type { AgentContainer, ContainerSpec, ContainerStats } from '../../shared/protocol.js';
import { MIN_MEMORY_BYTES } from '../../shared/units.js';
import { killOrphanedCriuProcesses } from './criu.js';
import { killProcessTree } from './process-tree.js';
import type { RuntimeContext } from './context.js';
import type { ContainerRecord } from './records.js';
import type { LogStream, RemoveOptions } from './types.js';

export class ContainerLifecycle {
  constructor(private readonly ctx: RuntimeContext) {}

  async run(spec: ContainerSpec): Promise<AgentContainer> {
    const { ctx } = this;
    if (spec.memoryBytes > 0 && spec.memoryBytes < MIN_MEMORY_BYTES) {
      throw new InvalidInputError(`memory limit ${spec.memoryBytes} bytes is too small: give at least 6m`, { memoryBytes: spec.memoryBytes });
    }
    return ctx.withLock(spec.name, async () => {
      const dir = ctx.layout.containerDir(spec.name);
      if (existsSync(dir)) {
        throw new ConflictError(`a container named '${spec.name}' already exists on node ${ctx.node}: pick another name or remove it first`, {
          name: spec.name,
        });
      }
      await ctx.assertPortsFree(spec);
      const image = await ctx.images.inspect(spec.image);
      const undo: Array<() => Promise<void>> = [];
      try {
        await mkdir(ctx.layout.logDir(spec.name), { recursive: true });
        undo.push(() => ctx.removeContainerDir(spec.name));
        const rec: ContainerRecord = {
          spec,
          image,
          generation: 0,
          netns: ctx.layout.netnsName(spec.name, 0),
          ip: '',
          createdAt: new Date().toISOString(),
          userNamespace: ctx.opts.userNamespace ?? true,
        };
        await ctx.mountContainerRootfs(spec.name, image);
        const att = await ctx.network.attach(rec.netns, ctx.cniId(rec), spec);
        undo.push(() => ctx.network.detach(rec.netns, ctx.cniId(rec), spec));
        rec.ip = att.ip;
        await ctx.addClusterAddress(rec);
        await ctx.writeBundle(rec, image);
        await ctx.records.write(rec);
        await ctx.runc.start(ctx.startTarget(spec.name), ['run', '-d', '--bundle', dir, ctx.runcId(rec)], 'runc run');
        undo.push(() => ctx.runc.destroy(ctx.runcId(rec)));
        await ctx.routeClusterAddress(rec);
        return await ctx.view(rec);
      } catch (err) {
        for (const u of undo.reverse()) await u().catch(() => undefined);
        throw err;
      }
    });
  }

  async get(name: string): Promise<AgentContainer> {
    return this.ctx.view(await this.ctx.records.read(name));
  }

  /** A container whose record is damaged is listed as `unknown` with the error, never left out. */
  async list(): Promise<AgentContainer[]> {
    const out: AgentContainer[] = [];
    for (const n of await this.ctx.records.names()) {
      try {
        out.push(await this.get(n));
      } catch (err) {
        if (err instanceof StateCorruptError) out.push(damagedView(n, err));
        else if (!(err instanceof NotFoundError)) throw err;
      }
    }
    return out;
  }

  async stop(name: string, opts: { timeoutMs?: number } = {}): Promise<AgentContainer> {
    const { ctx } = this;
    return ctx.withLock(name, async () => {
      const rec = await ctx.records.read(name);
      ctx.assertNotMigrating(rec);
      const id = ctx.runcId(rec);
      const state = await ctx.runc.state(id);
      if (state?.status === 'running' || state?.status === 'paused') {
        await ctx.runc.exec(['kill', id, 'TERM']);
        const deadline = Date.now() + (opts.timeoutMs ?? 10_000);
        while (Date.now() < deadline && (await ctx.runc.state(id))?.status === 'running') await sleep(100);
        if ((await ctx.runc.state(id))?.status === 'running') await ctx.runc.exec(['kill', id, 'KILL']);
      }
      rec.stopped = true;
      await ctx.records.write(rec);
      return ctx.view(rec);
    });
  }

  async remove(name: string, opts: RemoveOptions = {}): Promise<void> {
    const { ctx } = this;
    await ctx.withLock(name, async () => {
      const rec = await ctx.records.read(name);
      // Fenced (it runs elsewhere now), even a copy a migration holds goes, with its dump
      // process or lazy-pages daemon and its migration data.
      if (!opts.fenced) ctx.assertNotMigrating(rec);
      const state = await ctx.runc.state(ctx.runcId(rec));
      if (state?.status === 'running' && !opts.force) {
        throw new ConflictError(`container '${name}' is running: stop it first or remove it with force`, { name });
      }
      if (rec.migration) {
        const dumpPid = ctx.sources.get(rec.migration.id)?.dump?.process.pid;
        if (dumpPid !== undefined) await killProcessTree(dumpPid);
        ctx.sources.delete(rec.migration.id);
        ctx.criu.killLazyPages(rec.migration.id);
        // Those a previous agent process started (it died during the migration).
        await killOrphanedCriuProcesses(ctx.layout.migrationImages(rec.migration.id));
      }
      await ctx.removeContainer(rec);
      if (rec.migration) await ctx.removeMigrationDir(rec.migration.id);
      // A restored copy not settled yet still has its migration's images here.
      if (rec.restoredBy) {
        ctx.criu.killLazyPages(rec.restoredBy);
        await killOrphanedCriuProcesses(ctx.layout.migrationImages(rec.restoredBy));
        await ctx.removeMigrationDir(rec.restoredBy);
      }
    });
  }

  async logs(name: string, opts: { stream?: LogStream; tailLines?: number } = {}): Promise<string> {
    await this.ctx.records.read(name);
    const logDir = this.ctx.layout.logDir(name);
    const read = async (f: string) => (existsSync(join(logDir, f)) ? readFile(join(logDir, f), 'utf8') : '');
    const stream = opts.stream ?? 'all';
    let text = stream === 'stdout' ? await read('stdout.log') : stream === 'stderr' ? await read('stderr.log') : (await read('stdout.log')) + (await read('stderr.log'));
    if (opts.tailLines !== undefined) text = text.split('\n').slice(-opts.tailLines - 1).join('\n');
    return text;
  }

  async stats(name: string): Promise<ContainerStats> {
    const rec = await this.ctx.records.read(name);
    const res = await this.ctx.runc.exec(['events', '--stats', this.ctx.runcId(rec)], { timeoutMs: 10_000 });
    if (res.code !== 0) throw new ConflictError(`container '${name}' is not running, so it has no stats`, { name });
    const data = (JSON.parse(res.stdout) as { data?: Record<string, any> }).data ?? {};
    const limit = data.memory?.usage?.limit;
    return {
      name,
      cpuUsageNs: Number(data.cpu?.usage?.total ?? 0),
      memoryBytes: Number(data.memory?.usage?.usage ?? 0),
      ...(limit && limit < 2 ** 62 ? { memoryLimitBytes: Number(limit) } : {}),
      pids: Number(data.pids?.current ?? 0),
    };
  }
}

/** What can be said of a container whose record is damaged: its name, and why nothing more. */
function damagedView(name: string, err: StateCorruptError): AgentContainer {
  return {
    name,
    spec: { name, image: 'unknown', command: [], env: {}, ports: [], memoryBytes: 0 },
    status: 'unknown',
    generation: 0,
    createdAt: new Date(0).toISOString(),
    error: { code: err.code, message: err.message },
  };
}
