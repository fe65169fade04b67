/**
 * `chipmunk migrate NAME --to NODE`: follows the controller's NDJSON progress stream. People get
 * a live progress line (on a terminal) and a summary table; scripts (--json) get the summary.
 * `chipmunk migrations`: the migrations the controller recorded, and how each ended (or why it is
 * still being settled).
 */
import { Option, type Command } from 'commander';

import { ChipmunkError, MigrationFailedError, errorFromJSON, type ErrorJSON } from '../../shared/errors.js';
import type { MigrateRequest, MigrationEvent, MigrationMode, MigrationRecord, MigrationSummary } from '../../shared/protocol.js';
import { formatBytes } from '../../shared/units.js';
import { controllerClient } from '../context.js';
import { addConnectionOptions, addJsonOption, parseContainerName, parseNodeName } from '../options.js';
import { formatDuration, printJson, renderTable } from '../output.js';

type StreamLine = MigrationEvent | { summary: MigrationSummary } | { error: ErrorJSON };

async function* ndjsonLines(body: AsyncIterable<Buffer>): AsyncGenerator<StreamLine> {
  // A multi-byte character can be split across chunks: decode in streaming mode.
  const decoder = new TextDecoder();
  let buffered = '';
  const parse = (line: string): StreamLine => {
    try {
      return JSON.parse(line) as StreamLine;
    } catch {
      throw new ChipmunkError('CHIPMUNK_INTERNAL', `the controller sent a malformed progress line: ${line.slice(0, 200)}`);
    }
  };
  for await (const chunk of body) {
    buffered += decoder.decode(chunk, { stream: true });
    let newline: number;
    while ((newline = buffered.indexOf('\n')) >= 0) {
      const line = buffered.slice(0, newline).trim();
      buffered = buffered.slice(newline + 1);
      if (line) yield parse(line);
    }
  }
  buffered += decoder.decode();
  if (buffered.trim()) yield parse(buffered.trim());
}

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
  const phases = summary.phases.map((p) => [p.phase, formatDuration(p.ms)]);
  const totals = [
    ['downtime', formatDuration(summary.downtimeMs)],
    ['total', formatDuration(summary.totalMs)],
    ['transferred', formatBytes(summary.bytesTransferred)],
  ];
  return `migrated ${summary.name} from ${summary.from} to ${summary.to} (${summary.mode})\n\n${renderTable(['PHASE', 'TIME'], [...phases, ...totals])}`;
}

async function followMigration(lines: AsyncIterable<StreamLine>, progress: ProgressDisplay | undefined, name: string, to: string): Promise<MigrationSummary> {
  try {
    for await (const line of lines) {
      if ('summary' in line) return line.summary;
      if ('error' in line) throw errorFromJSON(line.error);
      progress?.show(line);
    }
  } finally {
    progress?.finish();
  }
  throw new MigrationFailedError(`the controller closed the progress stream before migration of ${name} to ${to} finished: check 'chipmunk ps'`, {
    phase: 'prepare',
    node: to,
  });
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
    const client = await controllerClient(cmd);
    // No timeout: a large container's transfer takes as long as it takes; the stream shows progress.
    const res = await client.stream('POST', `/v1/containers/${encodeURIComponent(name)}/migrate`, request);
    const summary = await followMigration(ndjsonLines(res.body), opts.json ? undefined : new ProgressDisplay(process.stdout), name, opts.to);
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
      const list = await (await controllerClient(cmd)).get<MigrationRecord[]>('/v1/migrations');
      if (opts.json) {
        printJson(list);
        return;
      }
      const rows = list.map((m) => [m.id.slice(0, 8), m.name, m.from, m.to, m.mode, new Date(m.startedAt).toISOString(), m.finishedAt ? formatDuration(m.finishedAt - m.startedAt) : '-', outcomeOf(m)]);
      process.stdout.write(`${renderTable(['ID', 'CONTAINER', 'FROM', 'TO', 'MODE', 'STARTED', 'TOOK', 'OUTCOME'], rows)}\n`);
    },
  );
}
