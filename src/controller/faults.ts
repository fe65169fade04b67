/**
 * Fault injection in the controller, for integration tests and failure rehearsals: off unless
 * the controller starts with CHIPMUNK_ENABLE_FAULTS=1 (the local cluster passes it through).
 * Armed through an authenticated debug route; acts on the real thing.
 */
import type { FastifyInstance } from 'fastify';
import { Type, type Static } from '@sinclair/typebox';
import type { CheckpointStore } from '../checkpoint-store/index.js';
import { NotFoundError } from '../shared/errors.js';
import { ContainerName } from '../shared/protocol.js';

export const ControllerFaultPlan = Type.Object({
  /** Damages one stored chunk that only this checkpoint has (bit rot on the store's disk). */
  corruptChunkOf: Type.Optional(Type.Object({ container: ContainerName, checkpoint: Type.String({ minLength: 1 }) })),
});
export type ControllerFaultPlan = Static<typeof ControllerFaultPlan>;

export function registerControllerFaults(app: FastifyInstance, store: CheckpointStore, enabled: boolean): void {
  app.post<{ Body: ControllerFaultPlan }>('/v1/debug/faults', { schema: { body: ControllerFaultPlan } }, async (req) => {
    if (!enabled) throw new NotFoundError('fault injection is off in this controller (start it with CHIPMUNK_ENABLE_FAULTS=1)');
    const done: Record<string, unknown> = {};
    if (req.body.corruptChunkOf) {
      const { container, checkpoint } = req.body.corruptChunkOf;
      done.corruptedChunk = await store.damageUniqueChunk(container, checkpoint);
    }
    return { done };
  });
}
