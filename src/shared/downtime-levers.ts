/**
 * The levers that cut a move's downtime can each be switched off, one move at a time, so that
 * bench/downtime (`--compare LEVER`) measures a move with and without it side by side under the
 * same load: CHIPMUNK_DOWNTIME_OFF=LEVER[,LEVER] (read where the lever acts, at each move).
 * - route-ahead: the controller routes the address to the target as soon as the restore answered
 *   (migration.ts), not after the verify and commit writes.
 * - in-process-checks: the agents ask whether a layer is mounted and how big a tree is in their
 *   own process (rootfs.ts, context.ts), not with `mountpoint` and `du`.
 * - pre-freeze: the source freezes the container just before the dump's CRIU starts, so CRIU finds
 *   it frozen and skips its 100 ms freezer step (freeze-first.ts).
 */
export type DowntimeLever = 'route-ahead' | 'in-process-checks' | 'pre-freeze';

export function leverOff(lever: DowntimeLever): boolean {
  return (process.env.CHIPMUNK_DOWNTIME_OFF ?? '').split(',').includes(lever);
}
