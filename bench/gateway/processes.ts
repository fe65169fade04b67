/**
 * The processes of the loopback part of bench/gateway, each its own process as in a real
 * deployment: upstream servers (statefulapp, and Python's http.server serving one connection
 * at a time) and a chipmunk gateway started with the `chipmunk gateway` command.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, openSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { GatewayClient } from '../../src/gateway/index.js';

const STATEFULAPP = fileURLToPath(new URL('../../src/devtools/statefulapp/server.js', import.meta.url));
const ONE_CONNECTION_SERVER = fileURLToPath(new URL('../../src/devtools/python/one-connection-server.py', import.meta.url));
const CHIPMUNK = fileURLToPath(new URL('../../bin/chipmunk.mjs', import.meta.url));
const TOKEN = 'bench-gateway-token';

export interface Running {
  port: number;
  pid: number;
  stop(): Promise<void>;
}

function stopper(child: ChildProcess): () => Promise<void> {
  return async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    await once(child, 'exit');
  };
}

/** Resolves with the first stdout line that `match` accepts (its result), or fails if the process exits first. */
async function waitForLine<T>(child: ChildProcess, what: string, match: (line: string) => T | undefined): Promise<T> {
  return new Promise((resolve, reject) => {
    let out = '';
    const onData = (d: Buffer): void => {
      out += d.toString();
      for (const line of out.split('\n')) {
        const found = match(line);
        if (found !== undefined) {
          child.stdout?.off('data', onData);
          resolve(found);
          return;
        }
      }
    };
    child.stdout?.on('data', onData);
    child.once('exit', (code) => reject(new Error(`${what} exited (${code}) before it listened: ${out.trim()}`)));
  });
}

/** The stateful test app (node, the same as the test image runs) on 127.0.0.1:port. */
export async function startStatefulApp(port: number, dataDir: string): Promise<Running> {
  const child = spawn(process.execPath, [STATEFULAPP], { env: { ...process.env, HOST: '127.0.0.1', PORT: String(port), DATA_DIR: dataDir }, stdio: ['ignore', 'pipe', 'inherit'] });
  await waitForLine(child, 'statefulapp', (line) => (line.includes('listening') ? true : undefined));
  return { port, pid: child.pid as number, stop: stopper(child) };
}

/** Python's http.server, HTTP/1.1, one connection at a time (issue 9, item 4), on 127.0.0.1. */
export async function startOneConnectionServer(): Promise<Running> {
  // Its stderr is left out: clients that give up make it print broken pipes.
  const child = spawn('python3', [ONE_CONNECTION_SERVER], { stdio: ['ignore', 'pipe', 'ignore'] });
  const port = await waitForLine(child, 'python http.server', (line) => (/^\d+$/.test(line.trim()) ? Number(line.trim()) : undefined));
  return { port, pid: child.pid as number, stop: stopper(child) };
}

export interface GatewayProcessOptions {
  /** More node flags (e.g. --trace-gc-nvp). */
  nodeOptions?: string[];
  env?: Record<string, string>;
  /** Each line the gateway prints on stdout after it listens (e.g. node's GC traces); else they are dropped. */
  onStdoutLine?: (line: string) => void;
  /** Another checkout's bin/chipmunk.mjs (to compare its gateway with this one's); default this checkout's. */
  chipmunk?: string;
}

/** `chipmunk gateway` (`pid`: its node process) with its state in `dir`, and an HTTP route listenPort -> upstream for each entry. */
export async function startGateway(
  dir: string,
  apiPort: number,
  routes: Array<{ name: string; listenPort: number; upstreamPort: number }>,
  opts: GatewayProcessOptions = {},
): Promise<{ pid: number; stop(): Promise<void> }> {
  mkdirSync(dir, { recursive: true });
  // The flag bin/chipmunk.mjs's first line gives node (this runs it with node directly).
  const child = spawn(process.execPath, ['--max-semi-space-size=64', ...(opts.nodeOptions ?? []), opts.chipmunk ?? CHIPMUNK, 'gateway', '--api', `127.0.0.1:${apiPort}`, '--route-host', '127.0.0.1', '--state', join(dir, 'routes.json')], {
    env: { ...process.env, CHIPMUNK_TOKEN: TOKEN, ...opts.env },
    // Its log (stderr) goes to `dir`: the API's request lines would drown the bench's table.
    stdio: ['ignore', 'pipe', openSync(join(dir, 'gateway.log'), 'a')],
  });
  const url = await waitForLine(child, 'chipmunk gateway', (line) => /listening at (\S+)/.exec(line)?.[1]);
  // Kept flowing: a full pipe would block the gateway's writes to stdout.
  let rest = '';
  const { onStdoutLine } = opts;
  child.stdout?.on('data', (d: Buffer) => {
    if (!onStdoutLine) return;
    const lines = (rest + d.toString()).split('\n');
    rest = lines.pop() as string;
    for (const line of lines) onStdoutLine(line);
  });
  const client = new GatewayClient({ url, token: TOKEN });
  const stop = stopper(child);
  try {
    for (const r of routes) await client.putRoute(r.name, { protocol: 'http', listenPort: r.listenPort, upstream: { address: '127.0.0.1', port: r.upstreamPort } });
  } catch (err) {
    await stop();
    throw err;
  }
  await sleep(200);
  return { pid: child.pid as number, stop };
}
