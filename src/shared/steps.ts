/**
 * The timed steps of a migration's frozen window, as the node that did them measured them (its
 * own clock, ms since epoch): the source's dump and the target's fetch and restore answer with
 * theirs, and the controller records them in the migration record's history, on the event of the
 * phase they belong to (`dump`, `transfer`). bench/downtime reads them from there.
 */
import type { MigrationStep } from './protocol.js';

export class StepClock {
  readonly steps: MigrationStep[] = [];

  /** Runs `work` as the step `step`; it is recorded whether it succeeds or not. */
  async time<T>(step: string, work: () => Promise<T>): Promise<T> {
    const at = Date.now();
    try {
      return await work();
    } finally {
      this.add(step, at, Date.now());
    }
  }

  /** A step measured elsewhere (CRIU's log), from `at` to `end`. */
  add(step: string, at: number, end: number): void {
    this.steps.push({ step, at, ms: Math.max(0, end - at) });
  }

  addAll(steps: MigrationStep[]): void {
    this.steps.push(...steps);
  }
}
