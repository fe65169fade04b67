/**
 * `chipmunk doctor`: presents the host checks as a table (or JSON) and turns them into an
 * exit code. The checks themselves live in src/shared/host/ (the agent runs some of them at start).
 */

import type { HostCheck } from '../shared/host/capabilities.js';

const COLUMN_GAP = '  ';

/** Only `missing` fails the doctor: a `warn` leaves chipmunk usable with fewer options. */
function allRequiredPresent(checks: readonly HostCheck[]): boolean {
  return checks.every((check) => check.status !== 'missing');
}

export function doctorExitCode(checks: readonly HostCheck[]): 0 | 1 {
  return allRequiredPresent(checks) ? 0 : 1;
}

export function doctorJson(checks: readonly HostCheck[]): { ok: boolean; checks: readonly HostCheck[] } {
  return { ok: allRequiredPresent(checks), checks };
}

/**
 * CHECK | STATUS | DETAIL, columns aligned, then a "How to fix" section for the checks that
 * are not ok. Checks sharing a fix (most often `npm run setup`) are listed under it once.
 */
export function renderDoctorTable(checks: readonly HostCheck[]): string {
  const rows = [['CHECK', 'STATUS', 'DETAIL'], ...checks.map((check) => [check.title, check.status, check.detail])];
  const titleWidth = Math.max(...rows.map((row) => row[0]!.length));
  const statusWidth = Math.max(...rows.map((row) => row[1]!.length));
  const lines = rows.map(([title, status, detail]) =>
    // The last column is not padded, so lines carry no trailing spaces.
    [title!.padEnd(titleWidth), status!.padEnd(statusWidth), detail].join(COLUMN_GAP).trimEnd(),
  );

  const checksByFix = new Map<string, string[]>();
  for (const check of checks) {
    if (check.status === 'ok' || check.fix === undefined) continue;
    checksByFix.set(check.fix, [...(checksByFix.get(check.fix) ?? []), check.title]);
  }
  if (checksByFix.size > 0) {
    lines.push('', 'How to fix:');
    for (const [fix, titles] of checksByFix) lines.push(`  ${fix}  (${titles.join(', ')})`);
  }
  return lines.join('\n');
}
