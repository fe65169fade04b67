/**
 * Deterministic kill points for fault rehearsals (debug only: the agents' and the controller's
 * fault routes, CHIPMUNK_ENABLE_FAULTS=1). Polling for "the migration is in phase X" is racy
 * when X lasts milliseconds; instead a process is armed to *pause* at a named step, a one-line
 * `await pauses.at('step')` in the code. The harness sees that it got there (`reached`),
 * SIGKILLs whichever process it wants dead exactly then, and resumes the paused one.
 *
 * A pause fires once. It ends by itself after `maxMs`, so a forgotten one cannot wedge a process.
 */
import { Type, type Static } from '@sinclair/typebox';

export const DEFAULT_MAX_PAUSE_MS = 120_000;

export const PauseStatus = Type.Object({
  /** The armed step, or the last one that fired. */
  step: Type.Optional(Type.String()),
  /** The process got to the step and waits there (or waited, once resumed). */
  reached: Type.Boolean(),
  reachedAt: Type.Optional(Type.Number()),
  /** The pause ended (resumed, or timed out). */
  resumed: Type.Boolean(),
});
export type PauseStatus = Static<typeof PauseStatus>;

interface Armed {
  step: string;
  maxMs: number;
  reachedAt?: number;
  resumed: boolean;
  resume?: () => void;
}

export class PausePoints {
  private armed?: Armed;

  /** Arms STEP (replacing what was armed; a pause in progress is resumed first). */
  arm(step: string, maxMs = DEFAULT_MAX_PAUSE_MS): void {
    this.resume();
    this.armed = { step, maxMs, resumed: false };
  }

  /** Whether STEP is armed and not yet reached: lets a caller do extra work only then (e.g. wait for pages to flow). */
  isArmed(step: string): boolean {
    return this.armed?.step === step && this.armed.reachedAt === undefined;
  }

  /** Waits here if STEP is armed (once); otherwise returns at once. */
  async at(step: string): Promise<void> {
    const armed = this.armed;
    if (!armed || armed.step !== step || armed.reachedAt !== undefined) return;
    armed.reachedAt = Date.now();
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => armed.resume?.(), armed.maxMs);
      armed.resume = () => {
        clearTimeout(timer);
        armed.resumed = true;
        armed.resume = undefined;
        resolve();
      };
    });
  }

  /** Lets a paused process go on; disarms a step not reached yet. */
  resume(): void {
    if (!this.armed) return;
    if (this.armed.resume) this.armed.resume();
    else if (this.armed.reachedAt === undefined) this.armed = undefined;
  }

  status(): PauseStatus {
    const a = this.armed;
    if (!a) return { reached: false, resumed: false };
    return { step: a.step, reached: a.reachedAt !== undefined, ...(a.reachedAt !== undefined ? { reachedAt: a.reachedAt } : {}), resumed: a.resumed };
  }
}
