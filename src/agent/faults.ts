/**
 * Fault injection for integration tests and for operators rehearsing failures: off unless the
 * agent starts with CHIPMUNK_ENABLE_FAULTS=1. Faults are armed through an authenticated debug
 * route and fire once. They act on the real thing: the agent process really exits, a transfer
 * really breaks off mid-stream, CRIU really fails on an image it cannot read.
 */
import { unlink } from 'node:fs/promises';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { Type, type Static } from '@sinclair/typebox';
import { NotFoundError } from '../shared/errors.js';

export const FaultPlan = Type.Object({
  /** The target agent process exits (as if killed) when asked to restore, before fetching. */
  dieBeforeRestore: Type.Optional(Type.Boolean()),
  /** The source cuts the next tree transfer after this many bytes. */
  cutTransferAfterBytes: Type.Optional(Type.Integer({ minimum: 0 })),
  /** The target deletes a CRIU image file before restoring, so CRIU's restore fails. */
  corruptImagesBeforeRestore: Type.Optional(Type.Boolean()),
  /** The agent process exits (as if killed) while uploading a checkpoint: chunks sent, commit not. */
  dieBeforeCheckpointCommit: Type.Optional(Type.Boolean()),
});
export type FaultPlan = Static<typeof FaultPlan>;

export class FaultInjector {
  private plan: FaultPlan = {};

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
      return { armed: this.plan };
    });
  }
}
