/**
 * `chipmunk migrate NAME --to NODE`: follows the controller's NDJSON progress stream. People get
 * a live progress line (on a terminal) and a summary table; scripts (--json) get the summary.
 * `chipmunk migrations`: the migrations the controller recorded, and how each ended (or why it is
 * still being settled).
 */
import { Option, type Command } from 'commander';

import type { MigrationStreamLine } from '../../shared/controller-client.js';
import { ChipmunkError, UnavailableError, errorFromJSON } from '../../shared/errors.js';
import type { MigrateRequest, MigrationEvent, MigrationMode, MigrationRecord, MigrationSummary } from '../../shared/protocol.js';
import { formatBytes } from '../../shared/units.js';
import { controllerClient } from '../context.js';
import { addConnectionOptions, addJsonOption, parseContainerName, parseNodeName } from '../options.js';
import { formatDuration, printJson, renderTable } from '../output.js';

/**
 * On a terminal, one line rewritten in place; elsewhere (a pipe, a log) one line per phase, so
 * the output stays readable without carriage returns.
 */
class ProgressDisplay {
  private readonly startedAt = Date.now();
  private lastPhase = '';
  /** Bytes moved so far: phases after the transfer report none of their own. */
  private bytes: number | undefined;
  private lineOpen = false;

  constructor(private readonly out: NodeJS.WriteStream) {}

  show(event: MigrationEvent): void {
    this.bytes = event.bytes ?? this.bytes;
    const total = event.bytes !== undefined && event.totalBytes ? ` / ${formatBytes(event.totalBytes)}` : '';
    const bytes = this.bytes === undefined ? '' : `  ${formatBytes(this.bytes)}${total}`;
    const text = `${event.phase.padEnd(10)}${bytes}  ${formatDuration(Date.now() - this.startedAt)}${event.message ? `  ${event.message}` : ''}`;
    if (this.out.isTTY) {
      // \r and "erase line": the new text replaces the old even when it is shorter.
      this.out.write(`\r\x1b[2K${text}`);
      this.lineOpen = true;
    } else if (event.phase !== this.lastPhase) {
      this.out.write(`${text}\n`);
    }
    this.lastPhase = event.phase;
  }

  /** Ends the live line, so what follows (summary, error) starts on its own line. */
  finish(): void {
    if (this.lineOpen) this.out.write('\n');
    this.lineOpen = false;
  }
}

function renderSummary(summary: MigrationSummary): string {
  // A phase's steps (the frozen window's, as its node timed them) go below it, indented.
  const phases = summary.phases.flatMap((p) => [[p.phase, formatDuration(p.ms)], ...(p.steps ?? []).map((s) => [`  ${s.step}`, formatDuration(s.ms)])]);
  const totals = [
    ['downtime', formatDuration(summary.downtimeMs)],
    ['total', formatDuration(summary.totalMs)],
    ['transferred', formatBytes(summary.bytesTransferred)],
  ];
  return `migrated ${summary.name} from ${summary.from} to ${summary.to} (${summary.mode})\n\n${renderTable(['PHASE', 'TIME'], [...phases, ...totals])}`;
}

/**
 * Follows the stream to its summary or error line. A stream cut before either (the controller
 * died or lost its leadership) does not end the migration: the controller, or the one taking
 * over, finishes or undoes it, so the message says where to look instead of guessing how it ended.
 */
async function followMigration(lines: AsyncIterable<MigrationStreamLine>, progress: ProgressDisplay | undefined, name: string, to: string): Promise<MigrationSummary> {
  let cut = 'the controller closed it';
  try {
    for await (const line of lines) {
      if ('summary' in line) return line.summary;
      if ('error' in line) throw errorFromJSON(line.error);
      progress?.show(line);
    }
  } catch (err) {
    if (err instanceof ChipmunkError) throw err;
    cut = `${(err as Error).message}${(err as { code?: string }).code ? ` (${(err as { code?: string }).code})` : ''}`;
  } finally {
    progress?.finish();
  }
  throw new UnavailableError(
    `lost the progress stream of the migration of ${name} to ${to} before it finished (${cut}): the controller finishes or undoes it on its own; see 'chipmunk ps' and 'chipmunk migrations'`,
    { name, to },
  );
}

export function registerMigrateCommand(program: Command): void {
  addConnectionOptions(
    addJsonOption(
      program
        .command('migrate')
        .description('move a running container to another node, its memory and files included')
        .argument('<name>', 'container name', parseContainerName)
        .requiredOption('--to <node>', 'target node', parseNodeName)
        .addOption(
          new Option('--mode <mode>', 'lazy: post-copy, memory follows after resume; copy: stop-and-copy (default: the controller chooses)').choices([
            'lazy',
            'copy',
          ]),
        ),
    ),
  ).action(async (name: string, opts: { to: string; mode?: MigrationMode; json?: boolean }, cmd: Command) => {
    const request: MigrateRequest = { to: opts.to, ...(opts.mode ? { mode: opts.mode } : {}) };
    // No timeout: a large container's transfer takes as long as it takes; the stream shows progress.
    const lines = await (await controllerClient(cmd)).migrate(name, request);
    const summary = await followMigration(lines, opts.json ? undefined : new ProgressDisplay(process.stdout), name, opts.to);
    if (opts.json) {
      const { from, to, mode, downtimeMs, totalMs, bytesTransferred } = summary;
      printJson({ name: summary.name, from, to, mode, downtimeMs, totalMs, bytesTransferred });
    } else {
      process.stdout.write(`\n${renderSummary(summary)}\n`);
    }
  });
}

/** The outcome column: the last event's message says how it ended or why it is not settled yet. */
function outcomeOf(record: MigrationRecord): string {
  if (record.phase === 'done') return record.cleanupPending ? 'done (source cleanup pending)' : 'done';
  const last = record.history.at(-1)?.message ?? '';
  return record.phase === 'failed' ? `failed: ${last}` : `${record.phase}: ${last}`;
}

export function registerMigrationsCommand(program: Command): void {
  addConnectionOptions(addJsonOption(program.command('migrations').description('migrations the controller recorded, oldest first, and how each ended'))).action(
    async (opts: { json?: boolean }, cmd: Command) => {
      const list = await (await controllerClient(cmd)).migrations();
      if (opts.json) {
        printJson(list);
        return;
      }
      // The frozen window's steps are in the history of each record (--json).
      const rows = list.map((m) => [
        m.id.slice(0, 8), m.name, m.from, m.to, m.mode, new Date(m.startedAt).toISOString(),
        m.finishedAt ? formatDuration(m.finishedAt - m.startedAt) : '-', m.summary ? formatDuration(m.summary.downtimeMs) : '-', outcomeOf(m),
      ]);
      process.stdout.write(`${renderTable(['ID', 'CONTAINER', 'FROM', 'TO', 'MODE', 'STARTED', 'TOOK', 'DOWNTIME', 'OUTCOME'], rows)}\n`);
    },
  );
}
