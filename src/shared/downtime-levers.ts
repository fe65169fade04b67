/**
 * The levers that cut a move's downtime can each be switched off, one move at a time, so that
 * bench/downtime (`--compare LEVER`) measures a move with and without it side by side under the
 * same load: CHIPMUNK_DOWNTIME_OFF=LEVER[,LEVER] (read where the lever acts, at each move).
 * - route-ahead: the controller routes the address to the target as soon as the restore answered
 *   (migration.ts), not after the verify and commit writes.
 * - in-process-checks: the agents ask whether a layer is mounted and how big a tree is in their
 *   own process (rootfs.ts, context.ts), not with `mountpoint` and `du`.
 * - lean-hook: the prestart hook that moves a restored container's interface in starts 3
 *   programs, not 13 (network.ts).
 * - daemon-overlap: a lazy restore starts CRIU's lazy-pages daemon while the bundle is made,
 *   not after it (target-restore.ts).
 * - fresh-network: a target's restore does not ask whether the staged interface is still there
 *   (one `ip` less in the bundle): its namespace was attached for this migration (target-restore.ts).
 * - kerndat-cache: the target makes CRIU's kernel-feature cache before the freeze if it is missing
 *   (target-restore.ts, host/criu-kernel-cache.ts); bench/downtime removes it before each move
 *   without the lever.
 * - pre-freeze: the source freezes the container just before the dump's CRIU starts, so CRIU finds
 *   it frozen and skips its 100 ms freezer step (freeze-first.ts).
 */
export type DowntimeLever = 'route-ahead' | 'in-process-checks' | 'kerndat-cache' | 'lean-hook' | 'daemon-overlap' | 'fresh-network' | 'pre-freeze';

export function leverOff(lever: DowntimeLever): boolean {
  return (process.env.CHIPMUNK_DOWNTIME_OFF ?? '').split(',').includes(lever);
}
