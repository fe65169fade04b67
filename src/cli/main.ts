/** The `chipmunk` command (run through bin/chipmunk.mjs). */
import { Command } from 'commander';

import { registerClusterCommands } from './commands/cluster.js';
import { registerContainerCommands } from './commands/containers.js';
import { registerDaemonCommands } from './commands/daemons.js';
import { registerDoctorCommand } from './commands/doctor.js';
import { registerMigrateCommand, registerMigrationsCommand } from './commands/migrate.js';
import { registerNodeCommands } from './commands/nodes.js';
import { registerProtectionCommands } from './commands/protection.js';
import { registerReplicaCommands } from './commands/replicas.js';
import { parseUrl } from './options.js';
import { reportError } from './output.js';

function buildProgram(): Command {
  const program = new Command('chipmunk')
    .description('keep stateful containers alive and movable: live migration between hosts')
    // Needed for `run IMAGE CMD...` to hand options after IMAGE to the container's command.
    .enablePositionalOptions()
    // Errors are thrown to main() rather than printed and exited on, so they all get one format.
    // Subcommands inherit both settings because they are created with .command() below.
    .exitOverride()
    .configureOutput({ outputError: () => {} })
    .option('--controller <url>', 'controller URL (default: $CHIPMUNK_CONTROLLER, else the local cluster)', parseUrl)
    .option('--token-file <file>', 'file holding the cluster token (default: $CHIPMUNK_TOKEN, else the local cluster)');
  registerClusterCommands(program);
  registerNodeCommands(program);
  registerContainerCommands(program);
  registerMigrateCommand(program);
  registerMigrationsCommand(program);
  registerProtectionCommands(program);
  registerReplicaCommands(program);
  registerDoctorCommand(program);
  registerDaemonCommands(program);
  return program;
}

/**
 * For an error thrown while commander still parses, the command's --json is not known yet: look
 * for it on the command line (up to "--", after which words belong to a container's command).
 */
function jsonRequested(argv: readonly string[]): boolean {
  const end = argv.indexOf('--');
  return (end < 0 ? argv : argv.slice(0, end)).includes('--json');
}

async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  let actionCommand: Command | undefined;
  program.hook('preAction', (_, command) => {
    actionCommand = command;
  });
  try {
    await program.parseAsync(argv);
    return Number(process.exitCode ?? 0);
  } catch (err) {
    const json = actionCommand ? actionCommand.opts().json === true : jsonRequested(argv.slice(2));
    return reportError(err, json);
  }
}

process.exitCode = await main(process.argv);
