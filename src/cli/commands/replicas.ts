/**
 * `chipmunk checkpoint-replicas [ls]` and `chipmunk checkpoint-replicas retire URL`: the
 * checkpoint store replicas the controllers keep checkpoints on, and taking one out for good
 * (src/controller/checkpoint-replica-admin.ts).
 */
import type { Command } from 'commander';

import { formatBytes } from '../../shared/units.js';
import { controllerClient } from '../context.js';
import { addConnectionOptions, addJsonOption, parseUrl } from '../options.js';
import { printJson, renderTable } from '../output.js';

export function registerReplicaCommands(program: Command): void {
  const replicas = program.command('checkpoint-replicas').description('the checkpoint store replicas checkpoints are kept on (one per controller)');

  addConnectionOptions(
    addJsonOption(replicas.command('ls', { isDefault: true }).description('list the replicas: where each is served, whether it answers, what it holds')),
  ).action(async (opts: { json?: boolean }, cmd: Command) => {
    const list = await (await controllerClient(cmd)).checkpointReplicas();
    if (opts.json) {
      printJson(list);
      return;
    }
    const rows = list.map((r) => [
      r.url,
      r.controller ? `${r.controller}${r.node ? ` (${r.node})` : ''}` : '-',
      r.status === 'active' ? 'active' : `${r.status} since ${new Date(r.since ?? 0).toISOString()}`,
      r.reachable ? 'yes' : 'no',
      String(r.checkpoints),
      r.bytes === undefined ? '-' : formatBytes(r.bytes),
    ]);
    process.stdout.write(`${renderTable(['URL', 'CONTROLLER', 'STATUS', 'REACHABLE', 'CHECKPOINTS', 'SIZE'], rows)}\n`);
  });

  addConnectionOptions(
    addJsonOption(
      replicas
        .command('retire')
        .description('take a replica out for good (a host being decommissioned): its checkpoints are first copied until N other replicas hold each')
        .argument('<url>', 'the replica, as `chipmunk checkpoint-replicas` lists it', parseUrl),
    ),
  ).action(async (url: string, opts: { json?: boolean }, cmd: Command) => {
    const result = await (await controllerClient(cmd)).retireCheckpointReplica(url);
    if (opts.json) printJson(result);
    else if (result.alreadyRetired) process.stdout.write(`${result.url} was already retired\n`);
    else process.stdout.write(`${result.url} is retired: ${result.checkpoints} checkpoint(s) lived on it, now on the other replicas (${result.copies} copies made); it is never used again\n`);
  });
}
