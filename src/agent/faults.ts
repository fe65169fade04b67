/**
 * Fault injection for integration tests and for operators rehearsing failures: off unless the
 * agent starts with CHIPMUNK_ENABLE_FAULTS=1. Faults are armed through an authenticated debug
 * route and fire once. They act on the real thing: the agent process really exits, a transfer
 * really breaks off mid-stream, CRIU really fails on an image it cannot read.
 */
import { readFile, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { FastifyInstance } from 'fastify';
import { Type, type Static } from '@sinclair/typebox';
import { NotFoundError } from '../shared/errors.js';
import { PausePoints, PauseStatus } from '../shared/pause-point.js';

/**
 * Where an agent can be told to pause (src/shared/pause-point.ts):
 * - migration:dump        the source dumped the container (lazy: its page server serves), before answering
 * - migration:transfer    the target fetched the CRIU images, before it fetches the files
 * - restore:pages-pulling lazy target: runc restore returned and the lazy-pages daemon has copied
 *                         pages from the source (its log says so), before answering
 * - restore:done          the target restored the container, before answering
 * - checkpoint:dump       a checkpoint (the container runs on) is dumped, before answering
 * - checkpoint:upload     the upload to the store starts
 * - checkpoint:commit     every chunk is sent, the commit not yet
 */
export const AGENT_PAUSE_STEPS = [
  'migration:dump',
  'migration:transfer',
  'restore:pages-pulling',
  'restore:done',
  'checkpoint:dump',
  'checkpoint:upload',
  'checkpoint:commit',
] as const;
export type AgentPauseStep = (typeof AGENT_PAUSE_STEPS)[number];

/** What CRIU's lazy-pages daemon logs (-v4) when it copies pages into the restored process. */
const PAGES_COPIED = /uffd_copy|#PF at|UFFD transferred pages/;
const PAGES_WAIT_MS = 30_000;

export const FaultPlan = Type.Object({
  /** The target agent process exits (as if killed) when asked to restore, before fetching. */
  dieBeforeRestore: Type.Optional(Type.Boolean()),
  /** The source cuts the next tree transfer after this many bytes. */
  cutTransferAfterBytes: Type.Optional(Type.Integer({ minimum: 0 })),
  /** The target deletes a CRIU image file before restoring, so CRIU's restore fails. */
  corruptImagesBeforeRestore: Type.Optional(Type.Boolean()),
  /** The agent process exits (as if killed) while uploading a checkpoint: chunks sent, commit not. */
  dieBeforeCheckpointCommit: Type.Optional(Type.Boolean()),
  /** Pause at this step (once) until POST /v1/debug/faults/resume, or pauseMaxMs. */
  pauseAt: Type.Optional(Type.Union(AGENT_PAUSE_STEPS.map((step) => Type.Literal(step)))),
  pauseMaxMs: Type.Optional(Type.Integer({ minimum: 1, maximum: 600_000 })),
});
export type FaultPlan = Static<typeof FaultPlan>;

export class FaultInjector {
  private plan: FaultPlan = {};
  private readonly pauses = new PausePoints();

  constructor(private readonly enabled: boolean) {}

  cutTransferAfterBytes(): number | undefined {
    const n = this.plan.cutTransferAfterBytes;
    if (n !== undefined) delete this.plan.cutTransferAfterBytes;
    return n;
  }

  async beforeTransfer(): Promise<void> {
    if (this.plan.dieBeforeRestore) {
      // An abrupt death: no cleanup, no answer to the pending request.
      process.kill(process.pid, 'SIGKILL');
    }
  }

  async beforeCheckpointCommit(): Promise<void> {
    if (this.plan.dieBeforeCheckpointCommit) process.kill(process.pid, 'SIGKILL');
    await this.pauses.at('checkpoint:commit');
  }

  /** Pauses here if STEP is armed. */
  async pauseAt(step: AgentPauseStep): Promise<void> {
    await this.pauses.at(step);
  }

  /**
   * After a restore: 'restore:done'; in lazy mode 'restore:pages-pulling' once the lazy-pages
   * daemon's log shows pages copied from the source, the point past which the memory exists
   * only across the two hosts. IMAGESDIR is the migration's CRIU image directory; CRIU's logs are
   * in criu-work beside it.
   */
  async afterRestore(mode: 'lazy' | 'copy', imagesDir: string): Promise<void> {
    const criuWork = join(imagesDir, '..', 'criu-work');
    if (mode === 'lazy' && this.pauses.isArmed('restore:pages-pulling')) {
      const deadline = Date.now() + PAGES_WAIT_MS;
      while (Date.now() < deadline && !PAGES_COPIED.test(await readFile(join(criuWork, 'lazy-pages.log'), 'utf8').catch(() => ''))) await sleep(20);
      await this.pauses.at('restore:pages-pulling');
    }
    await this.pauses.at('restore:done');
  }

  async beforeRestore(imagesDir: string): Promise<void> {
    if (this.plan.corruptImagesBeforeRestore) {
      delete this.plan.corruptImagesBeforeRestore;
      await unlink(join(imagesDir, 'pstree.img')).catch(() => undefined);
    }
  }

  registerRoutes(app: FastifyInstance): void {
    app.post<{ Body: FaultPlan }>('/v1/debug/faults', { schema: { body: FaultPlan } }, async (req) => {
      if (!this.enabled) throw new NotFoundError('fault injection is off on this agent (start it with CHIPMUNK_ENABLE_FAULTS=1)');
      this.plan = { ...req.body };
      if (req.body.pauseAt) this.pauses.arm(req.body.pauseAt, req.body.pauseMaxMs);
      return { armed: this.plan };
    });
    app.get('/v1/debug/faults', { schema: { response: { 200: PauseStatus } } }, async () => {
      if (!this.enabled) throw new NotFoundError('fault injection is off on this agent (start it with CHIPMUNK_ENABLE_FAULTS=1)');
      return this.pauses.status();
    });
    app.post('/v1/debug/faults/resume', { schema: { response: { 200: PauseStatus } } }, async () => {
      if (!this.enabled) throw new NotFoundError('fault injection is off on this agent (start it with CHIPMUNK_ENABLE_FAULTS=1)');
      this.pauses.resume();
      return this.pauses.status();
    });
  }
}
