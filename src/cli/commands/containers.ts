/** `chipmunk run|ps|logs|stats|stop|rm`: containers, through the controller. */
import type { Command } from 'commander';
import type { ContainerView, PortMapping, RunRequest, VolumeMount } from '../../shared/protocol.js';
import { formatBytes, formatDuration } from '../../shared/units.js';
import { controllerClient } from '../context.js';
import { addConnectionOptions, addJsonOption, collectEnv, collectPort, collectVolume, parseCheckpointInterval, parseContainerName, parseMemory, parseNodeName, parsePort, parseRouteProtocol } from '../options.js';
import { printJson, renderTable } from '../output.js';

interface RunOptions {
  name: string;
  node?: string;
  publish: PortMapping[];
  env: Record<string, string>;
  memory?: number;
  checkpointEvery?: number;
  volume: VolumeMount[];
  json?: boolean;
}

function describeContainer(view: ContainerView): string {
  const ports = view.ports.length ? ` (${view.ports.join(', ')})` : '';
  return `${view.name} ${view.status} on ${view.node}${ports}`;
}

export function registerContainerCommands(program: Command): void {
  addConnectionOptions(
    addJsonOption(
      program
        .command('run')
        .description('run a container on the cluster')
        .requiredOption('--name <name>', 'container name', parseContainerName)
        .option('--node <node>', 'node to run it on (default: the controller chooses)', parseNodeName)
        .option('-p, --publish <hostport:ctrport>', 'publish a container port on the node, e.g. 8080:80 or 5353:53/udp (repeatable)', collectPort, [])
        .option('-e, --env <key=value>', 'environment variable (repeatable)', collectEnv, {})
        .option('--memory <size>', 'memory limit, e.g. 256m or 1g', parseMemory)
        .option('-v, --volume <name:/path>', 'named volume mounted at /path; it moves with the container and is in its checkpoints (repeatable)', collectVolume, [])
        .option('--checkpoint-every <duration>', 'protect it: checkpoint every DURATION (e.g. 30s), fail over when its node dies', parseCheckpointInterval)
        .argument('<image>', 'image name')
        .argument('[command...]', "command to run instead of the image's CMD")
        // Everything after IMAGE belongs to the container's command, options included (like docker run).
        .passThroughOptions(),
    ),
  ).action(async (image: string, command: string[], opts: RunOptions, cmd: Command) => {
    const request: RunRequest = {
      spec: { name: opts.name, image, command, env: opts.env, ports: opts.publish, memoryBytes: opts.memory ?? 0, ...(opts.volume.length ? { volumes: opts.volume } : {}) },
      ...(opts.node ? { node: opts.node } : {}),
      ...(opts.checkpointEvery ? { protection: { everyMs: opts.checkpointEvery } } : {}),
    };
    const view = await (await controllerClient(cmd)).run(request);
    if (opts.json) printJson(view);
    else process.stdout.write(`${describeContainer(view)}\n`);
  });

  addConnectionOptions(addJsonOption(program.command('ps').description('list containers'))).action(
    async (opts: { json?: boolean }, cmd: Command) => {
      const views = await (await controllerClient(cmd)).containers();
      const containers = views.map(({ name, node, status, image, ports, endpoints, protection }) => ({ name, node, status, image, ports, endpoints, ...(protection ? { protection } : {}) }));
      if (opts.json) {
        printJson(containers);
        return;
      }
      const rows = containers.map((c) => [c.name, c.node, c.status, c.image, c.ports.join(', '), c.endpoints.join(', '), c.protection ? `every ${formatDuration(c.protection.everyMs)}` : '-']);
      process.stdout.write(`${renderTable(['NAME', 'NODE', 'STATUS', 'IMAGE', 'PORTS', 'ENDPOINTS', 'CHECKPOINTS'], rows)}\n`);
    },
  );

  addConnectionOptions(
    addJsonOption(program.command('logs').description("a container's output (stdout and stderr)").argument('<name>', 'container name', parseContainerName)),
  ).action(async (name: string, opts: { json?: boolean }, cmd: Command) => {
    const res = await (await controllerClient(cmd)).logs(name);
    if (opts.json) {
      printJson({ name, logs: await res.body.text() });
      return;
    }
    for await (const chunk of res.body) process.stdout.write(chunk as Buffer);
  });

  addConnectionOptions(
    addJsonOption(program.command('stats').description("a container's CPU and memory use, from its cgroups").argument('<name>', 'container name', parseContainerName)),
  ).action(async (name: string, opts: { json?: boolean }, cmd: Command) => {
    const stats = await (await controllerClient(cmd)).stats(name);
    if (opts.json) {
      printJson(stats);
      return;
    }
    const limit = stats.memoryLimitBytes !== undefined ? ` of ${formatBytes(stats.memoryLimitBytes)}` : '';
    const rows = [[stats.name, `${(stats.cpuUsageNs / 1e9).toFixed(2)} s`, `${formatBytes(stats.memoryBytes)}${limit}`, String(stats.pids)]];
    process.stdout.write(`${renderTable(['NAME', 'CPU TIME', 'MEMORY', 'PIDS'], rows)}\n`);
  });

  addConnectionOptions(
    addJsonOption(
      program
        .command('expose')
        .description('serve a container through the gateway: clients keep one address while it moves')
        .argument('<name>', 'container name', parseContainerName)
        .requiredOption('--port <port>', 'the container port the service listens on', parsePort)
        .option('--listen <port>', 'the gateway port clients use (default: the container port)', parsePort)
        .option('--protocol <protocol>', 'http or tcp', parseRouteProtocol, 'http'),
    ),
  ).action(async (name: string, opts: { port: number; listen?: number; protocol: 'http' | 'tcp'; json?: boolean }, cmd: Command) => {
    const route = await (await controllerClient(cmd)).expose(name, {
      port: opts.port,
      ...(opts.listen !== undefined ? { listen: opts.listen } : {}),
      protocol: opts.protocol,
    });
    if (opts.json) printJson(route);
    else process.stdout.write(`${name} exposed: gateway port ${route.listenPort} -> container port ${route.containerPort} (${route.protocol})\n`);
  });

  addConnectionOptions(
    addJsonOption(program.command('unexpose').description('stop serving a container through the gateway').argument('<name>', 'container name', parseContainerName)),
  ).action(async (name: string, opts: { json?: boolean }, cmd: Command) => {
    await (await controllerClient(cmd)).unexpose(name);
    if (opts.json) printJson({ name, exposed: false });
    else process.stdout.write(`${name} is no longer exposed\n`);
  });

  addConnectionOptions(
    addJsonOption(program.command('stop').description('stop a container (it stays listed)').argument('<name>', 'container name', parseContainerName)),
  ).action(async (name: string, opts: { json?: boolean }, cmd: Command) => {
    const view = await (await controllerClient(cmd)).stop(name);
    if (opts.json) printJson(view);
    else process.stdout.write(`${describeContainer(view)}\n`);
  });

  addConnectionOptions(
    addJsonOption(program.command('rm').description('remove a container').argument('<name>', 'container name', parseContainerName)),
  ).action(async (name: string, opts: { json?: boolean }, cmd: Command) => {
    await (await controllerClient(cmd)).remove(name);
    if (opts.json) printJson({ name, removed: true });
    else process.stdout.write(`${name} removed\n`);
  });
}
