/**
 * restoreIncarnation (target-restore.ts): a lazy restore starts CRIU's lazy-pages daemon while
 * the bundle is made, not after it (it needs only the images); a bundle that fails ends the
 * daemon and leaves the restore undone; a namespace attached for the restore is not asked for its
 * staged interface. The runtime's parts are stand-ins that record when they
 * ran; no runc or CRIU.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { RuntimeContext } from '../../src/agent/runtime/context.js';
import type { ContainerRecord } from '../../src/agent/runtime/records.js';
import { restoreIncarnation } from '../../src/agent/runtime/target-restore.js';

/** How long each stand-in takes: long enough that one after the other differs from both at once. */
const STEP_MS = 60;

function standIns(dir: string, opts: { bundleFails?: boolean } = {}) {
  const events: Array<[string, number]> = [];
  const mark = (what: string) => events.push([what, Date.now()]);
  const slow = (what: string) => async () => {
    mark(`${what} start`);
    await sleep(STEP_MS);
    mark(`${what} end`);
  };
  const ctx = {
    layout: {
      criuWorkDir: (id: string) => join(dir, 'migrations', id, 'criu-work'),
      containerDir: (name: string) => join(dir, 'containers', name),
      migrationImages: (id: string) => join(dir, 'migrations', id, 'images'),
    },
    criu: {
      restoreCommand: async () => {
        await slow('daemon')();
        return { args: ['restore'], log: join(dir, 'restore.log') };
      },
      killLazyPages: () => mark('daemon killed'),
    },
    ensureStagedInterface: async () => mark('staged interface checked'),
    addClusterAddress: async () => undefined,
    mountContainerRootfs: async () => {
      await slow('bundle')();
      if (opts.bundleFails) throw new Error('mount failed');
    },
    writeBundle: async () => undefined,
    runc: { start: async () => mark('runc restore'), destroy: async () => mark('runc destroy') },
    startTarget: (name: string) => ({ name }),
    runcId: () => 'web-2',
    routeClusterAddress: async () => undefined,
    failedLogs: { keepFor: async (err: unknown) => err },
  } as unknown as RuntimeContext;
  return { ctx, events, at: (what: string) => events.find(([w]) => w === what)?.[1] };
}

describe('a lazy restore, in order', () => {
  let dir: string;
  const rec = (): ContainerRecord => ({ spec: { name: 'web', image: 'img', command: [], env: {}, ports: [] }, generation: 2, netns: 'ns', ip: '198.19.1.2', createdAt: '', image: {} } as unknown as ContainerRecord);
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'chipmunk-restore-order-'));
    await mkdir(join(dir, 'containers', 'web'), { recursive: true });
    await mkdir(join(dir, 'migrations', 'm1', 'images'), { recursive: true });
  });
  after(() => rm(dir, { recursive: true, force: true }));

  it('starts the lazy-pages daemon while the bundle is made, and runc restore after both', async () => {
    const { ctx, at } = standIns(dir);
    await restoreIncarnation(ctx, rec(), {} as never, 'm1', 'lazy', { address: '198.18.4.11', port: 27000 });
    assert.ok(at('daemon start')! < at('bundle end')!, 'the daemon started before the bundle was made');
    assert.ok(at('runc restore')! >= Math.max(at('daemon end')!, at('bundle end')!), 'runc restore waits for both');
  });

  it("asks for the staged interface only in a namespace not attached for this restore (a rollback's)", async () => {
    const fresh = standIns(dir);
    await restoreIncarnation(fresh.ctx, rec(), {} as never, 'm1', 'copy', undefined, undefined, true);
    assert.equal(fresh.at('staged interface checked'), undefined);
    const reused = standIns(dir);
    await restoreIncarnation(reused.ctx, rec(), {} as never, 'm1', 'copy', undefined);
    assert.ok(reused.at('staged interface checked'));
  });

  it('a bundle that fails ends the daemon, and runc restore never runs', async () => {
    const { ctx, at } = standIns(dir, { bundleFails: true });
    await assert.rejects(restoreIncarnation(ctx, rec(), {} as never, 'm1', 'lazy', { address: '198.18.4.11', port: 27000 }), /mount failed/);
    assert.ok(at('daemon killed')! >= at('daemon end')!, 'the daemon is ended once it has started');
    assert.equal(at('runc restore'), undefined);
  });
});
