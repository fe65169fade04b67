/** `chipmunk node ls`. */
import type { Command } from 'commander';

import { controllerClient } from '../context.js';
import { addConnectionOptions, addJsonOption } from '../options.js';
import { printJson, renderTable } from '../output.js';

export function registerNodeCommands(program: Command): void {
  const node = program.command('node').description('the cluster\'s nodes');

  addConnectionOptions(addJsonOption(node.command('ls').description('list the nodes the controller knows'))).action(
    async (opts: { json?: boolean }, cmd: Command) => {
      const nodes = (await (await controllerClient(cmd)).nodes()).map(({ name, address, status }) => ({ name, address, status }));
      if (opts.json) printJson(nodes);
      else process.stdout.write(`${renderTable(['NAME', 'ADDRESS', 'STATUS'], nodes.map((n) => [n.name, n.address, n.status]))}\n`);
    },
  );
}
