/**
 * The levers that cut a move's downtime can each be switched off, one move at a time, so that
 * bench/downtime (`--compare LEVER`) measures a move with and without it side by side under the
 * same load: CHIPMUNK_DOWNTIME_OFF=LEVER[,LEVER] (read where the lever acts, at each move).
 * - route-ahead: the controller routes the address to the target as soon as the restore answered
 *   (migration.ts), not after the verify and commit writes.
 */
export type DowntimeLever = 'route-ahead';

export function leverOff(lever: DowntimeLever): boolean {
  return (process.env.CHIPMUNK_DOWNTIME_OFF ?? '').split(',').includes(lever);
}
