/**
 * `chipmunk protect|unprotect|checkpoint|checkpoints|files|diff|restore|failovers`: protected
 * containers, their checkpoints and the file versions those hold, through the controller.
 */
import type { Command } from 'commander';
import type { CheckpointSummary, DirectoryListing } from '../../checkpoint-store/index.js';
import { formatBytes, formatDuration } from '../../shared/units.js';
import { controllerClient } from '../context.js';
import { addConnectionOptions, addJsonOption, parseCheckpointInterval, parseContainerName } from '../options.js';
import { printJson, renderTable } from '../output.js';


export function registerProtectionCommands(program: Command): void {
  addConnectionOptions(
    addJsonOption(
      program
        .command('protect')
        .description('checkpoint a container periodically and fail it over when its node dies')
        .argument('<name>', 'container name', parseContainerName)
        .requiredOption('--every <duration>', 'checkpoint interval, e.g. 30s or 5m', parseCheckpointInterval),
    ),
  ).action(async (name: string, opts: { every: number; json?: boolean }, cmd: Command) => {
    const policy = await (await controllerClient(cmd)).protect(name, { everyMs: opts.every });
    if (opts.json) printJson({ name, protection: policy });
    else process.stdout.write(`${name} is protected: checkpointed every ${formatDuration(policy.everyMs)}\n`);
  });

  addConnectionOptions(
    addJsonOption(program.command('unprotect').description('stop checkpointing a container (its checkpoints are kept)').argument('<name>', 'container name', parseContainerName)),
  ).action(async (name: string, opts: { json?: boolean }, cmd: Command) => {
    await (await controllerClient(cmd)).unprotect(name);
    if (opts.json) printJson({ name, protection: null });
    else process.stdout.write(`${name} is no longer protected\n`);
  });

  addConnectionOptions(
    addJsonOption(program.command('checkpoint').description('checkpoint a container now; it keeps running').argument('<name>', 'container name', parseContainerName)),
  ).action(async (name: string, opts: { json?: boolean }, cmd: Command) => {
    const c = await (await controllerClient(cmd)).checkpoint(name);
    if (opts.json) printJson(c);
    else process.stdout.write(`checkpoint ${c.id} of ${name}: ${formatBytes(c.logicalBytes)}, ${formatBytes(c.newBytes)} new, frozen ${c.frozenMs} ms\n`);
  });

  addConnectionOptions(
    addJsonOption(program.command('checkpoints').description("a container's checkpoints, newest first").argument('<name>', 'container name', parseContainerName)),
  ).action(async (name: string, opts: { json?: boolean }, cmd: Command) => {
    const list = await (await controllerClient(cmd)).checkpoints(name);
    if (opts.json) {
      printJson(list.map(({ id, time, logicalBytes, newBytes, logPosition, corrupt, replicas }) => ({ id, time, logicalBytes, newBytes, logPosition, ...(corrupt ? { corrupt } : {}), replicas: replicas ?? [] })));
      return;
    }
    const rows = list.map((c) => [
      c.id,
      new Date(c.time).toISOString(),
      formatBytes(c.logicalBytes),
      formatBytes(c.newBytes),
      formatLogPosition(c.logPosition),
      c.corrupt ? 'CORRUPT' : 'ok',
      // Where it is: each replica's host, and its state there unless intact.
      (c.replicas ?? []).map((r) => `${r.url.replace(/^https?:\/\//, '')}${r.state === 'intact' ? '' : ` (${r.state})`}`).join(', '),
    ]);
    process.stdout.write(`${renderTable(['ID', 'TIME', 'SIZE', 'NEW', 'LOG POSITION', 'STATE', 'REPLICAS'], rows)}\n`);
  });

  addConnectionOptions(
    addJsonOption(
      program
        .command('files')
        .description("list a directory or print a file of a container's file system as it was at a checkpoint")
        .argument('<name>', 'container name', parseContainerName)
        .argument('[path]', 'path inside the container', '/')
        .requiredOption('--at <checkpoint>', 'checkpoint id (see `chipmunk checkpoints NAME`)'),
    ),
  ).action(async (name: string, path: string, opts: { at: string; json?: boolean }, cmd: Command) => {
    const res = await (await controllerClient(cmd)).files(name, opts.at, path);
    const type = String(res.headers['content-type'] ?? '');
    if (!type.startsWith('application/json')) {
      for await (const chunk of res.body) process.stdout.write(chunk as Buffer);
      return;
    }
    const listing = (await res.body.json()) as DirectoryListing;
    if (opts.json) {
      printJson(listing);
      return;
    }
    const rows = listing.entries.map((e) => [`${(e.mode & 0o7777).toString(8).padStart(4, '0')}`, e.type, e.type === 'file' ? String(e.size) : '', new Date(e.mtime * 1000).toISOString(), e.name]);
    process.stdout.write(`${renderTable(['MODE', 'TYPE', 'SIZE', 'MODIFIED', 'NAME'], rows)}\n`);
  });

  addConnectionOptions(
    addJsonOption(
      program
        .command('diff')
        .description("files added, changed and removed between two checkpoints of a container")
        .argument('<name>', 'container name', parseContainerName)
        .argument('<from>', 'older checkpoint id')
        .argument('<to>', 'newer checkpoint id'),
    ),
  ).action(async (name: string, from: string, to: string, opts: { json?: boolean }, cmd: Command) => {
    const diff = await (await controllerClient(cmd)).diff(name, from, to);
    if (opts.json) {
      printJson(diff);
      return;
    }
    const lines = [...diff.added.map((p) => `A ${p}`), ...diff.changed.map((p) => `M ${p}`), ...diff.removed.map((p) => `D ${p}`)].sort((a, b) => a.slice(2).localeCompare(b.slice(2)));
    process.stdout.write(lines.length ? `${lines.join('\n')}\n` : 'no differences\n');
  });

  addConnectionOptions(
    addJsonOption(
      program
        .command('restore')
        .description('roll a running container back to a checkpoint (memory and files)')
        .argument('<name>', 'container name', parseContainerName)
        .requiredOption('--from <checkpoint>', 'checkpoint id (see `chipmunk checkpoints NAME`)'),
    ),
  ).action(async (name: string, opts: { from: string; json?: boolean }, cmd: Command) => {
    const res = await (await controllerClient(cmd)).restore(name, opts.from);
    if (opts.json) printJson({ name, ...res });
    else process.stdout.write(`${name} runs from checkpoint ${res.restoredFrom} (its state before is checkpoint ${res.safetyCheckpoint})\n`);
  });

  addConnectionOptions(addJsonOption(program.command('failovers').description('failovers the controller ran, oldest first'))).action(
    async (opts: { json?: boolean }, cmd: Command) => {
      const list = await (await controllerClient(cmd)).failovers();
      if (opts.json) {
        printJson(list);
        return;
      }
      const rows = list.map((f) => [f.id, f.name, f.from, f.to ?? '-', f.outcome, f.checkpoint ?? '-', String(f.replayed ?? 0), f.finishedAt ? `${f.finishedAt - f.detectedAt} ms` : '-']);
      process.stdout.write(`${renderTable(['ID', 'CONTAINER', 'FROM', 'TO', 'OUTCOME', 'CHECKPOINT', 'REPLAYED', 'TOOK'], rows)}\n`);
    },
  );
}

/** "SEQ@LOGID": a position is a seq in one particular request log (no id: stored by an older version). */
function formatLogPosition(position: CheckpointSummary['logPosition']): string {
  if (position === null) return '-';
  return `${position.seq}@${position.logId ?? 'unknown-log'}`;
}
