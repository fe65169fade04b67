/** `chipmunk node ls`: the nodes, and which of them runs the leading controller. */
import type { Command } from 'commander';

import type { ControllerView, NodeView } from '../../shared/protocol.js';
import { controllerClient } from '../context.js';
import { addConnectionOptions, addJsonOption } from '../options.js';
import { printJson, renderTable } from '../output.js';

/** What runs on a node besides its agent: a controller, leading (with its term) or following. */
interface NodeController {
  role: 'leader' | 'follower';
  term?: number;
}

function controllerOn(node: NodeView, controllers: ControllerView[]): NodeController | undefined {
  const here = controllers.find((c) => c.node === node.name);
  if (!here) return undefined;
  return here.leader ? { role: 'leader', ...(here.term !== undefined ? { term: here.term } : {}) } : { role: 'follower' };
}

function describe(controller: NodeController | undefined): string {
  if (!controller) return '-';
  return controller.role === 'leader' ? `leader${controller.term !== undefined ? ` (term ${controller.term})` : ''}` : 'follower';
}

export function registerNodeCommands(program: Command): void {
  const node = program.command('node').description("the cluster's nodes");

  addConnectionOptions(addJsonOption(node.command('ls').description('list the nodes the controller knows, and the controllers on them'))).action(
    async (opts: { json?: boolean }, cmd: Command) => {
      const client = await controllerClient(cmd);
      const [views, controllers] = await Promise.all([client.nodes(), client.controllers()]);
      const nodes = views.map((view) => {
        const controller = controllerOn(view, controllers);
        return { name: view.name, address: view.address, status: view.status, ...(controller ? { controller } : {}) };
      });
      if (opts.json) {
        printJson(nodes);
        return;
      }
      const withControllers = controllers.some((c) => c.node !== undefined);
      const headers = ['NAME', 'ADDRESS', 'STATUS', ...(withControllers ? ['CONTROLLER'] : [])];
      const rows = nodes.map((n) => [n.name, n.address, n.status, ...(withControllers ? [describe(n.controller)] : [])]);
      process.stdout.write(`${renderTable(headers, rows)}\n`);
    },
  );
}
