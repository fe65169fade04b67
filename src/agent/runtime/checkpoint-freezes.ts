/**
 * The containers this agent has frozen (`runc pause`) for a checkpoint that leaves them running.
 * runc then says `paused`; such a container still runs for every purpose (it is resumed when the
 * dump is done, at most seconds later), so the agent reports it `running`. A multi-process
 * container of a protected app (PostgreSQL, nginx) spends a large part of its time frozen: taken
 * for `stopped`, it had its migrations refused ("it is stopped") while it served.
 *
 * A status is read with `runc state` (tens of ms): a freeze may begin and end while it runs. So a
 * reader takes a mark first and asks afterwards whether a freeze overlapped its read.
 */
export interface FreezeMark {
  /** Freezes of the container begun before the read. */
  readonly begun: number;
  readonly active: boolean;
}

export class CheckpointFreezes {
  private readonly begun = new Map<string, number>();
  private readonly active = new Set<string>();

  begin(name: string): void {
    this.begun.set(name, (this.begun.get(name) ?? 0) + 1);
    this.active.add(name);
  }

  /** When the container was resumed, or its resume failed (it is then frozen for good: not ours to explain). */
  end(name: string): void {
    this.active.delete(name);
  }

  mark(name: string): FreezeMark {
    return { begun: this.begun.get(name) ?? 0, active: this.active.has(name) };
  }

  /** Whether a checkpoint's freeze covered some of the time since MARK was taken. */
  overlapped(name: string, mark: FreezeMark): boolean {
    return mark.active || this.active.has(name) || (this.begun.get(name) ?? 0) !== mark.begun;
  }

  /** A removed container's counts go with it. */
  forget(name: string): void {
    this.begun.delete(name);
    this.active.delete(name);
  }
}
