/**
 * What the CLI prints: tables for people, JSON for scripts (`--json`: machine output on stdout
 * and nothing else), and errors in one shape either way.
 */
import { CommanderError } from 'commander';

import { InvalidInputError, toChipmunkError } from '../shared/errors.js';

/** The command line itself is wrong (bad option value, missing option): exit code 2, nothing was sent. */
export class UsageError extends InvalidInputError {}

export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;

export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}

/** Columns padded to the widest cell; the last column is not padded, so lines carry no trailing spaces. */
export function renderTable(header: readonly string[], rows: readonly (readonly string[])[]): string {
  const all = [header, ...rows];
  const widths = header.map((_, col) => Math.max(...all.map((row) => (row[col] ?? '').length)));
  return all.map((row) => row.map((cell, col) => (col === row.length - 1 ? cell : cell.padEnd(widths[col]!))).join('  ').trimEnd()).join('\n');
}

export function formatDuration(ms: number): string {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

/** Commander's own exits that are not failures: --help and --version. */
const COMMANDER_SUCCESS = new Set(['commander.helpDisplayed', 'commander.version']);

/**
 * Prints ERR as `error: MESSAGE (CODE)` on stderr, and as `{"error": {...}}` on stdout too when
 * the command was run with --json. Returns the exit code. Never prints a stack: every failure
 * the CLI can meet is described by its message and code.
 */
export function reportError(err: unknown, json: boolean): number {
  if (err instanceof CommanderError) {
    if (COMMANDER_SUCCESS.has(err.code)) return 0;
    // Help shown because a subcommand was missing: commander has already printed it.
    if (err.code === 'commander.help') return EXIT_USAGE;
    // "error: unknown command 'x'\n(Did you mean ...?)": one line, our prefix.
    const message = err.message.replace(/^error:\s*/, '').replace(/\s*\n\s*/g, ' ');
    return reportError(new UsageError(message, { reason: err.code }), json);
  }
  const error = toChipmunkError(err);
  if (json) process.stdout.write(`${JSON.stringify({ error: { code: error.code, message: error.message, details: error.details } })}\n`);
  const logPath = error.details.logPath;
  process.stderr.write(`error: ${error.message} (${error.code})\n${typeof logPath === 'string' ? `  log: ${logPath}\n` : ''}`);
  return error instanceof UsageError ? EXIT_USAGE : EXIT_FAILURE;
}
