/**
 * Fault injection in the controller, for integration tests and failure rehearsals: off unless
 * the controller starts with CHIPMUNK_ENABLE_FAULTS=1 (the local cluster passes it through).
 * Armed through an authenticated debug route; acts on the real thing.
 */
import type { FastifyInstance } from 'fastify';
import { Type, type Static } from '@sinclair/typebox';
import type { CheckpointStore } from '../checkpoint-store/index.js';
import { NotFoundError } from '../shared/errors.js';
import { PausePoints, PauseStatus } from '../shared/pause-point.js';
import { ContainerName } from '../shared/protocol.js';

/**
 * Where the controller can be told to pause (src/shared/pause-point.ts), each right after the
 * step named began (migration phases: once recorded in the store):
 * - migration:prepare    the target is prepared; nothing frozen, traffic not held yet
 * - migration:dump       the dump phase is recorded, the source not yet asked to dump
 * - migration:transfer   the source dumped; the target not yet asked to fetch and restore
 * - migration:verify     the target restored it; not yet checked
 * - migration:cleanup    traffic goes to the target; the source not yet told to finish
 * - checkpoint:cut       the gateway holds the route at the cut; the agent not yet asked to dump
 * - checkpoint:upload    dumped and released; the agent not yet asked to upload
 * - failover:restore     the lock is taken and traffic held; nothing restored yet
 * - failover:replay      restored and recorded; the logged requests not yet replayed
 * - failover:release     replayed; the route not yet released to the new copy
 */
export const CONTROLLER_PAUSE_STEPS = [
  'migration:prepare',
  'migration:dump',
  'migration:transfer',
  'migration:verify',
  'migration:cleanup',
  'checkpoint:cut',
  'checkpoint:upload',
  'failover:restore',
  'failover:replay',
  'failover:release',
] as const;
export type ControllerPauseStep = (typeof CONTROLLER_PAUSE_STEPS)[number];

/**
 * One per process, so that a hook is a single line (`await controllerPauses.at('step')`) in
 * the orchestrators without threading a debug object through their constructors. It does
 * nothing unless armed, and only the fault route (enabled by CHIPMUNK_ENABLE_FAULTS=1) arms it.
 */
const pauses = new PausePoints();
export const controllerPauses: { at(step: ControllerPauseStep): Promise<void> } = pauses;

export const ControllerFaultPlan = Type.Object({
  /** Damages one stored chunk that only this checkpoint has (bit rot on the store's disk). */
  corruptChunkOf: Type.Optional(Type.Object({ container: ContainerName, checkpoint: Type.String({ minLength: 1 }) })),
  /** Pause at this step (once) until POST /v1/debug/faults/resume, or pauseMaxMs. */
  pauseAt: Type.Optional(Type.Union(CONTROLLER_PAUSE_STEPS.map((step) => Type.Literal(step)))),
  pauseMaxMs: Type.Optional(Type.Integer({ minimum: 1, maximum: 600_000 })),
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
    if (req.body.pauseAt) {
      pauses.arm(req.body.pauseAt, req.body.pauseMaxMs);
      done.pauseAt = req.body.pauseAt;
    }
    return { done };
  });
  app.get('/v1/debug/faults', { schema: { response: { 200: PauseStatus } } }, async () => {
    if (!enabled) throw new NotFoundError('fault injection is off in this controller (start it with CHIPMUNK_ENABLE_FAULTS=1)');
    return pauses.status();
  });
  app.post('/v1/debug/faults/resume', { schema: { response: { 200: PauseStatus } } }, async () => {
    if (!enabled) throw new NotFoundError('fault injection is off in this controller (start it with CHIPMUNK_ENABLE_FAULTS=1)');
    pauses.resume();
    return pauses.status();
  });
}
